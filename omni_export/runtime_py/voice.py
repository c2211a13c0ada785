"""Voice cloning's speaker encoder: CosyVoice2's front end turns a reference recording into a
speaker embedding with CAM++ (``campplus.onnx``, which InteractiveOmni ships beside its weights)
over Kaldi 80-bin log-mel filterbanks (25/10 ms Povey frames, dither 0) with the utterance mean removed; the flow's
``speaker`` method then conditions the speech on it.

The released encoder is an ONNX file and runs as one, through ONNX Runtime, on every target's
host runtime (on a phone: ONNX Runtime Mobile); it runs once per reference voice, not per token."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from omni_export.errors import CheckpointError, InputError
from omni_export.runtime_py.audio import KaldiFbank, read_audio

SAMPLE_RATE = 16000
FBANK_BINS = 80
MIN_SECONDS = 0.5  # shorter than this, a speaker embedding says little about the voice


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
        # CosyVoice2 feeds torchaudio's kaldi.fbank the -1..1 samples; KaldiFbank scales them to
        # int16 first (as WeNet does), so hand it samples scaled down by the same factor.
        feat = KaldiFbank(FBANK_BINS, SAMPLE_RATE)(torch.from_numpy(wav.astype(np.float32) / 32768.0))[0].numpy()
        feat -= feat.mean(axis=0, keepdims=True)
        out = self.session.run(None, {self.input: feat[None]})[0]
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def embed_file(self, path: str | Path) -> np.ndarray:
        return self.embed(read_audio(path, SAMPLE_RATE))
