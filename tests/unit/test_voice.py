"""Voice cloning's front end: the speaker encoder's and speech tokenizer's file contracts, the
prompt speech's mel."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from omni_export.errors import CheckpointError, InputError
from omni_export.export.speaker_encoder import FILE, TOKENIZER_FILE, write_speaker_encoder, write_speech_tokenizer
from omni_export.runtime_py.audio import slaney_mel_filters
from omni_export.runtime_py.voice import SpeakerEncoder, SpeechTokenizer, prompt_mel, voice_prompt


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


def test_synthetic_speech_tokenizer_keeps_the_release_contract(tmp_path):
    path = write_speech_tokenizer(tmp_path / TOKENIZER_FILE, torch.Generator().manual_seed(0), codes=6561)
    tok = SpeechTokenizer(path, 6561)
    wav = np.random.default_rng(0).standard_normal(32000).astype(np.float32) * 0.1
    tokens = tok.tokens(wav)
    assert len(tokens) == 2 * 100 // 4 and 0 <= min(tokens) and max(tokens) < 6561  # 25 Hz from Whisper's 100 Hz
    assert len(set(tokens)) > 1
    with pytest.raises(InputError, match="at most 30 s"):
        tok.tokens(np.zeros(31 * 16000, dtype=np.float32))
    with pytest.raises(CheckpointError, match="outside 0..99"):
        SpeechTokenizer(path, 100).tokens(wav)
    with pytest.raises(CheckpointError, match="not a speech tokenizer"):
        SpeechTokenizer(write_speaker_encoder(tmp_path / FILE, torch.Generator().manual_seed(0)), 6561)


def test_prompt_mel_is_the_flows_24k_mel():
    """Matcha-TTS's mel as cosyvoice2.yaml sets it: 50 frames a second, 80 slaney bins up to
    8 kHz, natural log floored at 1e-5; a tone lands in its bin, a tone above 8 kHz in none."""
    t = np.arange(16000) / 16000
    low = prompt_mel((0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32))
    high = prompt_mel((0.5 * np.sin(2 * np.pi * 7000 * t)).astype(np.float32))
    assert low.shape == (80, 50)
    filters = slaney_mel_filters(24000, 1920, 80, 0.0, 8000)
    assert filters[:, int(8000 / 12.5) + 2 :].max() == 0  # nothing above 8 kHz (bins of 12.5 Hz)
    assert int(low[:, 25].argmax()) == int(filters[:, 80].argmax())  # 1 kHz = FFT bin 80
    assert int(high[:, 25].argmax()) == int(filters[:, 560].argmax())  # 7 kHz = FFT bin 560
    assert float(low.min()) >= np.log(1e-5) - 1e-6


def test_voice_prompt_trims_tokens_and_mel_to_each_other(tmp_path):
    tok = SpeechTokenizer(write_speech_tokenizer(tmp_path / TOKENIZER_FILE, torch.Generator().manual_seed(0)), 6561)
    wav = np.random.default_rng(1).standard_normal(24000).astype(np.float32) * 0.1  # 1.5 s
    prompt = voice_prompt(tok, wav)
    assert len(prompt.tokens) == 37 and prompt.mel.shape == (80, 74)  # 150 log-mel frames // 4; 75 mel frames -> 2 per token
