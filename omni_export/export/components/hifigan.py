"""HiFiGAN-style vocoder: 80-bin mel at 50 Hz -> 24 kHz waveform (x480: upsample 8*5*4*3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omni_export.export.components.base import Component, Role
from omni_export.export.trace_specs import F32, Call, MethodSpec, Tensor, dim, dtype_of


@dataclass(frozen=True)
class VocoderConfig:
    mel_bins: int = 80
    upsample_initial_channel: int = 512
    upsample_rates: tuple[int, ...] = (8, 5, 4, 3)
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilations: tuple[int, ...] = (1, 3, 5)
    sample_rate: int = 24000

    @property
    def hop(self) -> int:
        out = 1
        for r in self.upsample_rates:
            out *= r
        return out


class ResBlock(nn.Module):
    def __init__(self, ch: int, k: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(nn.Conv1d(ch, ch, k, dilation=d, padding=d * (k - 1) // 2) for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(ch, ch, k, padding=(k - 1) // 2) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, 0.1)), 0.1))
        return x


class HiFiGAN(Component, nn.Module):
    role = Role.VOCODER

    def __init__(self, cfg: VocoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(cfg.mel_bins, ch, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for i, u in enumerate(cfg.upsample_rates):
            c_in, c_out = ch // (2**i), ch // (2 ** (i + 1))
            # kernel 2u, padding ceil(u/2), output_padding u%2: exactly T*u samples for odd and even u.
            self.ups.append(nn.ConvTranspose1d(c_in, c_out, 2 * u, u, padding=(u + 1) // 2, output_padding=u % 2))
            for k in cfg.resblock_kernel_sizes:
                self.resblocks.append(ResBlock(c_out, k, cfg.resblock_dilations))
        self.conv_post = nn.Conv1d(ch // (2 ** len(cfg.upsample_rates)), 1, 7, padding=3)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [1, 80, T] -> waveform [1, T * hop]."""
        x = self.conv_pre(mel)
        nk = len(self.cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, 0.1))
            x = sum(self.resblocks[i * nk + j](x) for j in range(nk)) / nk
        return torch.tanh(self.conv_post(F.leaky_relu(x))).squeeze(1)

    # -- as a component ---------------------------------------------------------------------
    def export_methods(self, limits):  # type: ignore[no-untyped-def]
        c = self.cfg
        frames = dim("mel_frames", 2, limits.max_speech_tokens * 2)
        return [MethodSpec("forward", Call(self), (torch.randn(1, c.mel_bins, 50, dtype=dtype_of(self)),), ({2: frames},),
                           (Tensor("mel", F32, (1, c.mel_bins, "mel_frames")),), (Tensor("wav", F32, (1, f"mel_frames*{c.hop}")),))]  # fmt: skip

    def golden_script(self, ctx, ref):  # type: ignore[no-untyped-def]
        g = torch.Generator().manual_seed(ctx.seed)
        mel = torch.randn(1, self.cfg.mel_bins, 40, generator=g) * 2 - 4  # log-mel range
        return [("forward", (mel,))]
