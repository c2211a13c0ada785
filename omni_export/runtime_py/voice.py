"""Voice cloning, as CosyVoice2's front end prepares a reference recording: a speaker embedding
from CAM++ (``campplus.onnx``, which InteractiveOmni ships beside its weights) over Kaldi 80-bin
log-mel filterbanks (25/10 ms Povey frames, dither 0) with the utterance mean removed, which the
flow's ``speaker`` method turns into its condition; and, where the checkpoint also ships
CosyVoice2's speech tokenizer (``speech_tokenizer_v2.onnx``), the prompt speech: its speech tokens
(25 Hz, from Whisper's 128-bin log-mel) and its 24 kHz mel (Matcha-TTS's: n_fft 1920, hop 480,
80 bins to 8 kHz, natural log), trimmed to two frames per token, which lead the reply's tokens
and condition the flow's first frames (CosyVoice2's zero-shot flow input).

The released models are ONNX files and run as such, through ONNX Runtime, on every target's
host runtime (on a phone: ONNX Runtime Mobile); it runs once per reference voice, not per token."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from omni_export.errors import CheckpointError, InputError
from dataclasses import dataclass

from omni_export.runtime_py.audio import KaldiFbank, WhisperLogMel, read_audio, resample, slaney_mel_filters

SAMPLE_RATE = 16000
FBANK_BINS = 80
MIN_SECONDS = 0.5  # shorter than this, a speaker embedding says little about the voice


def _session(path: Path, what: str):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise CheckpointError(f"cannot open the {what} {path}: {str(exc)[:200]}. "
                              f"The file is damaged; copy {path.name} from the release again.") from None  # fmt: skip


class SpeakerEncoder:
    """A CAM++ ONNX file: fbank [1, frames, 80] -> embedding [1, dim]."""

    def __init__(self, path: str | Path, dim: int) -> None:
        self.path = Path(path)
        self.session = _session(self.path, "speaker encoder")
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
        # CosyVoice2 feeds torchaudio's kaldi.fbank the -1..1 samples; KaldiFbank scales them to
        # int16 first (as WeNet does), so hand it samples scaled down by the same factor.
        feat = KaldiFbank(FBANK_BINS, SAMPLE_RATE)(torch.from_numpy(wav.astype(np.float32) / 32768.0))[0].numpy()
        feat -= feat.mean(axis=0, keepdims=True)
        out = self.session.run(None, {self.input: feat[None]})[0]
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def embed_file(self, path: str | Path) -> np.ndarray:
        return self.embed(read_audio(path, SAMPLE_RATE))


TOKENIZER_BINS = 128
TOKENIZER_MAX_SECONDS = 30  # the release refuses longer prompts (its frontend's own limit)
PROMPT_RATE = 24000  # the flow's mel: Matcha-TTS's mel_spectrogram as cosyvoice2.yaml sets it
PROMPT_N_FFT, PROMPT_HOP, PROMPT_FMAX = 1920, 480, 8000


class SpeechTokenizer:
    """CosyVoice2's S3 tokenizer ONNX file: Whisper log-mel [1, 128, frames] + its length [1]
    (int32) -> speech tokens [1, frames / 4]."""

    def __init__(self, path: str | Path, vocab: int) -> None:
        self.path, self.vocab = Path(path), vocab
        self.session = _session(self.path, "speech tokenizer")
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 2 or len(inputs[0].shape) != 3 or inputs[0].shape[1] != TOKENIZER_BINS or len(outputs) != 1:
            raise CheckpointError(f"{self.path} is not a speech tokenizer this model can use: it takes "
                                  f"{[(i.name, i.shape) for i in inputs]} and gives {[(o.name, o.shape) for o in outputs]}; "
                                  f"expected log-mel [1, {TOKENIZER_BINS}, frames] and its length [1], giving tokens [1, n] "
                                  "(CosyVoice2's speech_tokenizer_v2.onnx)")  # fmt: skip
        self.names = [i.name for i in inputs]

    def tokens(self, wav: np.ndarray) -> list[int]:
        """16 kHz mono samples -> speech tokens (25 Hz)."""
        if len(wav) > TOKENIZER_MAX_SECONDS * SAMPLE_RATE:
            raise InputError(f"the reference voice is {len(wav) / SAMPLE_RATE:.1f} s long; the speech tokenizer takes at most "
                             f"{TOKENIZER_MAX_SECONDS} s (as CosyVoice2's front end): cut it")  # fmt: skip
        with torch.no_grad():
            feats = WhisperLogMel(TOKENIZER_BINS, SAMPLE_RATE)(torch.from_numpy(wav.astype(np.float32))).numpy()
        out = self.session.run(None, {self.names[0]: feats, self.names[1]: np.array([feats.shape[2]], dtype=np.int32)})[0]
        tokens = np.asarray(out).reshape(-1).astype(np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab):
            raise CheckpointError(f"{self.path} gave speech tokens outside 0..{self.vocab - 1}; it is not this model's tokenizer")
        return tokens.tolist()


def prompt_mel(wav: np.ndarray) -> torch.Tensor:
    """16 kHz mono samples -> the flow's mel [80, frames] at 50 Hz: resampled to 24 kHz, reflect-
    padded by (n_fft - hop) / 2, STFT without centring (periodic Hann), magnitude, slaney mel to
    8 kHz, log of at least 1e-5."""
    x = torch.from_numpy(resample(wav, SAMPLE_RATE, PROMPT_RATE, "the reference voice"))
    pad = (PROMPT_N_FFT - PROMPT_HOP) // 2
    x = F.pad(x[None, None], (pad, pad), mode="reflect")[0, 0]
    spec = torch.stft(x, PROMPT_N_FFT, PROMPT_HOP, PROMPT_N_FFT, window=torch.hann_window(PROMPT_N_FFT), center=False,
                      return_complex=True)  # fmt: skip
    mag = torch.sqrt(spec.real**2 + spec.imag**2 + 1e-9)
    mel = torch.from_numpy(slaney_mel_filters(PROMPT_RATE, PROMPT_N_FFT, 80, 0.0, PROMPT_FMAX)) @ mag
    return torch.log(torch.clamp(mel, min=1e-5))


@dataclass(frozen=True)
class VoicePrompt:
    """The reference speech that leads a reply through the flow: its tokens and two mel frames each."""

    tokens: tuple[int, ...]
    mel: torch.Tensor  # [80, 2 * len(tokens)]


def voice_prompt(tokenizer: SpeechTokenizer, wav: np.ndarray, ratio: int = 2) -> VoicePrompt:
    tokens, mel = tokenizer.tokens(wav), prompt_mel(wav)
    n = min(mel.shape[1] // ratio, len(tokens))  # as CosyVoice2's frontend trims them to each other
    if n == 0:
        raise InputError("the reference voice gave no speech tokens; give at least a second of speech")
    return VoicePrompt(tuple(tokens[:n]), mel[:, : ratio * n].contiguous())
