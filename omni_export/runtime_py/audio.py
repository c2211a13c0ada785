"""Audio in and out: reading, validating and resampling wavs, and the two feature front ends
(Whisper log-mel, Kaldi fbank) as nn.Modules so they can be traced as components of their own."""

from __future__ import annotations

import functools
import math
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omni_export.errors import AudioInputError

# Ratios beyond this are almost certainly a mislabelled file, not audio worth resampling.
_MAX_RESAMPLE_RATIO = 48


def read_audio(path: str | os.PathLike, sample_rate: int) -> np.ndarray:
    """Read a sound file as mono float32 at ``sample_rate`` (resampled when needed)."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise AudioInputError(f"audio file {path} does not exist")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises its own LibsndfileError and RuntimeError
        raise AudioInputError(
            f"cannot decode audio file {path}: {exc}. Give a wav/flac/ogg file (convert with `sox in.x out.wav`)."
        ) from None
    return prepare_audio(data.mean(axis=1), sr, sample_rate, source=str(path))


def prepare_audio(samples: np.ndarray, sr: int, sample_rate: int, source: str = "audio") -> np.ndarray:
    """Validate (non-empty, finite) and resample mono samples to ``sample_rate``."""
    return resample(check_samples(samples, source), sr, sample_rate, source)


def check_samples(samples: np.ndarray, source: str = "audio") -> np.ndarray:
    """Mono, non-empty, finite float32 samples, or an AudioInputError saying what is wrong."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 1:
        raise AudioInputError(f"{source}: expected mono samples, got shape {samples.shape}")
    if samples.size == 0:
        raise AudioInputError(f"{source} is empty (0 samples); record or pass a non-empty clip.")
    if not np.isfinite(samples).all():
        raise AudioInputError(f"{source} contains NaN or infinite samples; the file is corrupt.")
    return samples


RESAMPLE_QUALITY = "HQ"  # soxr's high quality: offline and streaming use the same filter


def _check_rate(sr: int, target: int, source: str) -> None:
    if sr <= 0:
        raise AudioInputError(f"{source}: invalid sample rate {sr}")
    ratio = Fraction(target, sr)
    if max(ratio, 1 / ratio) > _MAX_RESAMPLE_RATIO:
        raise AudioInputError(
            f"{source}: sample rate {sr} Hz cannot be resampled to {target} Hz (ratio beyond "
            f"1:{_MAX_RESAMPLE_RATIO}); the file's rate is probably wrong. Re-encode it at {target} Hz."
        )


def resample(samples: np.ndarray, sr: int, target: int, source: str = "audio") -> np.ndarray:
    """A whole clip at ``target`` Hz (soxr, the filter ``StreamResampler`` runs chunk by chunk)."""
    if sr == target:
        return samples
    _check_rate(sr, target, source)
    import soxr

    out = soxr.resample(np.ascontiguousarray(samples, dtype=np.float32), sr, target, quality=RESAMPLE_QUALITY).astype(np.float32)
    if out.size == 0:
        raise AudioInputError(f"{source} is too short to resample from {sr} Hz to {target} Hz")
    return out


class StreamResampler:
    """Microphone chunks at ``sr`` Hz -> ``target`` Hz with the filter's state kept across chunks
    (soxr's streaming resampler), so the concatenated output is the offline resample of the whole
    stream: resampling each chunk on its own would put an edge at every chunk boundary. The
    filter's delay holds back a few milliseconds until ``flush``."""

    def __init__(self, sr: int, target: int, source: str = "audio stream") -> None:
        import soxr

        _check_rate(sr, target, source)
        self.sr, self.target = sr, target
        self._stream = soxr.ResampleStream(sr, target, 1, dtype="float32", quality=RESAMPLE_QUALITY)

    def push(self, samples: np.ndarray) -> np.ndarray:
        return self._stream.resample_chunk(np.ascontiguousarray(samples, dtype=np.float32))

    def flush(self) -> np.ndarray:
        """The held-back tail; the stream ends here."""
        return self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)


def pad_to_multiple(x: torch.Tensor, axis: int, multiple: int) -> torch.Tensor:
    """Pad features on the right along ``axis`` to a multiple of an encoder's stride, with the
    clip's floor value (silence in log-mel and fbank alike)."""
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [0, 0] * (x.dim() - 1 - axis % x.dim()) + [0, pad]
    return F.pad(x, widths, value=float(x.min()))


def write_wav(path: str | os.PathLike, samples: np.ndarray, sample_rate: int) -> Path:
    """Write 16-bit PCM atomically (temp file + rename)."""
    import soundfile as sf

    from omni_export.files import staged_file

    with staged_file(Path(path)) as tmp:
        sf.write(str(tmp), np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
    return Path(path)


def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = f / f_sp
    min_log_hz = 1000.0
    logstep = math.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_hz / f_sp + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mels)


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3
    min_log_mel = 1000.0 / f_sp
    logstep = math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, 1000.0 * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def slaney_mel_filters(sr: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """[n_mels, n_fft//2+1] slaney-normalised triangular filters from ``fmin`` to ``fmax`` (default
    sr / 2): librosa's default filterbank, the one Whisper and Matcha-TTS use."""
    fft_freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    top = sr / 2 if fmax is None else fmax
    mel_pts = _mel_to_hz_slaney(np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(top), n_mels + 2))
    fdiff = np.diff(mel_pts)
    ramps = mel_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_pts[2 : n_mels + 2] - mel_pts[:n_mels]))[:, None]
    return weights.astype(np.float32)


def power_spectrum(frames: torch.Tensor, n_fft: int, form: str = "fft") -> torch.Tensor:
    """|rfft(frames, n_fft)|^2 [..., n_fft // 2 + 1]. ``form="matmul"``: the same as two matmuls
    over the DFT basis (a constant), the form a graph compiler without an FFT op takes
    (TensorRT has no DFT); equal to fp32 rounding."""
    if form == "fft":
        return torch.fft.rfft(frames, n=n_fft).abs() ** 2
    cos, sin = _dft_basis(frames.shape[-1], n_fft)
    re, im = frames @ cos.to(frames.dtype), frames @ sin.to(frames.dtype)
    return re * re + im * im


def frames_of(x: torch.Tensor, size: int, hop: int, form: str = "fft") -> torch.Tensor:
    """Frames [n, size] of a 1-D signal every ``hop`` samples (``x.unfold``). ``form="matmul"``
    (an export form, with the matmul spectrum): the same frames gathered by index, for
    converters without unfold (Core ML)."""
    if form == "fft":
        return x.unfold(0, size, hop)
    n = (x.shape[0] - size) // hop + 1
    return x[torch.arange(n, device=x.device)[:, None] * hop + torch.arange(size, device=x.device)[None]]


@functools.lru_cache(maxsize=8)
def _dft_basis_np(length: int, n_fft: int) -> tuple[np.ndarray, np.ndarray]:
    angle = 2 * np.pi * np.arange(length)[:, None] * np.arange(n_fft // 2 + 1)[None] / n_fft
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def _dft_basis(length: int, n_fft: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the real DFT [length, n_fft // 2 + 1], computed in float64 by NumPy: a
    traced graph holds them as constants (Core ML has no float64 to compute them in). Cached as
    NumPy, never as tensors: a tensor made while tracing is a fake one."""
    cos, sin = _dft_basis_np(length, n_fft)
    return torch.from_numpy(cos), torch.from_numpy(sin)


@functools.lru_cache(maxsize=8)
def _hann_np(n: int) -> np.ndarray:
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32)


def periodic_hann(n: int, device: torch.device | None = None) -> torch.Tensor:
    """torch.hann_window(n, periodic=True), as a constant (Core ML has no hann_window)."""
    return torch.from_numpy(_hann_np(n)).to(device)


class WhisperLogMel(nn.Module):
    """Whisper's front end: STFT(n_fft 400, hop 160, hann) -> power -> mel -> log10 -> dynamic range 8.

    Input waveform [N] at 16 kHz -> features [1, n_mels, N // hop]. Unlike the Whisper feature
    extractor it does not pad to 30 s: the encoder accepts any length up to its positions.
    """

    def __init__(self, n_mels: int = 128, sample_rate: int = 16000, n_fft: int = 400, hop: int = 160) -> None:
        super().__init__()
        self.n_mels, self.sample_rate, self.n_fft, self.hop = n_mels, sample_rate, n_fft, hop
        self._filters = slaney_mel_filters(sample_rate, n_fft, n_mels)
        self.dft = "fft"  # or "matmul" (see power_spectrum), set by a target while it traces

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        window = periodic_hann(self.n_fft, wav.device)
        # STFT as reflect-pad + unfold + rfft: torch.stft's internal reshape adds a shape guard
        # that torch.export cannot prove for a dynamic length. Whisper drops the last frame.
        half = self.n_fft // 2
        x = F.pad(wav.float()[None, None], (half, half), mode="reflect")[0, 0]
        frames = frames_of(x, self.n_fft, self.hop, self.dft)[: wav.shape[0] // self.hop]
        power = power_spectrum(frames * window, self.n_fft, self.dft).T
        mel = torch.from_numpy(self._filters).to(wav.device) @ power
        log_spec = torch.clamp(mel, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        return ((log_spec + 4.0) / 4.0)[None]


def kaldi_mel_banks(n_mels: int, n_fft: int, sr: int, low: float = 20.0, high: float = 0.0) -> np.ndarray:
    """Kaldi's mel banks [n_mels, n_fft//2] (no normalisation, mel = 1127 ln(1 + f/700))."""
    high = sr / 2 + high if high <= 0 else high
    mel = lambda f: 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)  # noqa: E731
    lo, hi = mel(low), mel(high)
    delta = (hi - lo) / (n_mels + 1)
    bins = mel(np.arange(n_fft // 2) * sr / n_fft)
    left = lo + np.arange(n_mels)[:, None] * delta
    center, right = left + delta, left + 2 * delta
    up = (bins[None, :] - left) / (center - left)
    down = (right - bins[None, :]) / (right - center)
    return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


class KaldiFbank(nn.Module):
    """Kaldi-compatible log mel filterbank (25 ms / 10 ms, povey window, pre-emphasis 0.97, DC
    removal, snip edges), as WeNet and VITA's Whale encoder compute it, on int16-scaled samples."""

    def __init__(self, n_mels: int = 80, sample_rate: int = 16000, frame_ms: float = 25.0, shift_ms: float = 10.0) -> None:
        super().__init__()
        self.n_mels, self.sample_rate = n_mels, sample_rate
        self.win = int(sample_rate * frame_ms / 1000)
        self.shift = int(sample_rate * shift_ms / 1000)
        self.n_fft = 1 << (self.win - 1).bit_length()
        self._banks = kaldi_mel_banks(n_mels, self.n_fft, sample_rate)
        self.dft = "fft"  # or "matmul" (see power_spectrum), set by a target while it traces

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """wav [N] (float, -1..1) -> [1, frames, n_mels]."""
        x = wav.float() * 32768.0
        frames = frames_of(x, self.win, self.shift, self.dft)
        frames = frames - frames.mean(dim=-1, keepdim=True)
        prev = torch.cat([frames[:, :1], frames[:, :-1]], dim=-1)
        frames = frames - 0.97 * prev
        n = torch.arange(self.win, dtype=torch.float32, device=wav.device)
        window = (0.5 - 0.5 * torch.cos(2 * math.pi * n / (self.win - 1))) ** 0.85
        spec = power_spectrum(frames * window, self.n_fft, self.dft)
        mel = spec[:, : self.n_fft // 2] @ torch.from_numpy(self._banks).to(wav.device).T
        eps = torch.finfo(torch.float32).eps
        return torch.clamp(mel, min=eps).log()[None]
