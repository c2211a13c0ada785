"""Voice cloning's front end: the speaker encoder file's contract."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from omni_export.errors import CheckpointError, InputError
from omni_export.export.speaker_encoder import FILE, write_speaker_encoder
from omni_export.runtime_py.voice import SpeakerEncoder


def test_synthetic_speaker_encoder_keeps_the_release_contract(tmp_path):
    path = write_speaker_encoder(tmp_path / FILE, torch.Generator().manual_seed(0), dim=192)
    enc = SpeakerEncoder(path, 192)
    g = np.random.default_rng(0)
    a, b = (g.standard_normal(16000).astype(np.float32) * 0.1 for _ in range(2))
    ea, eb = enc.embed(a), enc.embed(b)
    assert ea.shape == (192,) and np.isfinite(ea).all()
    assert not np.allclose(ea, eb)  # another voice, another embedding
    assert np.allclose(enc.embed(a * 3), ea, atol=1e-3)  # the utterance mean is removed: gain does not matter
    with pytest.raises(InputError, match="at least 0.5 s"):
        enc.embed(a[:4000])
    with pytest.raises(CheckpointError, match=r"expected one input \[batch, frames, 80\] and an output \[batch, 256\]"):
        SpeakerEncoder(path, 256)


def test_a_damaged_or_foreign_speaker_encoder_is_named(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(CheckpointError, match="broken.onnx.*damaged"):
        SpeakerEncoder(bad, 192)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 224, 224])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 224, 224])
    other = tmp_path / "other.onnx"
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(other))
    with pytest.raises(CheckpointError, match="not a speaker encoder"):
        SpeakerEncoder(other, 192)
