"""Activation-aware weight quantization (Lin et al. 2023), both of its searches:

- scale: input channels that carry large activations are scaled up in the weight (and the
  activation scaled down by folding 1/s into the op that produces it), so rounding hurts them
  less; the exponent of the per-channel activation magnitude is searched on calibration data.
- clip: each group's range is shrunk by the factor that minimises the group's output error.

Both minimise the error of the layer's output on calibration inputs, not of the weights."""

from __future__ import annotations

import torch

from omni_export.quantize.recipe import QuantConfig
from omni_export.quantize.rtn import grid_for, groups

SCALE_GRID = 20
CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0 .. 0.5
OUT_CHUNK = 512


def search_scale(x: torch.Tensor, weights: list[torch.Tensor], cfg: QuantConfig) -> tuple[torch.Tensor, float]:
    """Per-input-channel scale s for linears sharing input ``x`` [N, in]; returns (s, ratio).
    The quantized layer is ``Q(W * s)`` applied to ``x / s``."""
    x = x.float()
    mag = x.abs().mean(0).clamp(min=1e-6)
    ref = [x @ w.float().T for w in weights]
    best: tuple[float, torch.Tensor, float] | None = None
    for i in range(SCALE_GRID):
        ratio = i / SCALE_GRID
        s = mag.pow(ratio)
        s = (s / (s.max() * s.min()).sqrt()).clamp(min=1e-4)
        err = 0.0
        for w, r in zip(weights, ref, strict=True):
            grid = grid_for(cfg, w.shape[1])
            wq = grid.fake(groups(w * s, grid.group_size)).reshape(w.shape) / s
            err += float(((x @ wq.T) - r).pow(2).mean())
        if best is None or err < best[0]:
            best = (err, s, ratio)
    assert best is not None
    return best[1], best[2]


def search_clip(x: torch.Tensor, w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Per-group clip factor [out, in // g] minimising each group's contribution to the output."""
    grid = grid_for(cfg, w.shape[1])
    g = grid.group_size
    xg = x.float().reshape(x.shape[0], -1, g)  # [N, G, g]
    wg = groups(w, g)  # [out, G, g]
    best_err = torch.full(wg.shape[:2], float("inf"))
    best = torch.ones(wg.shape[:2])
    for c in range(0, wg.shape[0], OUT_CHUNK):
        wc = wg[c : c + OUT_CHUNK]
        for ratio in CLIP_GRID:
            diff = wc - grid.fake(wc, ratio)
            err = torch.einsum("ngj,ogj->nog", xg, diff).pow(2).mean(0)
            better = err < best_err[c : c + OUT_CHUNK]
            best_err[c : c + OUT_CHUNK][better] = err[better]
            best[c : c + OUT_CHUNK][better] = ratio
    return best
