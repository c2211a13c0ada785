"""Running a component in a float type other than the one its weights are stored in, without a
copy of the component: a 4B checkpoint stays bf16 and memory-mapped while its fp32 and fp16
references run.

- A linear's weight is cast for its own call into a scratch buffer (one per shape and type,
  reused layer after layer), so the largest linear is the only one held in the compute type.
- A token table gathers its stored rows and casts those (the same values as gathering from a cast
  table: a cast is elementwise). Smaller tables are cast whole, like the rest: position tables
  are read by slicing their weight, not called.
- Everything else (norms, convolutions, position tables, buffers, KV caches) is small and is cast
  for the duration, then put back.

Casting bf16 (or fp16) up to fp32 is exact, so the fp32 reference equals one run on an fp32 copy."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from omni_export.export.safetensors_io import release_pages


_COMPUTES_IN = "_omni_computes_in"
SMALL_TABLE = 1 << 24  # elements: a token table is larger (4B: 389M), a position table far smaller


def _plain(t: torch.Tensor | None) -> bool:
    # tensor subclasses (a target's quantized weights) are left as they are
    return t is not None and type(t) in (torch.Tensor, nn.Parameter) and t.is_floating_point()


@contextmanager
def computing_in(module: nn.Module, dtype: torch.dtype, release: bool = True) -> Iterator[None]:
    """Run ``module`` in ``dtype`` for the duration; its own tensors are unchanged afterwards
    (what it allocated meanwhile, such as a KV cache set up inside, stays in ``dtype``).
    ``release``: a linear's pages of a memory-mapped checkpoint go back after its call."""
    saved: list[tuple[dict, str, torch.Tensor]] = []  # (the module's _parameters or _buffers, key, original)
    scratch: dict[tuple[torch.Size, torch.dtype], torch.Tensor] = {}
    active: dict[int, dict[str, torch.Tensor]] = {}  # linear -> its stored tensors while it runs
    handles = []

    def widen(m: nn.Module, args: object) -> None:
        stored = {k: p for k in ("weight", "bias") if _plain(p := m._parameters.get(k)) and p.dtype != dtype}
        for k, p in stored.items():
            if k == "weight":
                buf = scratch.get((p.shape, dtype))
                if buf is None:
                    with torch.inference_mode(False):  # usable in and out of inference mode
                        buf = scratch[(p.shape, dtype)] = torch.empty(p.shape, dtype=dtype, device=p.device)
                m._parameters[k] = buf.copy_(p.detach())
            else:
                m._parameters[k] = p.detach().to(dtype)
        active[id(m)] = stored

    def restore(m: nn.Module, args: object, out: object) -> None:
        stored = active.pop(id(m), {})
        m._parameters.update(stored)
        if release:
            # read again from the page cache on the next call: a 4B reference run then holds
            # one linear of the checkpoint at a time, not all 8 GB of it
            release_pages(stored.values(), trim=False)

    def cast_out(m: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
        return out.to(dtype) if out.is_floating_point() and out.dtype != dtype else out

    linears: list[nn.Module] = []
    for m in module.modules():
        m.__dict__[_COMPUTES_IN] = dtype  # compute_dtype: inputs made for it are made in this type
        if isinstance(m, nn.Linear):
            linears.append(m)
            handles += [m.register_forward_pre_hook(widen), m.register_forward_hook(restore)]
        elif isinstance(m, nn.Embedding) and m.weight.numel() > SMALL_TABLE:
            handles.append(m.register_forward_hook(cast_out))
        else:
            saved += _cast(m, dtype)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m in linears:  # a call that raised never reached its restore hook
            m._parameters.update(active.pop(id(m), {}))
        _put_back(saved)
        for m in module.modules():
            m.__dict__.pop(_COMPUTES_IN, None)
        scratch.clear()


def compute_dtype(m: nn.Module) -> torch.dtype | None:
    """The type ``m`` computes in while ``computing_in`` runs it (None outside)."""
    return m.__dict__.get(_COMPUTES_IN)


@contextmanager
def widened(module: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Every plain float tensor of ``module`` (linears included) in ``dtype`` for the duration, a
    whole copy: for one decoder layer at a time (GPTQ/AWQ), not a component."""
    saved = [r for m in module.modules() for r in _cast(m, dtype)]
    try:
        yield
    finally:
        _put_back(saved)


def _put_back(saved: list[tuple[dict, str, torch.Tensor]]) -> None:
    for store, k, t in saved:
        store[k] = t


def _cast(m: nn.Module, dtype: torch.dtype, skip: Callable[[str], bool] = lambda k: False) -> list[tuple[dict, str, torch.Tensor]]:
    """``m``'s own plain float tensors to ``dtype`` (but those ``skip`` names); returns what was replaced."""
    replaced = []
    for store in (m._parameters, m._buffers):
        for k, t in list(store.items()):
            if _plain(t) and t.dtype != dtype and not skip(k):
                replaced.append((store, k, t))
                cast = t.detach().to(dtype)
                store[k] = nn.Parameter(cast, requires_grad=False) if isinstance(t, nn.Parameter) else cast
    return replaced


def cast_floats(module: nn.Module, dtype: torch.dtype, skip: Collection[str] = ()) -> None:
    """Plain float parameters and buffers of ``module`` to ``dtype``, for good, but those named
    in ``skip`` (weights a target is about to replace with their quantized form: never widened;
    done before encoding, so the encoded forms keep their own types, fp16 table scales)."""
    for path, m in module.named_modules():
        _cast(m, dtype, lambda k, p=f"{path}." if path else "": p + k in skip)
