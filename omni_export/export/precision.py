"""Mixed precision for export: a component's body in fp16 with chosen layers kept in fp32, and
method boundaries that keep the dtypes the manifest declares.

- ``to_half`` converts a module's float parameters and buffers to fp16 in place, except
  placeholders that cost no memory (a quantized linear's broadcast zero stays a broadcast).
- ``KeepFloat32`` wraps a layer that fp16 cannot hold (measured: targets/precision.py): it runs
  in fp32 and hands fp16 back, so the graph holds an explicit Cast pair around it, which is how a
  strongly typed TensorRT network is told to run a layer in fp32.
- ``CastIO`` is the method boundary: float inputs and outputs stay what the method's spec says
  (fp32 for embeddings, logits, audio) while the body runs in its own dtype, so a caller drives
  every target with the same tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _cast(values: Sequence[object], dtypes: Sequence[torch.dtype | None]) -> list[object]:
    out = []
    for v, d in zip(values, dtypes, strict=True):
        floating = isinstance(v, torch.Tensor) and v.is_floating_point()
        out.append(v.to(d) if floating and d is not None and v.dtype != d else v)  # type: ignore[union-attr]
    return out


def _as_tuple(out: object) -> tuple[object, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class CastIO(nn.Module):
    """``inner`` with floating inputs cast to ``inputs[i]`` and floating outputs to ``outputs[i]``
    (None: left as they are)."""

    def __init__(self, inner: nn.Module, inputs: Sequence[torch.dtype | None], outputs: Sequence[torch.dtype | None]) -> None:
        super().__init__()
        self.inner, self.inputs, self.outputs = inner, tuple(inputs), tuple(outputs)

    def forward(self, *args: torch.Tensor):  # type: ignore[no-untyped-def]
        out = _as_tuple(self.inner(*_cast(args, self.inputs)))
        cast = _cast(out, self.outputs)
        return tuple(cast) if len(cast) > 1 else cast[0]


class KeepFloat32(nn.Module):
    """A layer run in fp32 inside an fp16 body: inputs up-cast, outputs back to the dtype of the
    first floating input."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner.float()

    def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        back = next((a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), torch.float32)
        up = lambda v: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
        out = self.inner(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})
        cast = _cast(_as_tuple(out), [back] * len(_as_tuple(out)))
        return tuple(cast) if isinstance(out, (tuple, list)) else cast[0]


def to_half(module: nn.Module) -> None:
    """Float parameters and buffers of ``module`` to fp16, in place, except inside KeepFloat32
    layers (wrap those first: their weights stay exactly as they were). A broadcast placeholder
    (stride 0 everywhere: a quantized linear's weight before the lowering fills it) stays one."""
    kept = {id(m) for k in module.modules() if isinstance(k, KeepFloat32) for m in k.modules()}
    for m in module.modules():
        if id(m) in kept:
            continue
        for name, p in list(m.named_parameters(recurse=False)):
            if p.is_floating_point() and p.dtype != torch.float16:
                p.data = p.data.half()
        for name, b in list(m.named_buffers(recurse=False)):
            if b is None or not b.is_floating_point() or b.dtype == torch.float16:
                continue
            if b.dim() and all(s == 0 for s in b.stride()):
                m._buffers[name] = torch.zeros((), dtype=torch.float16, device=b.device).expand(b.shape)
            else:
                m._buffers[name] = b.half()


def keep_float32(module: nn.Module, paths: Sequence[str]) -> list[tuple[nn.Module, str, nn.Module]]:
    """Wrap each submodule at ``paths`` in KeepFloat32; returns what to put back."""
    undo = []
    for path in paths:
        owner_path, _, leaf = path.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        inner = getattr(owner, leaf)
        setattr(owner, leaf, KeepFloat32(inner))
        undo.append((owner, leaf, inner))
    return undo
