"""WeNet-style relative-position self-attention and feed-forward, as the releases that build on
WeNet name them (``linear_q/k/v/out/pos``, ``pos_bias_u/v``; ``w_1``, ``w_2``): VITA-1.5's Whale
(the positional table's rows 0..T-1, no relative shift) and CosyVoice2's flow encoder (the
ESPnet table over offsets +(S-1)..-(T-1) and Transformer-XL's relative shift)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from omni_export.export.components.layers import merge_heads, sdpa, split_heads


def sincos_rows(positions: torch.Tensor, d: int) -> torch.Tensor:
    """[N] positions (or relative offsets) -> [N, d]: sin at even columns, cos at odd, as WeNet's
    and ESPnet's positional tables interleave them."""
    pos = positions.to(torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32, device=positions.device) * -(math.log(10000.0) / d))
    return torch.stack([torch.sin(pos * div), torch.cos(pos * div)], dim=-1).reshape(-1, d)


def relative_rows(queries: int, keys: int, d: int, device: torch.device | None = None) -> torch.Tensor:
    """ESPnet's relative table for ``queries`` positions that end a run of ``keys``: offsets
    keys-1 down to -(queries-1), [keys + queries - 1, d]."""
    return sincos_rows(torch.arange(keys - 1, -queries, -1, device=device), d)


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """Transformer-XL's pad-and-reshape shift: [B, H, T, N] scores against offsets N-T .. -(T-1)
    (descending) -> [B, H, T, N-T+1] scores against the keys, query i and key j meeting at offset
    (N-T) + i - j. Views only, so every backend takes it."""
    b, h, t, n = x.shape
    padded = torch.cat([x.new_zeros(b, h, t, 1), x], dim=-1)
    return padded.view(b, h, n + 1, t)[:, :, 1:].reshape(b, h, t, n)[..., : n - t + 1]


class RelPositionAttention(nn.Module):
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
        """Whale: every position against every other, ``pos`` = the table's rows 0..T-1, no shift."""
        return self.attend(x, pos)[0]

    def attend(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None,
               past: torch.Tensor | None = None, shift: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """-> (output, keys/values [2, B, H, S, d_k]). With ``past`` (a window's keys/values) the
        queries attend to it before themselves; the returned window drops its oldest positions to
        take theirs. ``shift``: ``pos`` holds ``relative_rows(T, S)`` and the positional scores
        are shifted onto the keys."""
        q = split_heads(self.linear_q(x), self.heads)
        kv = torch.stack([split_heads(self.linear_k(x), self.heads), split_heads(self.linear_v(x), self.heads)])
        if past is not None:
            kv = torch.cat([past, kv], dim=3)
        p = split_heads(self.linear_pos(pos)[None], self.heads)
        bd = (q + self.pos_bias_v[None, :, None, :]) @ p.transpose(-1, -2)
        out = sdpa(q + self.pos_bias_u[None, :, None, :], kv[0], kv[1], mask, bias=rel_shift(bd) if shift else bd)
        window = kv if past is None else kv[:, :, :, x.shape[1] :]
        return self.linear_out(merge_heads(out)), window


class PositionwiseFeedForward(nn.Module):
    def __init__(self, d: int, units: int, activation: Callable[[torch.Tensor], torch.Tensor] = F.relu) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d, units)
        self.w_2 = nn.Linear(units, d)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.activation(self.w_1(x)))
