"""Voice cloning's speaker encoder: CosyVoice2's front end turns a reference recording into a
speaker embedding with CAM++ (``campplus.onnx``, which InteractiveOmni ships beside its weights)
over Kaldi-style 80-bin log-mel filterbanks with the utterance mean removed; the flow's
``speaker`` method then conditions the speech on it.

The released encoder is an ONNX file and runs as one, through ONNX Runtime, on every target's
host runtime (on a phone: ONNX Runtime Mobile); it runs once per reference voice, not per token."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from omni_export.errors import CheckpointError, InputError
from omni_export.runtime_py.audio import read_audio

SAMPLE_RATE = 16000
FBANK_BINS = 80
MIN_SECONDS = 0.5  # shorter than this, a speaker embedding says little about the voice


def _mel(f: np.ndarray) -> np.ndarray:
    return 1127.0 * np.log(1.0 + f / 700.0)


@lru_cache(maxsize=4)
def _mel_banks(bins: int, n_fft: int, sample_rate: int, low: float = 20.0) -> np.ndarray:
    """Kaldi's triangular filters, spaced evenly on its mel scale: [bins, n_fft // 2 + 1]."""
    lo, hi = _mel(np.float64(low)), _mel(np.float64(sample_rate / 2))
    delta = (hi - lo) / (bins + 1)
    left = lo + np.arange(bins)[:, None] * delta
    centre, right = left + delta, left + 2 * delta
    mel = _mel(np.arange(n_fft // 2) * sample_rate / n_fft)[None]
    up, down = (mel - left) / (centre - left), (right - mel) / (right - centre)
    banks = np.maximum(0.0, np.minimum(up, down))
    return np.pad(banks, ((0, 0), (0, 1)))  # kaldi leaves the Nyquist bin out of every filter


def kaldi_fbank(wav: np.ndarray, sample_rate: int = SAMPLE_RATE, bins: int = FBANK_BINS) -> np.ndarray:
    """Log-mel filterbank energies as Kaldi's ``compute-fbank`` (and torchaudio's
    ``compliance.kaldi.fbank``) give them with dither 0: 25 ms Povey-windowed frames every 10 ms,
    edges snipped, DC removed, pre-emphasis 0.97, 512-point power spectrum. [frames, bins]."""
    length, shift = int(sample_rate * 0.025), int(sample_rate * 0.010)
    if len(wav) < length:
        raise InputError(f"the reference voice is {len(wav) / sample_rate * 1000:.0f} ms long; a speaker embedding needs at least 25 ms "
                         f"(give {MIN_SECONDS} s or more)")  # fmt: skip
    n_fft = 1 << (length - 1).bit_length()
    n = 1 + (len(wav) - length) // shift
    idx = np.arange(length)[None] + shift * np.arange(n)[:, None]
    frames = wav.astype(np.float64)[idx]
    frames -= frames.mean(axis=1, keepdims=True)
    frames = frames - 0.97 * np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / (length - 1))) ** 0.85
    power = np.abs(np.fft.rfft(frames * window, n=n_fft)) ** 2
    energies = power @ _mel_banks(bins, n_fft, sample_rate).T
    return np.log(np.maximum(energies, np.finfo(np.float32).eps)).astype(np.float32)


class SpeakerEncoder:
    """A CAM++ ONNX file: fbank [1, frames, 80] -> embedding [1, dim]."""

    def __init__(self, path: str | Path, dim: int) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise CheckpointError(f"cannot open the speaker encoder {self.path}: {str(exc)[:200]}. "
                                  "The file is damaged; copy campplus.onnx from the release again.") from None  # fmt: skip
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape_in, shape_out = inputs[0].shape if inputs else [], outputs[0].shape if outputs else []
        if len(inputs) != 1 or len(shape_in) != 3 or shape_in[-1] != FBANK_BINS or not outputs or shape_out[-1] != dim:
            raise CheckpointError(f"{self.path} is not a speaker encoder this model can use: it takes "
                                  f"{[(i.name, i.shape) for i in inputs]} and gives {[(o.name, o.shape) for o in outputs]}; "
                                  f"expected one input [batch, frames, {FBANK_BINS}] and an output [batch, {dim}] (CAM++)")  # fmt: skip
        self.input, self.dim = inputs[0].name, dim

    def embed(self, wav: np.ndarray) -> np.ndarray:
        """16 kHz mono samples -> embedding [dim] (float32)."""
        if len(wav) < MIN_SECONDS * SAMPLE_RATE:
            raise InputError(f"the reference voice is {len(wav) / SAMPLE_RATE:.2f} s long; give at least {MIN_SECONDS} s of speech")
        feat = kaldi_fbank(wav)
        feat -= feat.mean(axis=0, keepdims=True)
        out = self.session.run(None, {self.input: feat[None]})[0]
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def embed_file(self, path: str | Path) -> np.ndarray:
        return self.embed(read_audio(path, SAMPLE_RATE))
