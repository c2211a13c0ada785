"""VITA-1.5's "Whale" audio encoder (WeNet-style names): global CMVN, Conv2dSubsampling4,
pre-LN transformer blocks with relative-position self-attention, and the CNN adapter
(Conv1d k5 s2 + LayerNorm + GELU + Linear) that brings it to 12.5 Hz in the LLM width."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omni_export.export.components.audio_encoder import AudioEncoderComponent
from omni_export.export.components.layers import merge_heads, split_heads
from omni_export.export.trace_specs import F32, Call, MethodSpec, Tensor, dim, dtype_of


@dataclass(frozen=True)
class WhaleConfig:
    input_dim: int = 80
    output_size: int = 1024
    attention_heads: int = 16
    linear_units: int = 4096
    num_blocks: int = 24
    adapter_hidden: int = 2048


def rel_positions(length: int, d: int, device: torch.device | None = None) -> torch.Tensor:
    """Sinusoidal embeddings of relative distances (T-1 .. -(T-1)): [2T-1, d]."""
    pos = torch.arange(length - 1, -length, -1, dtype=torch.float32, device=device)[:, None]
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / d))
    pe = torch.zeros(pos.shape[0], d, device=device)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe


class GlobalCMVN(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("istd", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.istd


class Conv2dSubsampling4(nn.Module):
    def __init__(self, idim: int, odim: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, odim, 3, 2), nn.ReLU(), nn.Conv2d(odim, odim, 3, 2), nn.ReLU())
        self.out = nn.Sequential(nn.Linear(odim * (((idim - 1) // 2 - 1) // 2), odim))
        self.odim = odim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.unsqueeze(1))
        b, c, t, f = x.shape
        return self.out(x.transpose(1, 2).reshape(b, t, c * f)) * math.sqrt(self.odim)


class RelPositionAttention(nn.Module):
    """Transformer-XL style: scores = (q+u)k^T + gather((q+v)p^T) over relative distances."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads, self.d_k = heads, d // heads
        self.linear_q = nn.Linear(d, d)
        self.linear_k = nn.Linear(d, d)
        self.linear_v = nn.Linear(d, d)
        self.linear_out = nn.Linear(d, d)
        self.linear_pos = nn.Linear(d, d, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(heads, self.d_k))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        q = split_heads(self.linear_q(x), self.heads)
        k = split_heads(self.linear_k(x), self.heads)
        v = split_heads(self.linear_v(x), self.heads)
        p = self.linear_pos(pos).view(-1, self.heads, self.d_k).transpose(0, 1)  # [H, 2T-1, dk]
        ac = (q + self.pos_bias_u[None, :, None, :]) @ k.transpose(-1, -2)
        bd_full = (q + self.pos_bias_v[None, :, None, :]) @ p.transpose(-1, -2)[None]  # [1,H,T,2T-1]
        ar = torch.arange(t, device=x.device)
        idx = (ar[None, :] - ar[:, None] + (t - 1)).expand(1, self.heads, t, t)
        bd = torch.gather(bd_full, -1, idx)
        attn = torch.softmax((ac + bd) / math.sqrt(self.d_k), dim=-1)
        return self.linear_out(merge_heads(attn @ v))


class PositionwiseFeedForward(nn.Module):
    def __init__(self, d: int, units: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d, units)
        self.w_2 = nn.Linear(units, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.relu(self.w_1(x)))


class WhaleLayer(nn.Module):
    def __init__(self, cfg: WhaleConfig) -> None:
        super().__init__()
        d = cfg.output_size
        self.self_attn = RelPositionAttention(d, cfg.attention_heads)
        self.feed_forward = PositionwiseFeedForward(d, cfg.linear_units)
        self.norm1 = nn.LayerNorm(d, eps=1e-12)
        self.norm2 = nn.LayerNorm(d, eps=1e-12)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), pos)
        return x + self.feed_forward(self.norm2(x))


class WhaleEncoder(nn.Module):
    """fbank [1, F, 80] -> hidden [1, ~F/4, d]."""

    def __init__(self, cfg: WhaleConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.global_cmvn = GlobalCMVN(cfg.input_dim)
        self.embed = Conv2dSubsampling4(cfg.input_dim, cfg.output_size)
        self.encoders = nn.ModuleList(WhaleLayer(cfg) for _ in range(cfg.num_blocks))
        self.after_norm = nn.LayerNorm(cfg.output_size, eps=1e-12)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        x = self.embed(self.global_cmvn(fbank))
        pos = rel_positions(x.shape[1], self.cfg.output_size, x.device).to(x.dtype)
        for layer in self.encoders:
            x = layer(x, pos)
        return self.after_norm(x)


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
