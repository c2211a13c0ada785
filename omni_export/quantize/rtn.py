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


def rtn(w: torch.Tensor, cfg: QuantConfig, clip: torch.Tensor | float = 1.0) -> QTensor:
    """``clip`` is one factor, or one per group [out, in // g] (from AWQ's clip search)."""
    grid = grid_for(cfg, w.shape[1])
    wg = groups(w, grid.group_size)
    scale, zero = grid.params(wg, clip)
    return QTensor(grid.round(wg, scale, zero).reshape(w.shape), scale, zero, cfg)


def weight_error(w: torch.Tensor, qt: QTensor) -> float:
    """||W - deq(Q)|| / ||W||: the damage before any activation is involved."""
    w = w.float()
    return float((w - qt.dequantize()).norm() / w.norm().clamp(min=1e-12))
