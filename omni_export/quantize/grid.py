"""The integer grid every algorithm shares: scales and zero points for a group of weights, and
rounding onto them. Scales are rounded to bfloat16 before any integer is computed, because
XNNPACK stores blockwise scales as bf16 and Core ML / TensorRT take fp16: a bf16 value in fp16's
normal range is exact in both, so every target can encode the same integers and scales."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# fp16's smallest normal number: a smaller bf16 scale would not survive the fp16 cast.
MIN_SCALE = 2.0**-14


def exact_scale(scale: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 value >= ``scale`` (rounding up, so no weight falls off the grid)."""
    bits = scale.float().clamp(min=MIN_SCALE).contiguous().view(torch.int32)
    return ((bits + 0xFFFF) & ~0xFFFF).view(torch.float32)


@dataclass(frozen=True)
class Grid:
    bits: int
    group_size: int  # the effective group: in_features when per channel
    symmetric: bool

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def params(self, w: torch.Tensor, clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point for ``w`` [..., group_size] (one pair per row), range shrunk by ``clip``."""
        w = w.float()
        if self.symmetric:
            amax = w.abs().amax(-1) * clip
            scale = exact_scale(amax / self.qmax)
            return scale, torch.zeros_like(scale, dtype=torch.int8)
        lo = (w.amin(-1) * clip).clamp(max=0)
        hi = (w.amax(-1) * clip).clamp(min=0)
        scale = exact_scale((hi - lo) / (self.qmax - self.qmin))
        zero = torch.clamp(torch.round(self.qmin - lo / scale), self.qmin, self.qmax).to(torch.int8)
        return scale, zero

    def round(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integers for ``w`` [..., g] with one (scale, zero) per leading index."""
        q = torch.round(w.float() / scale[..., None]) + zero[..., None].float()
        return torch.clamp(q, self.qmin, self.qmax).to(torch.int8)

    @staticmethod
    def dequant(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return (q.float() - zero[..., None].float()) * scale[..., None]

    def fake(self, w: torch.Tensor, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
        """Quantize-dequantize ``w`` [..., g] row by row (used by the searches)."""
        scale, zero = self.params(w, clip)
        return self.dequant(self.round(w, scale, zero), scale, zero)
