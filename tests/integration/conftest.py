import pytest

from omni_export.compiler import build_bundle
from omni_export.profiles import get_profile
from omni_export.quantize.presets import PRESETS

CONTEXT = 320


@pytest.fixture(scope="session")
def bundles(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    return {f: build_bundle(get_profile("android"), p, PRESETS.get("fp32"), root / f, context=CONTEXT) for f, p in tiny_dirs.items()}
