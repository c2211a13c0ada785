"""GPTQ (Frantar et al. 2022): quantize one input column at a time and push its rounding error
onto the columns not yet quantized, weighted by the inverse Hessian of the layer's
reconstruction loss (H = 2 X^T X over the calibration inputs). Groups take their scale from the
error-updated weights when the sweep reaches them, so the result is on the same grid as RTN."""

from __future__ import annotations

import torch

from omni_export.quantize.recipe import QuantConfig
from omni_export.quantize.result import QTensor
from omni_export.quantize.rtn import grid_for

BLOCK = 128
DAMP = 0.01


def gptq(w: torch.Tensor, hessian: torch.Tensor, cfg: QuantConfig) -> QTensor:
    w = w.float().clone()
    out, k = w.shape
    grid = grid_for(cfg, k)
    g = grid.group_size
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += torch.eye(k, dtype=h.dtype) * DAMP * torch.diag(h).mean()
    # Upper Cholesky factor of H^-1: its rows are the update directions of the sweep.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()

    q = torch.empty(out, k, dtype=torch.int8)
    scales = torch.empty(out, k // g)
    zeros = torch.empty(out, k // g, dtype=torch.int8)
    for b0 in range(0, k, BLOCK):
        b1 = min(b0 + BLOCK, k)
        wb = w[:, b0:b1].clone()
        err = torch.zeros_like(wb)
        hb = hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = b0 + j
            if col % g == 0:
                # The group's scale comes from the weights as updated so far (this block's
                # columns from wb, later blocks' from w).
                block = torch.cat([wb[:, j:], w[:, b1:]], 1)[:, :g]
                s, z = grid.params(block[:, None, :])
                scales[:, col // g], zeros[:, col // g] = s[:, 0], z[:, 0]
            s, z = scales[:, col // g], zeros[:, col // g]
            qc = grid.round(wb[:, j : j + 1], s, z)[:, 0]
            q[:, col] = qc
            deq = (qc.float() - z.float()) * s
            e = (wb[:, j] - deq) / hb[j, j]
            wb[:, j:] -= e[:, None] * hb[j, j:][None, :]
            err[:, j] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    return QTensor(q, scales, zeros, cfg)
