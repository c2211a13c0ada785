"""VITA-1.5's "Whale" audio encoder: global CMVN, a Conv2dSubsampling4 core (``enc.0``), a pre-LN
transformer (``enc.1``: embed, pe, encoders, after_norm) with relative-position self-attention,
and the CNN adapter (Conv1d k5 s2 + LayerNorm + GELU + Linear) that brings it to 12.5 Hz in the
LLM width.

Module tree, names, epsilons and maths follow the release (VITA-1.5,
``vita/model/multimodal_encoder/whale/``: ``module/encoder/encoder.py``, ``module/layer/
subsampling.py``, ``module/component/transformer.py`` and ``attention.py``, ``adapter.py``;
read at the last upstream commit of the 1.5 tree): LayerNorms at torch's default eps, the
positional table only through ``linear_pos`` with the relative shift off, x sqrt(d) after the
transformer's embed. The release's attention mask is configured in a train.yaml that is not
public; its vLLM port uses full attention, and so does this."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omni_export.export.components.audio_encoder import AudioEncoderComponent
from omni_export.export.components.relpos import PositionwiseFeedForward, RelPositionAttention, sincos_rows
from omni_export.export.trace_specs import F32, Call, MethodSpec, Tensor, dim, dtype_of


@dataclass(frozen=True)
class WhaleConfig:
    input_dim: int = 80
    output_size: int = 1024
    attention_heads: int = 16
    linear_units: int = 4096
    num_blocks: int = 24
    adapter_hidden: int = 2048


LN_EPS = 1e-5  # every Whale LayerNorm is torch's default (the release's transformer.py)


def abs_positions(length: int, d: int, device: torch.device | None = None) -> torch.Tensor:
    """The release's RelPositionalEncoding table rows 0..T-1: [T, d]. It reaches attention only
    through ``linear_pos``."""
    return sincos_rows(torch.arange(length, device=device), d)


class GlobalCMVN(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("istd", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.istd


class Conv2dSubsampling4(nn.Module):
    """Two 3x3 stride-2 convs with ReLU, then a linear over channels x remaining bins (no scaling
    and no positions here: the transformer's ``embed`` and ``pe`` follow)."""

    def __init__(self, idim: int, odim: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, odim, 3, 2), nn.ReLU(), nn.Conv2d(odim, odim, 3, 2), nn.ReLU())
        self.out = nn.Sequential(nn.Linear(odim * (((idim - 1) // 2 - 1) // 2), odim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.unsqueeze(1))
        b, c, t, f = x.shape
        return self.out(x.transpose(1, 2).reshape(b, t, c * f))


class Subsampling(nn.Module):
    """``enc.0``: the release wraps the subsampling core in a module of its own."""

    def __init__(self, idim: int, odim: int) -> None:
        super().__init__()
        self.core = Conv2dSubsampling4(idim, odim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.core(x)


class WhaleLayer(nn.Module):
    def __init__(self, cfg: WhaleConfig) -> None:
        super().__init__()
        d = cfg.output_size
        self.self_attn = RelPositionAttention(d, cfg.attention_heads)
        self.feed_forward = PositionwiseFeedForward(d, cfg.linear_units)
        self.norm1 = nn.LayerNorm(d, eps=LN_EPS)
        self.norm2 = nn.LayerNorm(d, eps=LN_EPS)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), pos)
        return x + self.feed_forward(self.norm2(x))


class PositionTable(nn.Module):
    """``enc.1.pe``: no parameters (the release keeps its sin/cos table as a plain tensor)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d = d

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * math.sqrt(self.d), abs_positions(x.shape[1], self.d, x.device).to(x.dtype)


class WhaleTransformer(nn.Module):
    """``enc.1``: embed (Linear, LayerNorm, ReLU), x sqrt(d), pre-LN layers, after_norm. Full
    attention over the window, as the release's vLLM port runs it."""

    def __init__(self, cfg: WhaleConfig) -> None:
        super().__init__()
        d = cfg.output_size
        self.embed = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d, eps=LN_EPS), nn.Dropout(0.0), nn.ReLU())
        self.pe = PositionTable(d)
        self.encoders = nn.ModuleList(WhaleLayer(cfg) for _ in range(cfg.num_blocks))
        self.after_norm = nn.LayerNorm(d, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, pos = self.pe(self.embed(x))
        for layer in self.encoders:
            x = layer(x, pos)
        return self.after_norm(x)


class WhaleEncoder(nn.Module):
    """fbank [1, F, 80] -> hidden [1, ~F/4, d]: CMVN, ``enc.0`` (subsampling), ``enc.1`` (transformer)."""

    def __init__(self, cfg: WhaleConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.enc = nn.ModuleList([Subsampling(cfg.input_dim, cfg.output_size), WhaleTransformer(cfg)])
        self.global_cmvn = GlobalCMVN(cfg.input_dim)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        return self.enc[1](self.enc[0](self.global_cmvn(fbank)))


class CNNSubsampling(nn.Module):
    """VITA's adapter: Conv1d(d -> d_hidden, k5, s2, padded on the right) + LayerNorm + GELU +
    Linear to the LLM width. Sub-module names follow VITA's (conv1d2, bn2, project)."""

    def __init__(self, d_in: int, d_hidden: int, d_llm: int, kernel: int = 5) -> None:
        super().__init__()
        self.kernel = kernel
        self.conv1d2 = nn.Conv1d(d_in, d_hidden, kernel_size=kernel, stride=2)
        self.bn2 = nn.LayerNorm(d_hidden, eps=1e-3)
        self.project = nn.Linear(d_hidden, d_llm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1d2(F.pad(x.transpose(1, 2), (0, self.kernel - 1))).transpose(1, 2)
        return self.project(F.gelu(self.bn2(x)))


MAX_FRAMES = 3000  # 30 s at 100 Hz; the runtime encodes longer audio in windows of this size


class WhaleAudioEncoder(AudioEncoderComponent, nn.Module):
    """``adpter`` (sic) is VITA's attribute name, kept so its checkpoints map one to one."""


    def __init__(self, cfg: WhaleConfig, d_llm: int) -> None:
        super().__init__()
        self.encoder = WhaleEncoder(cfg)
        self.adpter = CNNSubsampling(cfg.output_size, cfg.adapter_hidden, d_llm)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        return self.adpter(self.encoder(fbank))

    # -- as a component ---------------------------------------------------------------------
    def export_methods(self, limits):  # type: ignore[no-untyped-def]
        cfg = self.encoder.cfg
        frames = dim("frames", 16, min(limits.max_audio_s * 100, MAX_FRAMES))
        h = self.adpter.project.out_features
        return [MethodSpec("forward", Call(self), (torch.randn(1, 200, cfg.input_dim, dtype=dtype_of(self)),), ({1: frames},),
                           (Tensor("features", F32, (1, "frames", cfg.input_dim)),), (Tensor("tokens", F32, (1, "frames/8", h)),))]  # fmt: skip

    def features(self, wav: torch.Tensor) -> torch.Tensor:
        """16 kHz samples -> the Kaldi fbank this encoder reads."""
        from omni_export.runtime_py.audio import KaldiFbank

        return KaldiFbank(self.encoder.cfg.input_dim)(wav.float()).to(dtype_of(self))
