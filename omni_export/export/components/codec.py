"""VITA-1.5's codec decoder (TiCodec-style): codebook lookup of 1024 codes at 40 Hz plus
time-invariant global tokens, convolutional upsampling x600 (8*5*5*3) to 24 kHz."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omni_export.export.components.base import Component, Role
from omni_export.export.trace_specs import F32, I64, Call, MethodSpec, Tensor, dim


@dataclass(frozen=True)
class CodecConfig:
    codebook_size: int = 1024
    code_dim: int = 512
    global_vocab: int = 1024
    n_global: int = 8
    channels: int = 512
    upsample_rates: tuple[int, ...] = (8, 5, 5, 3)
    sample_rate: int = 24000

    @property
    def hop(self) -> int:
        out = 1
        for r in self.upsample_rates:
            out *= r
        return out


class ResidualUnit(nn.Module):
    def __init__(self, ch: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(ch, ch, 7, dilation=dilation, padding=3 * dilation)
        self.conv2 = nn.Conv1d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.elu(self.conv1(F.elu(x))))


class UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, rate: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose1d(c_in, c_out, 2 * rate, rate, padding=(rate + 1) // 2, output_padding=rate % 2)
        self.res = nn.Sequential(*(ResidualUnit(c_out, d) for d in (1, 3, 9)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res(self.up(F.elu(x)))


class CodecDecoder(Component, nn.Module):
    role = Role.VOCODER

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.code_dim)
        self.global_codebook = nn.Embedding(cfg.global_vocab, cfg.code_dim)
        self.global_proj = nn.Linear(cfg.code_dim, cfg.channels)
        self.conv_pre = nn.Conv1d(cfg.code_dim, cfg.channels, 7, padding=3)
        blocks, ch = [], cfg.channels
        for r in cfg.upsample_rates:
            blocks.append(UpBlock(ch, ch // 2, r))
            ch //= 2
        self.blocks = nn.ModuleList(blocks)
        self.conv_post = nn.Conv1d(ch, 1, 7, padding=3)
        # Global (time-invariant) tokens of the default voice.
        self.register_buffer("default_global_codes", torch.zeros(cfg.n_global, dtype=torch.long))

    def forward(self, codes: torch.Tensor, global_codes: torch.Tensor) -> torch.Tensor:
        """codes [1, T] (0..1023), global_codes [1, n_global] -> waveform [1, T * 600]."""
        x = self.conv_pre(self.codebook(codes).transpose(1, 2))
        g = self.global_proj(self.global_codebook(global_codes).mean(dim=1))
        x = x + g[:, :, None]
        for blk in self.blocks:
            x = blk(x)
        return torch.tanh(self.conv_post(F.elu(x))).squeeze(1)

    # -- as a component ---------------------------------------------------------------------
    def export_methods(self, limits):  # type: ignore[no-untyped-def]
        c = self.cfg
        codes = dim("codes", 2, limits.max_speech_tokens)
        return [MethodSpec("forward", Call(self), (torch.randint(0, c.codebook_size, (1, 40)), torch.randint(0, c.global_vocab, (1, c.n_global))),
                           ({1: codes}, None),
                           (Tensor("codes", I64, (1, "codes")), Tensor("global_codes", I64, (1, c.n_global))),
                           (Tensor("wav", F32, (1, f"codes*{c.hop}")),))]  # fmt: skip

    def golden_script(self, ctx, ref):  # type: ignore[no-untyped-def]
        g = torch.Generator().manual_seed(ctx.seed)
        codes = torch.randint(0, self.cfg.codebook_size, (1, 40), generator=g)
        return [("forward", (codes, self.default_global_codes.detach()[None].clone()))]
