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


@pytest.fixture
def copy(tiny_dirs, tmp_path):
    """A writable copy of a tiny checkpoint, to break."""
    def make(family: str):
        dst = tmp_path / family
        shutil.copytree(tiny_dirs[family], dst)
        return dst

    return make


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
def voice_wav(tmp_path_factory) -> Path:
    """A reference voice for cloning: another espeak-ng voice (female variant), 22.05 kHz."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (the README's test line installs it with apt-get)")
    path = tmp_path_factory.mktemp("voice") / "reference.wav"
    subprocess.run(["espeak-ng", "-v", "en+f3", "-w", str(path), "Hello there, this is how I sound when I speak."], check=True)
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


def write_clip(path: Path, frames: int = 30, fps: int = 10, size: tuple[int, int] = (160, 120)) -> Path:
    """An MP4 (MPEG-4 part 2, FFmpeg's own encoder) whose frame k is flat grey at level 8k, so a
    decoded frame says which one it is."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for k in range(frames):
            img = np.full((size[1], size[0], 3), 8 * k, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="session")
def clip(tmp_path_factory) -> Path:
    """3 s at 10 fps, 4:3."""
    return write_clip(tmp_path_factory.mktemp("video") / "clip.mp4")
