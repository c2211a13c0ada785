from pathlib import Path

import pytest

from omni_export.compiler import build_bundle
from omni_export.profiles import get_profile
from omni_export.quantize.presets import PRESETS

CONTEXT = 320


class Built(dict):
    """family (or any key) -> BuildResult, each built on first use: a run builds only what its
    selected tests ask for."""

    def __init__(self, make) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.make = make

    def __missing__(self, family: str):  # type: ignore[no-untyped-def]
        self[family] = self.make(family)
        return self[family]


@pytest.fixture(scope="session")
def bundles(tiny_dirs, tmp_path_factory):
    """ExecuTorch (android profile), fp32, the tiny families."""
    root = tmp_path_factory.mktemp("bundles")
    return Built(lambda f: build_bundle(get_profile("android"), tiny_dirs[f], PRESETS.get("fp32"), root / f, context=CONTEXT))


@pytest.fixture(scope="session")
def ort_bundles(tiny_dirs, tmp_path_factory):
    """ONNX Runtime (desktop-cpu profile), fp32, the tiny families."""
    root = tmp_path_factory.mktemp("ort-bundles")
    return Built(lambda f: build_bundle(get_profile("desktop-cpu"), tiny_dirs[f], PRESETS.get("fp32"), root / f, context=CONTEXT))


@pytest.fixture(scope="session")
def quant_bundles(tiny_dirs, tmp_path_factory):
    """Quantized bundles, built on first use: (profile, family, preset) -> BuildResult."""
    root = tmp_path_factory.mktemp("qbundles")
    built = Built(lambda key: build_bundle(get_profile(key[0]), tiny_dirs[key[1]], PRESETS.get(key[2]), root / "-".join(key), context=CONTEXT))
    return lambda profile, family, preset: built[(profile, family, preset)]


@pytest.fixture(scope="session")
def trt_bundles(tiny_dirs, tmp_path_factory):
    """TensorRT (jetson-orin-nano profile), fp16, the tiny families: the graphs TensorRT parses,
    replayed on ONNX Runtime."""
    root = tmp_path_factory.mktemp("trt-bundles")
    return Built(lambda f: build_bundle(get_profile("jetson"), tiny_dirs[f], PRESETS.get("fp16"), root / f, context=CONTEXT))


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
        import torch

        result, et_result = _quant_result_of(onnx_build), _quant_result_of(et_build)
        assert et_result.source_fingerprint == result.source_fingerprint
        m_onnx, m_et = read_manifest(onnx_build.bundle), read_manifest(et_build.bundle)
        seen = set()
        for name, comp in m_onnx.components.items():
            tensors, et_tensors = result.for_component(name), et_result.for_component(name)
            _holds_exactly(tensors, read_component([onnx_build.bundle / f for f in comp.files]), f"{name} (onnx)")
            _holds_exactly(et_tensors, read_pte(et_build.bundle / m_et.components[name].files[0]), f"{name} (pte)")
            # One quantization for both, except a tied head: ExecuTorch stores it as its table's codes
            # (once), ONNX Runtime as a linear of its own.
            assert set(et_tensors) == set(tensors), name
            for path, t in tensors.items():
                table = et_result.shares(f"{name}.{path}")
                want = et_tensors[table[len(name) + 1:]] if table else t
                assert torch.equal(et_tensors[path].q, want.q) and torch.equal(et_tensors[path].scale, want.scale), (name, path)
                assert not result.shares(f"{name}.{path}"), (name, path)
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
    return Built(lambda f: build_bundle(get_profile("iphone"), tiny_dirs[f], PRESETS.get(presets[f]), root / f, context=CONTEXT))
