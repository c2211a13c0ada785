"""The parity gate on outputs that are not numbers: a NaN compares false with every threshold,
so a gate written as "fail when below" passed a flow whose fp16 encoder returned NaN."""

import numpy as np
import pytest

from omni_export.bundle.golden import GoldenCall
from omni_export.runtime_py.parity import judge, psnr


def _calls(ref: np.ndarray) -> list[GoldenCall]:
    return [GoldenCall("forward", {}, {"fp32": {"y": ref}, "fp16": {"y": ref.astype(np.float16).astype(np.float32)}})]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_an_output_with_nan_or_inf_fails_the_gate(bad):
    ref = np.linspace(-1, 1, 64, dtype=np.float32)
    got = ref.copy()
    got[5] = bad
    report = judge("flow", _calls(ref), [{"y": got}], "fp16", 0.99, 0.9, 0.05)
    assert not report.passed
    assert any("1 of 64 values are NaN or infinite" in f for f in report.failures), report.failures
    assert psnr(got, ref) == 0.0


def test_all_nan_fails_on_its_cosine_too():
    ref = np.linspace(-1, 1, 64, dtype=np.float32)
    report = judge("flow", _calls(ref), [{"y": np.full_like(ref, np.nan)}], "fp16", 0.99, 0.9, 0.05)
    assert any("cosine" in f for f in report.failures) and any("NaN" in f for f in report.failures), report.failures


def test_a_close_output_still_passes():
    ref = np.linspace(-1, 1, 64, dtype=np.float32)
    report = judge("flow", _calls(ref), [{"y": ref + 1e-4}], "fp16", 0.99, 0.9, 0.05)
    assert report.passed, report.failures
