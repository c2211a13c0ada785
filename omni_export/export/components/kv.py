"""KV caches as swappable parts of a decoder stack.

Each attention layer of a cached stack owns two replaceable modules: a ``KVCache`` (writes the
step's keys and values, returns what attention reads) and an ``Attend`` (attention over it). A
*mode* says which pair a stack gets; the model itself never branches on a backend:

- ``reference`` (the eager model; what parity compares against): buffers [1, kv_heads, max_len,
  head_dim] written with ``index_copy_``, plain masked attention over the whole buffer.
- ``state`` (Core ML states): the same buffers, always fp16 (the only state type Core ML has),
  written by a slice update at the first position, Apple's documented pattern for stateful models.
- ``io`` (ONNX Runtime, TensorRT): no buffers; past keys and values come in as tensors, are
  concatenated with the step's own, and go out as ``present`` tensors. Attention groups query
  heads over the shared K/V heads without copying them.
- Targets add their own (ExecuTorch registers ``executorch``: its in-place llama ops).

``use_kv(module, mode)`` installs a mode on every stack of a component for the duration of a
``with`` block (export only) and puts the reference back after; ``kv_stacks`` is the one place
that knows what a KV stack is."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from omni_export.bundle.manifest import EXPLICIT_KV
from omni_export.errors import ConfigError
from omni_export.export.components.layers import apply_rope, merge_heads, repeat_kv, rotate_half, sdpa
from omni_export.registry import Registry


class KVCache(nn.Module):
    """One layer's cache. ``update`` takes the step's keys and values [B, T, kv_heads, D] at
    absolute positions ``input_pos`` [T] and returns the keys and values attention reads (in the
    layout the paired ``Attend`` expects)."""

    def update(self, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the conversation (buffers are zeroed; tensor-passing caches hold nothing)."""


class Attend(nn.Module):
    """Attention of queries [B, T, heads, D] at ``input_pos`` over what the cache returned ->
    [B, T, heads * D]. ``whole_call``: each query sees every position written so far, its own
    call's later ones included (a prefix that attends both ways, VITA's TTS); a one-position step
    is causal either way."""

    def __init__(self, n_rep: int, whole_call: bool = False) -> None:
        super().__init__()
        self.n_rep, self.whole_call = n_rep, whole_call

    def rotate(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on queries and keys [B, T, heads, D] (cos/sin [T, D]) before the cache sees them."""
        cos, sin = cos[:, None], sin[:, None]
        return apply_rope(q, cos, sin, self.half_turn), apply_rope(k, cos, sin, self.half_turn)

    def half_turn(self, x: torch.Tensor) -> torch.Tensor:
        """rotate_half, in the form this attention's target lowers."""
        return rotate_half(x)


def causal_over(keys_len: int | torch.SymInt, input_pos: torch.Tensor, whole_call: bool = False) -> torch.Tensor:
    """Boolean [T, S]: query at absolute position p sees key positions 0..p (``whole_call``: every
    query sees 0..the call's last position; [1, S], broadcast over the queries)."""
    seen = input_pos[-1:] if whole_call else input_pos
    return torch.arange(keys_len, device=input_pos.device)[None, :] <= seen[:, None]


class BufferCache(KVCache):
    """Reference: static buffers [1, kv_heads, max_len, D], written at ``input_pos``."""

    def __init__(self, kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype, device: Any = None) -> None:
        super().__init__()
        shape = (1, kv_heads, max_len, head_dim)
        # Non-persistent: a cache never goes into a checkpoint.
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, k, v, input_pos):  # type: ignore[no-untyped-def]
        self.k_cache.index_copy_(2, input_pos, k.transpose(1, 2).to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, input_pos, v.transpose(1, 2).to(self.v_cache.dtype))
        return self.k_cache, self.v_cache

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()


class SliceCache(BufferCache):
    """Core ML states: the same buffers, written by a slice update from the first position (the
    positions of one call are consecutive)."""

    def update(self, k, v, input_pos):  # type: ignore[no-untyped-def]
        # A start position read from the tensor (an unbacked size when traced): coremltools takes
        # the read as a no-op and the slice write as a tensor assign on the state.
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + k.shape[1] <= self.k_cache.shape[2])
        self.k_cache[:, :, start : start + k.shape[1]] = k.transpose(1, 2).to(self.k_cache.dtype)
        self.v_cache[:, :, start : start + k.shape[1]] = v.transpose(1, 2).to(self.v_cache.dtype)
        return self.k_cache, self.v_cache


class MaskedAttention(Attend):
    """Plain attention over every cached position, masked to each query's own past: repeats the
    K/V heads and runs matmul + softmax, the form every backend lowers."""

    def forward(self, q, keys, values, input_pos):  # type: ignore[no-untyped-def]
        q = q.transpose(1, 2)
        keys, values = keys.to(q.dtype), values.to(q.dtype)
        mask = causal_over(keys.shape[2], input_pos, self.whole_call)
        return merge_heads(sdpa(q, repeat_kv(keys, self.n_rep), repeat_kv(values, self.n_rep), mask))


@dataclass
class IOSlots:
    """Where an ``io``-mode component's caches meet the traced call: the step wrapper puts the
    past tensors here before running the stack and collects the present ones after."""

    past: list[torch.Tensor] = field(default_factory=list)
    present: dict[int, torch.Tensor] = field(default_factory=dict)


class IOCache(KVCache):
    """Past K/V [1, kv_heads, past, D] in, present = past + this step's out."""

    def __init__(self, slots: IOSlots, index: int) -> None:
        super().__init__()
        self.slots, self.index = slots, index

    def update(self, k, v, input_pos):  # type: ignore[no-untyped-def]
        pk, pv = self.slots.past[2 * self.index], self.slots.past[2 * self.index + 1]
        keys = torch.cat([pk, k.transpose(1, 2).to(pk.dtype)], dim=2)
        values = torch.cat([pv, v.transpose(1, 2).to(pv.dtype)], dim=2)
        self.slots.present[2 * self.index], self.slots.present[2 * self.index + 1] = keys, values
        return keys, values


class GroupedAttention(Attend):
    """Grouped-query attention without repeating K/V: queries are viewed as [B, kv_heads, n_rep,
    T, D] and broadcast against [B, kv_heads, 1, S, D], so the graph never copies the cache."""

    def forward(self, q, keys, values, input_pos):  # type: ignore[no-untyped-def]
        b, t, h, d = q.shape
        kvh = h // self.n_rep
        q = q.transpose(1, 2).reshape(b, kvh, self.n_rep, t, d) * d**-0.5
        keys, values = keys.to(q.dtype)[:, :, None], values.to(q.dtype)[:, :, None]
        scores = q @ keys.transpose(-1, -2)
        mask = causal_over(keys.shape[3], input_pos, self.whole_call)
        scores = scores + torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device).masked_fill(~mask, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ values  # [B, kvh, n_rep, T, D]
        return out.reshape(b, h, t, d).transpose(1, 2).reshape(b, t, h * d)


# -- modes -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVMode:
    """How a target holds decoder caches.

    ``held_as``: buffers | state | io (what the manifest says); ``axes``: the cache tensor's axes
    in order; ``cache(stack, layer, max_len, slots)`` and ``attend(stack, n_rep, layer, slots)``
    build the pair (an ``io`` attention that also produces the present cache writes it to
    ``slots``)."""

    name: str
    held_as: str
    axes: tuple[str, ...]
    cache: Callable[[Any, int, int, IOSlots], KVCache]
    attend: Callable[[Any, int, int, IOSlots], Attend]
    # io mode: prefill and decode are one graph; the runtime zeroes nothing (it owns the tensors).
    # A buffer mode may do the same (``one_step``): prefill and decode run one program whose token
    # count is dynamic, so a target lowers it once, not once per method (most of a large LLM's
    # lowering time), and loads one method.
    one_step: bool = False
    HELD_AS: ClassVar[tuple[str, ...]] = ("buffers", "state", "io", "static-io")

    def __post_init__(self) -> None:
        if self.held_as not in self.HELD_AS:
            raise ConfigError(f"KV mode {self.name}: held_as must be one of {self.HELD_AS}")

    @property
    def explicit(self) -> bool:
        """The caller passes the cache in and takes it back (``io``: growing tensors;
        ``static-io``: max_len tensors written in place)."""
        return self.held_as in EXPLICIT_KV

    @property
    def static(self) -> bool:
        return self.held_as == "static-io"


def _buffers(cls: type[BufferCache], dtype: torch.dtype | None = None) -> Callable[[Any, int, int, IOSlots], KVCache]:
    """Buffers in the stack's dtype, or in ``dtype`` whatever the stack's (Core ML states are fp16)."""

    def make(stack: Any, layer: int, max_len: int, slots: IOSlots) -> KVCache:
        ref = stack.norm.weight
        return cls(stack.cfg.num_key_value_heads, stack.cfg.head_dim, max_len, dtype or ref.dtype, ref.device)

    return make


def plain(cls: type[Attend]) -> Callable[[Any, int, int, IOSlots], Attend]:
    """An attention that needs only the head grouping (and whether its stack's calls attend both ways)."""
    return lambda stack, n_rep, layer, slots: cls(n_rep, stack.whole_call)


HEADS_FIRST = ("batch", "kv_heads", "positions", "head_dim")
KV_MODES: Registry[KVMode] = Registry("KV cache mode")
REFERENCE = KV_MODES.register("reference", KVMode("reference", "buffers", HEADS_FIRST, _buffers(BufferCache), plain(MaskedAttention)))
KV_MODES.register("state", KVMode("state", "state", HEADS_FIRST, _buffers(SliceCache, torch.float16), plain(MaskedAttention)))
KV_MODES.register("io", KVMode("io", "io", HEADS_FIRST, lambda stack, layer, n, slots: IOCache(slots, layer), plain(GroupedAttention)))


# -- finding and swapping ------------------------------------------------------------------------
def kv_stacks(module: nn.Module, allocated: bool = True) -> list[Any]:
    """The decoder stacks of a component that hold a KV cache (``allocated=False``: that would
    hold one once set up, e.g. on a weightless meta-device model)."""
    from omni_export.export.components.qwen import QwenModel

    return [m for m in module.modules() if isinstance(m, QwenModel) and m.cached and (m.cache_len or not allocated)]


def kv_layers(module: nn.Module) -> list[Any]:
    """Every attention layer of every cached stack, in order (the order of the cache tensors)."""
    return [layer.self_attn for stack in kv_stacks(module) for layer in stack.layers]


def reset_kv(module: nn.Module) -> None:
    for attn in kv_layers(module):
        attn.kv.reset()


def install(module: nn.Module, mode: KVMode, slots: IOSlots | None = None) -> IOSlots:
    """Give every cached layer ``mode``'s cache and attention (global layer order)."""
    slots = slots if slots is not None else IOSlots()
    i = 0
    for stack in kv_stacks(module):
        for layer in stack.layers:
            attn = layer.self_attn
            attn.kv = mode.cache(stack, i, stack.cache_len, slots)
            attn.attend = mode.attend(stack, attn.n_rep, i, slots)
            i += 1
    return slots


@contextmanager
def use_kv(module: nn.Module, mode: KVMode | str) -> Iterator[IOSlots]:
    """Export-only: ``module``'s stacks use ``mode`` inside the block; the reference (fresh,
    zeroed buffers) is put back after."""
    mode = KV_MODES.get(mode) if isinstance(mode, str) else mode
    try:
        yield install(module, mode)
    finally:
        install(module, REFERENCE)
