"""A synthetic stand-in for the released speaker encoder (CosyVoice2's ``campplus.onnx``, a CAM++
network from 3D-Speaker): the same file name and the same contract, fbank [batch, frames, 80] ->
embedding [batch, 192], written as ONNX as released. Inside it is a small TDNN with statistics
pooling (CAM++'s outline, not its layers): the runtime runs the file as it is, whatever its
graph, so only the contract has to match."""

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
