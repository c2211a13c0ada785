"""Benchmarks run by hand (``.venv/bin/python -m pytest benchmarks -p no:cacheprovider``), never by CI.

The small demo bundle is built once into the omni-export cache (or taken from
OMNI_BENCH_BUNDLE) together with the small demo checkpoint it came from."""

import os
from pathlib import Path

import pytest
import torch

from omni_export import api
from omni_export.compiler import build_bundle
from omni_export.export.checkpoint import load_checkpoint
from omni_export.profiles import get_profile
from omni_export.quantize.presets import PRESETS


def pytest_collection_modifyitems(items):
    for item in items:  # the project's addopts deselects slow; benchmarks are chosen explicitly
        item.own_markers = [m for m in item.own_markers if m.name != "slow"]


@pytest.fixture(scope="session")
def demo_checkpoint() -> Path:
    return api.demo_checkpoint()


@pytest.fixture(scope="session")
def small_bundle(demo_checkpoint) -> Path:
    env = os.environ.get("OMNI_BENCH_BUNDLE")
    if env:
        return Path(env)
    path = api.cache_dir() / "bench-android-bundle"
    if not (path / "manifest.json").is_file():
        build_bundle(get_profile("android"), demo_checkpoint, PRESETS.get("fp32"), path, overwrite=True)
    return path


@pytest.fixture(scope="session")
def eager_small(demo_checkpoint):
    return load_checkpoint(demo_checkpoint, dtype=torch.float32)


@pytest.fixture(scope="session")
def demo_bundle(demo_checkpoint):
    """The demo checkpoint's bundle at a preset for a profile (default android; the main job's
    default preset is int4), built once into the cache."""

    def get(preset: str, profile: str = "android") -> Path:
        path = api.cache_dir() / (f"bench-android-{preset}" if profile == "android" else f"bench-{profile}-{preset}")
        if not (path / "manifest.json").is_file():
            build_bundle(get_profile(profile), demo_checkpoint, PRESETS.get(preset), path, overwrite=True)
        return path

    return get
