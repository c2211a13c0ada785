"""Core ML pieces that need no package: the export forms of the audio front ends (equal to the
eager ones), prefill splitting into enumerated sizes, which dimensions get enumerated, the entry
format, and the converter's clear error for an op Core ML lacks."""

import pytest
import torch
from torch import nn

from omni_export.export.trace_specs import MethodSpec, Tensor, dim
from omni_export.runtime_py.audio import KaldiFbank, WhisperLogMel, frames_of, periodic_hann
from omni_export.runtime_py.backends import SESSIONS
from omni_export.runtime_py.backends.coreml import split_tokens
from omni_export.targets import LoweringError
from omni_export.targets.coreml import enumerations, function_of, token_sizes


def test_export_forms_of_the_front_ends_equal_the_eager_ones():
    assert torch.allclose(periodic_hann(400), torch.hann_window(400, periodic=True), atol=1e-6)
    g = torch.Generator().manual_seed(0)  # not the global generator: its state depends on test order
    x = torch.randn(4000, generator=g)
    assert torch.equal(frames_of(x, 400, 160, "matmul"), x.unfold(0, 400, 160))
    wav = torch.randn(16000, generator=g) * 0.1
    for fe in (WhisperLogMel(), KaldiFbank()):
        ref = fe(wav)
        fe.dft = "matmul"
        assert torch.allclose(fe(wav), ref, atol=2e-3), type(fe).__name__


def test_prompts_split_into_enumerated_sizes_and_single_tokens():
    sizes = token_sizes(256)
    assert sizes == (8, 16, 32, 64, 128, 256) and token_sizes(100) == (8, 16, 32, 64, 100)
    assert split_tokens(300, sizes) == [256, 32, 8, 1, 1, 1, 1]
    assert split_tokens(5, sizes) == [1] * 5 and sum(split_tokens(777, sizes)) == 777


def test_only_one_short_or_cached_dimension_is_enumerated():
    m = nn.Identity()
    x = torch.zeros(2, 3)
    tiles, samples, tokens = dim("tiles", 1, 13), dim("samples", 1600, 480000), dim("tokens", 2, 256)
    one = lambda d, cached=False: MethodSpec("f", m, (x,), ({0: d},), (Tensor("x", "float32", ("n", 3)),), (), cached=cached)  # noqa: E731
    assert enumerations(one(tiles)) == {"tiles": tuple(range(1, 14))}
    assert enumerations(one(samples)) == {}  # too many sizes: flexible, off the Neural Engine
    assert enumerations(one(tokens, cached=True)) == {"tokens": token_sizes(256)}
    two = MethodSpec("f", m, (x, x), ({0: tiles}, {0: samples}), (), ())
    assert enumerations(two) == {}


def test_entries_name_a_package_function_and_the_session_says_why_it_cannot_run_here():
    assert function_of("artifacts/llm/llm.mlpackage#prefill") == ("artifacts/llm/llm.mlpackage", "prefill")
    with pytest.raises(LoweringError, match="package#function"):
        function_of("artifacts/llm/llm.mlpackage")
    import sys

    reason = SESSIONS.get("coreml").unavailable()
    assert (reason is None) == (sys.platform == "darwin") and (reason is None or "macOS" in reason)


def test_an_op_core_ml_cannot_convert_fails_naming_the_method(tmp_path):
    from omni_export.targets.coreml_package import convert

    class Windowed(nn.Module):
        def forward(self, x):
            return x * torch.hann_window(16)

    x = torch.randn(16)
    spec = MethodSpec("forward", Windowed(), (x,), None, (Tensor("x", "float32", (16,)),), (Tensor("y", "float32", (16,)),))
    with pytest.raises(LoweringError, match=r"Core ML cannot convert forward: .*hann_window"):
        convert(torch.export.export(Windowed(), (x,)), spec, "iOS18", {}, tmp_path / "w.mlpackage")
    assert not (tmp_path / "w.mlpackage").exists()


def test_asymmetric_int4_keeps_its_zero_points_as_offsets(tmp_path):
    """Codes, scales and zero points go into the package as they are (constexpr_blockwise_shift_scale
    data, scale and offset), and the module computes (q - zero) * scale, as the QuantResult says."""
    from omni_export.quantize.recipe import QuantConfig
    from omni_export.quantize.result import QTensor
    from omni_export.targets.coreml import CoreMLTarget, DequantizedLinear
    from omni_export.targets.coreml_package import convert, read_quantized_weights

    CoreMLTarget().encode(nn.Module(), {}, {})  # registers torchao's op
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 16)
    q = torch.randint(-8, 8, (16, 64), dtype=torch.int8, generator=g)
    zero = torch.randint(-3, 3, (16, 2), dtype=torch.int8, generator=g)
    qt = QTensor(q, torch.rand(16, 2, generator=g) * 0.1 + 0.01, zero, QuantConfig(bits=4, group_size=32, symmetric=False))
    m, x = DequantizedLinear(lin, qt), torch.randn(3, 64, generator=g)
    assert torch.allclose(m(x), torch.nn.functional.linear(x, qt.dequantize(), lin.bias), atol=1e-5)
    spec = MethodSpec("forward", m, (x,), None, (Tensor("x", "float32", (3, 64)),), (Tensor("y", "float32", (3, 16)),))
    (w,) = read_quantized_weights(convert(torch.export.export(m, (x,)), spec, "iOS18", {}, tmp_path / "a.mlpackage"))
    assert w.dtype == "int4" and torch.equal(w.q, q) and torch.equal(w.offset.reshape(zero.shape), zero)
    assert torch.equal(w.scale.reshape(qt.scale.shape), qt.scale.half().float())
