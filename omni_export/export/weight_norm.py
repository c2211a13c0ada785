"""Weight normalisation as released checkpoints store it, folded at load.

Vocoders trained with ``torch.nn.utils.weight_norm`` (CosyVoice2's HiFT, HiFi-GAN and its kin)
keep two tensors per normalised weight: a magnitude ``g`` and a direction ``v``, under
``parametrizations.weight.original0/1`` (torch >= 2.1's parametrisation) or ``weight_g/weight_v``
(the older hook). Our modules hold the plain ``weight = g * v / ||v||``: that is what every target
runs, and folding once at load keeps the division out of each graph. A module marks itself with
``weight_norm`` so the loader knows which names to look for and the synthetic writer writes the
released form."""

from __future__ import annotations

from collections.abc import Container

import torch
from torch import nn

MARK = "_stored_weight_norm"
# (magnitude, direction) suffixes that replace ".weight", newest form first.
FORMS = ((".parametrizations.weight.original0", ".parametrizations.weight.original1"), (".weight_g", ".weight_v"))


def weight_norm(module: nn.Module, form: int = 0) -> nn.Module:
    """Mark ``module.weight`` as stored weight-normalised (over dim 0, torch's default), in
    ``FORMS[form]`` as its release stores it (the loader takes either)."""
    setattr(module, MARK, form)
    return module


def normed_weights(module: nn.Module) -> dict[str, int]:
    """State-dict keys of the weights ``module`` and its children store weight-normalised -> the
    index in FORMS of the form their release uses."""
    return {f"{name}.weight" if name else "weight": getattr(m, MARK) for name, m in module.named_modules() if hasattr(m, MARK)}


def stored_pair(weight_name: str, names: Container[str]) -> tuple[str, str] | None:
    """The (magnitude, direction) checkpoint names that stand for ``weight_name``, if present."""
    base = weight_name.removesuffix(".weight")
    for g, v in FORMS:
        if base + g in names and base + v in names:
            return base + g, base + v
    return None


def magnitude_shape(weight_shape: tuple[int, ...]) -> tuple[int, ...]:
    return (weight_shape[0],) + (1,) * (len(weight_shape) - 1)


def fold(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``g * v / ||v||``, the norm of each output row (weight norm over dim 0, as every release
    here uses; a one-channel output's magnitude is [1, 1, 1], so the dims cannot be read off
    ``g``'s shape); computed in fp32."""
    vf = v.float()
    return (g.float() * vf / torch.linalg.vector_norm(vf, dim=tuple(range(1, v.dim())), keepdim=True)).to(v.dtype)
