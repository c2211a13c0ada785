from pathlib import Path

import pytest

from omni_export.compiler import build_bundle
from omni_export.profiles import get_profile
from omni_export.quantize.presets import PRESETS

CONTEXT = 320


@pytest.fixture(scope="session")
def bundles(tiny_dirs, tmp_path_factory):
    """ExecuTorch (android profile), fp32, both tiny families."""
    root = tmp_path_factory.mktemp("bundles")
    return {f: build_bundle(get_profile("android"), p, PRESETS.get("fp32"), root / f, context=CONTEXT) for f, p in tiny_dirs.items()}


@pytest.fixture(scope="session")
def ort_bundles(tiny_dirs, tmp_path_factory):
    """ONNX Runtime (desktop-cpu profile), fp32, both tiny families."""
    root = tmp_path_factory.mktemp("ort-bundles")
    return {f: build_bundle(get_profile("desktop-cpu"), p, PRESETS.get("fp32"), root / f, context=CONTEXT) for f, p in tiny_dirs.items()}


@pytest.fixture(scope="session")
def quant_bundles(tiny_dirs, tmp_path_factory):
    """Quantized bundles, built on first use: (profile, family, preset) -> BuildResult."""
    root = tmp_path_factory.mktemp("qbundles")
    built = {}

    def get(profile, family, preset):
        key = (profile, family, preset)
        if key not in built:
            built[key] = build_bundle(get_profile(profile), tiny_dirs[family], PRESETS.get(preset), root / "-".join(key), context=CONTEXT)
        return built[key]

    return get


@pytest.fixture(scope="session")
def trt_bundles(tiny_dirs, tmp_path_factory):
    """TensorRT (jetson-orin-nano profile), fp16, both tiny families: the graphs TensorRT parses,
    replayed on ONNX Runtime."""
    root = tmp_path_factory.mktemp("trt-bundles")
    return {f: build_bundle(get_profile("jetson"), p, PRESETS.get("fp16"), root / f, context=CONTEXT) for f, p in tiny_dirs.items()}


def _holds_exactly(tensors, stored, where: str) -> None:
    """``stored`` (weights read back from an artifact) are exactly ``tensors`` (a component's
    QuantResult), codes and scales, one for one."""
    import torch

    assert len(stored) == len(tensors), where
    left = dict(tensors)
    for w in stored:
        hit = next((k for k, t in left.items() if t.q.shape == w.q.shape and torch.equal(t.q, w.q)), None)
        assert hit is not None and torch.equal(left.pop(hit).scale, w.scale), (where, hit)


def _quant_result_of(build):  # type: ignore[no-untyped-def]
    import json

    from omni_export.quantize.result import QuantResult

    return QuantResult.load(Path(json.loads((build.bundle / "reports" / "quant.json").read_text())["cache"]))


@pytest.fixture(scope="session")
def same_integers():
    """Asserts that an ONNX bundle's graphs and an ExecuTorch bundle's .pte files hold exactly the
    codes and scales of the one QuantResult both were built from (read back with each format's
    own tooling); returns the (bits, group size) pairs seen."""
    from omni_export.bundle import read_manifest
    from omni_export.targets.onnx_weights import read_component
    from omni_export.targets.pte_weights import read_quantized_weights, read_tables

    def read_pte(path):  # type: ignore[no-untyped-def]
        return read_quantized_weights(path) + read_tables(path)

    def check(onnx_build, et_build) -> set[tuple[int, int]]:
        result = _quant_result_of(onnx_build)
        assert _quant_result_of(et_build).source_fingerprint == result.source_fingerprint
        m_onnx, m_et = read_manifest(onnx_build.bundle), read_manifest(et_build.bundle)
        seen = set()
        for name, comp in m_onnx.components.items():
            tensors = result.for_component(name)
            _holds_exactly(tensors, read_component([onnx_build.bundle / f for f in comp.files]), f"{name} (onnx)")
            _holds_exactly(tensors, read_pte(et_build.bundle / m_et.components[name].files[0]), f"{name} (pte)")
            seen |= {(t.config.bits, t.group_size) for t in tensors.values()}
        return seen

    return check


@pytest.fixture(scope="session")
def holds_exactly():
    return _holds_exactly


@pytest.fixture(scope="session")
def quant_result_of():
    return _quant_result_of


@pytest.fixture(scope="session")
def coreml_bundles(tiny_dirs, tmp_path_factory):
    """Core ML (iphone-15-pro profile), both tiny families: InteractiveOmni int4 (block-wise int4
    decoders, int8 encoders), VITA-1.5 int8 (per-channel everywhere but the vocoder)."""
    root = tmp_path_factory.mktemp("coreml-bundles")
    presets = {"interactiveomni": "int4", "vita15": "int8"}
    return {f: build_bundle(get_profile("iphone"), p, PRESETS.get(presets[f]), root / f, context=CONTEXT) for f, p in tiny_dirs.items()}
