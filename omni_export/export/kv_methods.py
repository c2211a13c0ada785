"""What a KV mode does to a component's methods.

Buffer and state modes trace every method as it is: ``prefill`` and ``decode`` share the cache
inside the program and ``reset_cache`` zeroes it (buffers; a Core ML caller makes a new state).
A buffer mode with ``one_step`` (ExecuTorch) traces them as one method, ``step``, whose token
count is dynamic: the runtime calls it for both. The ``io`` mode (ONNX Runtime, TensorRT) traces
``prefill`` and ``decode`` as one graph, ``step``, whose token count is dynamic (1 .. prefill
chunk) and which takes every layer's past keys and values after its inputs and returns the
present ones after its outputs, so one file serves both and no weight is stored twice; there is
no reset method (the caller owns the cache)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.export import Dim

from omni_export.bundle.manifest import KVLayout
from omni_export.export.components.kv import IOSlots, KVMode, kv_layers, kv_stacks
from omni_export.export.trace_specs import DTYPE_NAMES, Limits, MethodSpec, Tensor, dtype_of

STEP = "step"


@dataclass
class TracePlan:
    """The programs to trace (name -> spec), which program runs each logical method, the
    methods the bundle exposes (logical specs) and the KV layout."""

    programs: dict[str, MethodSpec]
    aliases: dict[str, str]
    methods: dict[str, MethodSpec]
    kv: KVLayout | None = None
    notes: list[str] = field(default_factory=list)


class IOStep(nn.Module):
    """prefill/decode with the cache as tensors: (inputs..., past...) -> (outputs..., present...)."""

    def __init__(self, inner: nn.Module, slots: IOSlots, n: int) -> None:
        super().__init__()
        self.inner, self.slots, self.n = inner, slots, n

    def forward(self, embeds: torch.Tensor, input_pos: torch.Tensor, *past: torch.Tensor):  # type: ignore[no-untyped-def]
        self.slots.past, self.slots.present = list(past), {}
        out = self.inner(embeds, input_pos)
        out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        return (*out, *(self.slots.present[i] for i in range(self.n)))


def _layout(module: nn.Module, mode: KVMode, limits: Limits, methods: tuple[str, ...], names: tuple[list[str], list[str]] = ([], [])) -> KVLayout:
    c = kv_stacks(module)[0].cfg
    held = getattr(kv_layers(module)[0].kv, "k_cache", None)  # a mode may hold its buffers in their own dtype
    return KVLayout(held_as=mode.held_as, layers=len(kv_layers(module)), kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                    max_len=limits.max_context, dtype=DTYPE_NAMES[held.dtype if held is not None else dtype_of(module)], axes=mode.axes, methods=methods,
                    inputs=tuple(names[0]), outputs=tuple(names[1]))  # fmt: skip


def _run_by_step(programs: dict[str, MethodSpec], kv_methods: tuple[str, ...]) -> dict[str, str]:
    """Every program runs its own method, but the cached methods all run ``step``."""
    return {name: name for name in programs if name != STEP} | dict.fromkeys(kv_methods, STEP)


def plan_methods(specs: list[MethodSpec], module: nn.Module, mode: KVMode, slots: IOSlots, limits: Limits) -> TracePlan:
    cached = [s for s in specs if s.cached]
    if not cached or not kv_stacks(module):
        return TracePlan({s.name: s for s in specs}, {s.name: s.name for s in specs}, {s.name: s for s in specs})
    kv_methods = tuple(s.name for s in cached)
    prefill = max(cached, key=lambda s: s.dynamic_shapes is not None)  # the one with a dynamic token count
    if not mode.explicit:
        # Core ML states are reset by the caller making a new one (and cannot be zeroed in a graph)
        kept = [s for s in specs if not (s.resets and mode.held_as == "state")]
        programs = {s.name: s for s in kept}
        aliases = {s.name: s.name for s in kept}
        if mode.one_step:
            # Decode is prefill at one token: the traced lower bound (torch specialises a size-1
            # minimum to 2) is not enforced by a runtime, which checks capacity only; the golden
            # decode calls replay through this program and show it holds.
            programs = {n: s for n, s in programs.items() if not s.cached} | {STEP: replace(prefill, name=STEP)}
            aliases = _run_by_step(programs, kv_methods)
        return TracePlan(programs, aliases, {s.name: s for s in kept}, _layout(module, mode, limits, kv_methods))
    layers = len(kv_layers(module))
    past = [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    present = [f"present_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    kv = _layout(module, mode, limits, kv_methods, (past, present))
    c = kv_stacks(module)[0].cfg
    tokens = Dim("tokens", min=1, max=min(limits.prefill_chunk, limits.max_context))
    # io: the past grows call by call; static-io: always max_context positions, written in place
    positions = None if mode.static else Dim("past", min=0, max=limits.max_context)
    example = torch.zeros(1, c.num_key_value_heads, limits.max_context if mode.static else 5, c.head_dim, dtype=dtype_of(module))
    past_dim, present_dim = (limits.max_context, limits.max_context) if mode.static else ("past", "past+tokens")
    hidden = prefill.example_inputs[0].shape[-1]
    # The cache is held in the stack's own dtype (fp16 on a GPU target): half the memory and
    # bandwidth of fp32, and nothing cast per step.
    cache_t = lambda n, dims: Tensor(n, kv.dtype, (1, c.num_key_value_heads, dims, c.head_dim))  # noqa: E731
    step = MethodSpec(
        STEP, IOStep(prefill.module, slots, 2 * layers),
        (torch.randn(1, 8, hidden, dtype=dtype_of(module)), torch.arange(5, 13), *[example.clone() for _ in past]),
        ({1: tokens}, {0: tokens}, *[None if positions is None else {2: positions} for _ in past]),
        (*prefill.inputs, *(cache_t(n, past_dim) for n in past)),
        (*prefill.outputs, *(cache_t(n, present_dim) for n in present)),
        cached=True,
    )  # fmt: skip
    programs = {s.name: s for s in specs if not s.cached and not s.resets} | {STEP: step}
    aliases = _run_by_step(programs, kv_methods)
    methods = {s.name: s for s in specs if not s.resets}
    return TracePlan(programs, aliases, methods, kv)

