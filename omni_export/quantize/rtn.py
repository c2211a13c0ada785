"""Round-to-nearest: the baseline every other method is measured against, and the rounding step
the others end with."""

from __future__ import annotations

import torch

from omni_export.quantize.grid import Grid
from omni_export.quantize.recipe import QuantConfig
from omni_export.quantize.result import QTensor


def grid_for(cfg: QuantConfig, in_features: int) -> Grid:
    return Grid(cfg.bits, cfg.group_size or in_features, cfg.symmetric)


def groups(w: torch.Tensor, g: int) -> torch.Tensor:
    out, k = w.shape
    return w.float().reshape(out, k // g, g)


ROWS = 4096  # rows rounded at a time: a 4B model's 389M-entry table never widens to fp32 whole


def _row_chunks(n: int) -> range:
    return range(0, n, ROWS)


def rtn(w: torch.Tensor, cfg: QuantConfig, clip: torch.Tensor | float = 1.0) -> QTensor:
    """``clip`` is one factor, or one per group [out, in // g] (from AWQ's clip search). Rows are
    independent (every group lies within one), so they are rounded a block at a time."""
    grid = grid_for(cfg, w.shape[1])
    parts = []
    for r in _row_chunks(w.shape[0]):
        wg = groups(w[r : r + ROWS], grid.group_size)
        c = clip[r : r + ROWS] if isinstance(clip, torch.Tensor) and clip.dim() else clip
        scale, zero = grid.params(wg, c)
        parts.append((grid.round(wg, scale, zero).reshape(wg.shape[0], -1), scale, zero))
    q, scale, zero = (torch.cat(p) if len(p) > 1 else p[0] for p in zip(*parts, strict=True))
    return QTensor(q, scale, zero, cfg)


def weight_error(w: torch.Tensor, qt: QTensor) -> float:
    """||W - deq(Q)|| / ||W||: the damage before any activation is involved."""
    err = norm = 0.0
    for r in _row_chunks(w.shape[0]):
        rows = w[r : r + ROWS].float()
        part = QTensor(qt.q[r : r + ROWS], qt.scale[r : r + ROWS], qt.zero[r : r + ROWS], qt.config)
        err += float((rows - part.dequantize()).pow(2).sum())
        norm += float(rows.pow(2).sum())
    return (err / max(norm, 1e-24)) ** 0.5
