import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from omni_export.export.checkpoint import load_checkpoint
from omni_export.export.synthetic import write_synthetic

FAMILY_NAMES = ("interactiveomni", "vita15")


@pytest.fixture(scope="session", autouse=True)
def _hermetic_cache(tmp_path_factory):
    """Quantization results and trained fixtures go to a per-run cache, never the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("OMNI_EXPORT_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {f: write_synthetic(f, "tiny", root / f"{f}-tiny", seed=0) for f in FAMILY_NAMES}


@pytest.fixture(scope="session")
def tiny(tiny_dirs):
    return {f: load_checkpoint(p, dtype=torch.float32) for f, p in tiny_dirs.items()}


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory) -> Path:
    """A real spoken question from espeak-ng (22.05 kHz, so the pipeline must resample)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (the README's test line installs it with apt-get)")
    path = tmp_path_factory.mktemp("audio") / "question.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "What is shown in this picture?"], check=True)
    return path


@pytest.fixture(scope="session")
def photo(tmp_path_factory) -> Path:
    """A deterministic non-square test image (3:2)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:300, 0:450]
    arr = np.stack([(x % 64) * 4, (y % 32) * 8, rng.integers(0, 255, x.shape)], -1).astype(np.uint8)
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(arr).save(path)
    return path
