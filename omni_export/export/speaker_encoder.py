"""Synthetic stand-ins for CosyVoice2's released ONNX front-end models, each under its release
file name and contract, written as ONNX as released; the runtime runs the files as they are,
whatever their graphs, so only the contracts have to match:

- the speaker encoder ``campplus.onnx`` (CAM++ from 3D-Speaker): fbank [batch, frames, 80] ->
  embedding [batch, 192]; inside, a small TDNN with statistics pooling (CAM++'s outline, not its
  layers);
- the speech tokenizer ``speech_tokenizer_v2.onnx`` (S3Tokenizer v2): Whisper log-mel [1, 128,
  frames] (100 Hz) and its length [1] (int32) -> speech tokens [1, frames / 4] (25 Hz, 6561
  codes); inside, a strided conv and an argmax over a codebook."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from omni_export.files import staged_file
from omni_export.targets.base import library_chatter

FILE = "campplus.onnx"


class _CamPlusLike(nn.Module):
    def __init__(self, bins: int, channels: int, dim: int) -> None:
        super().__init__()
        self.tdnn = nn.Sequential(
            nn.Conv1d(bins, channels, 5, padding=2), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, padding=3, dilation=3), nn.ReLU(),
        )  # fmt: skip
        self.dense = nn.Linear(2 * channels, dim)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        h = self.tdnn(fbank.transpose(1, 2))
        stats = torch.cat([h.mean(dim=-1), h.std(dim=-1)], dim=-1)
        return self.dense(stats)


def write_speaker_encoder(path: Path, gen: torch.Generator, dim: int = 192, bins: int = 80, channels: int = 64) -> Path:
    model = _CamPlusLike(bins, channels, dim).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (p.shape[-1] if p.dim() > 1 else 1) ** -0.5)
    frames = torch.export.Dim("frames", min=8, max=30000)
    with torch.no_grad(), library_chatter("torch.onnx", stdout=True):
        program = torch.onnx.export(model, (torch.randn(1, 200, bins),), dynamo=True, input_names=["input"], output_names=["output"],
                                    dynamic_shapes=({1: frames},), verbose=False)  # fmt: skip
    with staged_file(path) as tmp:
        program.save(str(tmp))
    return path


TOKENIZER_FILE = "speech_tokenizer_v2.onnx"


class _S3TokenizerLike(nn.Module):
    def __init__(self, bins: int, codes: int, channels: int = 32) -> None:
        super().__init__()
        self.conv = nn.Conv1d(bins, channels, 4, stride=4)
        self.codebook = nn.Linear(channels, codes)

    def forward(self, feats: torch.Tensor, feats_length: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(feats)).transpose(1, 2)
        return self.codebook(h).argmax(dim=-1)


def write_speech_tokenizer(path: Path, gen: torch.Generator, codes: int = 6561, bins: int = 128) -> Path:
    model = _S3TokenizerLike(bins, codes).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    frames = torch.export.Dim("frames4", min=2, max=750) * 4
    with torch.no_grad(), library_chatter("torch.onnx", stdout=True):
        program = torch.onnx.export(model, (torch.randn(1, bins, 400), torch.tensor([400], dtype=torch.int32)), dynamo=True,
                                    input_names=["feats", "feats_length"], output_names=["indices"],
                                    dynamic_shapes=({2: frames}, None), verbose=False)  # fmt: skip
    with staged_file(path) as tmp:
        program.save(str(tmp))
    return path
