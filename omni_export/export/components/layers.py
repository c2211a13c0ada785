"""Building blocks shared by the transformer components."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as the reference implementations do; fp16 variance overflows.
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer positions [T] -> [T, head_dim] (computed in fp32)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    )
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half_turn: Callable[[torch.Tensor], torch.Tensor] = rotate_half) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [T, D]. ``half_turn``: rotate_half, or a form of it a target lowers."""
    return x * cos + half_turn(x) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, Hkv*n_rep, T, D] (explicit, so every backend sees plain attention)."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with a boolean 'may attend' mask ([T, S] or broadcastable).

    Written as matmul + additive mask + softmax rather than F.scaled_dot_product_attention, whose
    exported decomposition (a 'safe softmax' guarding fully-masked rows with any/eq/logical_not/
    where) splits every attention into pieces a delegate cannot take. Every row here attends at
    least to itself, so no row is fully masked. ``bias``: scores added before the scale (a
    relative-position term)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q * scale) @ k.transpose(-1, -2)
    if bias is not None:
        scores = scores + bias * scale
    if mask is not None:
        scores = scores + torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, t, _ = x.shape
    return x.view(b, t, n_heads, x.shape[-1] // n_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's sinusoidal table: [length, channels], sin half then cos half."""
    log_inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-log_inc * torch.arange(channels // 2, dtype=torch.float32))
    t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([t.sin(), t.cos()], dim=1)


def sinusoidal_embedding(x: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Timestep embedding for diffusion/flow steps: x [B] (0..1) -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=x.device) / (half - 1))
    args = scale * x.float()[:, None] * freqs[None, :]
    return torch.cat([args.sin(), args.cos()], dim=-1)


def chunk_causal_mask(length: int, chunk: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean [T, T]: frame i sees frame j when j's chunk is not after i's chunk (streamable)."""
    # trunc equals floor for these non-negative indices, and lowers to one integer Div (floor
    # division of a signed tensor becomes a sign-fixing subgraph some compilers refuse).
    idx = torch.div(torch.arange(length, device=device), chunk, rounding_mode="trunc")
    return idx[None, :] <= idx[:, None]
