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
