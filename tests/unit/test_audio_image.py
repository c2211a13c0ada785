import numpy as np
import pytest
import soundfile as sf

from omni_export.errors import AudioInputError, ImageInputError
from omni_export.runtime_py.audio import prepare_audio, read_audio, write_wav
from omni_export.runtime_py.image import (
    closest_grid,
    load_image,
    preprocess_image,
    tile_image,
)


def test_resamples_to_the_requested_rate(tmp_path):
    t = np.arange(8000) / 8000
    sf.write(tmp_path / "a.wav", 0.5 * np.sin(2 * np.pi * 440 * t), 8000)
    out = read_audio(tmp_path / "a.wav", 16000)
    assert out.dtype == np.float32 and len(out) == 16000
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spectrum) * 16000 / len(out) - 440) < 2  # still a 440 Hz tone


def test_stereo_is_mixed_to_mono(tmp_path):
    sf.write(tmp_path / "s.wav", np.stack([np.full(1600, 0.2), np.full(1600, 0.4)], 1), 16000)
    assert np.allclose(read_audio(tmp_path / "s.wav", 16000), 0.3, atol=1e-3)


@pytest.mark.parametrize(
    "samples,sr,match",
    [(np.zeros(0), 16000, "empty"), (np.array([0.1, np.nan, 0.2]), 16000, "NaN"), (np.ones(100), 100, "cannot be resampled")],
)
def test_bad_samples_are_clear_errors(samples, sr, match):
    with pytest.raises(AudioInputError, match=match):
        prepare_audio(samples, sr, 16000)


def test_unreadable_and_missing_audio(tmp_path):
    (tmp_path / "junk.wav").write_bytes(b"RIFF\x00\x00not really a wav")
    with pytest.raises(AudioInputError, match="cannot decode"):
        read_audio(tmp_path / "junk.wav", 16000)
    with pytest.raises(AudioInputError, match="does not exist"):
        read_audio(tmp_path / "nope.wav", 16000)


def test_zero_length_wav_file_is_an_error(tmp_path):
    sf.write(tmp_path / "empty.wav", np.zeros(0), 16000)
    with pytest.raises(AudioInputError, match="empty"):
        read_audio(tmp_path / "empty.wav", 16000)


def test_write_wav_is_24k_pcm16_and_leaves_no_temp(tmp_path):
    write_wav(tmp_path / "o.wav", np.linspace(-1, 1, 2400), 24000)
    info = sf.info(tmp_path / "o.wav")
    assert (info.samplerate, info.frames, info.subtype) == (24000, 2400, "PCM_16")
    assert [p.name for p in tmp_path.iterdir()] == ["o.wav"]


@pytest.mark.parametrize(
    "w,h,max_num,grid",
    [(448, 448, 12, (1, 1)), (896, 448, 12, (2, 1)), (450, 300, 12, (3, 2)), (300, 1200, 12, (1, 4)), (4000, 100, 6, (6, 1))],
)
def test_closest_aspect_ratio_grid(w, h, max_num, grid):
    assert closest_grid(w, h, 1, max_num, 448) == grid


def test_tiling_adds_thumbnail_and_normalises(photo):
    from PIL import Image

    img = Image.open(photo).convert("RGB")
    tiles = tile_image(img, 448, 12)
    assert len(tiles) == 3 * 2 + 1 and all(t.size == (448, 448) for t in tiles)
    arr = preprocess_image(photo, 112, 4)
    assert arr.shape[1:] == (3, 112, 112) and arr.dtype == np.float32
    assert -2.2 < arr.min() < 0 < arr.max() < 2.7  # ImageNet-normalised range
    square = Image.new("RGB", (448, 448))
    assert len(tile_image(square, 448, 12)) == 1  # one tile: no thumbnail


def test_undecodable_image(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ImageInputError, match="cannot decode"):
        load_image(tmp_path / "x.png")
