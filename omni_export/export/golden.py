"""Golden calls per component class: realistic inputs (real tokens through the tokenizer, a
voiced signal, an image pattern), replayed on the fp32 eager module and on an fp16 copy.
Autoregressive stacks are teacher-forced: a prefill, then decode steps fed the reference's own
greedy continuation, so every backend sees identical inputs."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from omni_export.bundle.golden import GoldenCall
from omni_export.export.components.base import component
from omni_export.export.components.kv import KV_MODES, install, kv_layers, kv_stacks, reset_kv
from omni_export.export.trace import prepare
from omni_export.export.trace_specs import Limits, method_specs
from omni_export.export.widen import compute_dtype, computing_in
from omni_export.runtime_py.backends.eager import EagerIOSession, EagerSession

DECODE_STEPS = 32
GOLDEN_TEXT = "Describe the picture and answer the spoken question in one short sentence."
Script = list[tuple[str, tuple[torch.Tensor, ...]]]


@dataclass
class Context:
    tokenizer: Any
    limits: Limits
    seed: int = 0


def eager_session(module: nn.Module, limits: Limits) -> tuple[EagerSession, dict[str, tuple[list[str], list[str]]]]:
    """The component's traced methods, run eagerly: the same wrappers torch.export saw."""
    session, specs = eager_methods(module, limits)
    return session, {s.name: ([t.name for t in s.inputs], [t.name for t in s.outputs]) for s in specs}


def eager_methods(module: nn.Module, limits: Limits) -> tuple[EagerSession, list]:  # list[MethodSpec]
    """Inputs go in the type the module computes in: computing_in's, else its first parameter's."""
    prepare(module, limits)
    specs = method_specs(module, limits)

    first = next(module.parameters(), None)
    device = None if first is None else first.device
    dtype = compute_dtype(module) or (None if first is None else first.dtype)
    return EagerSession({s.name: s.module for s in specs}, lambda: reset_kv(module), dtype, device), specs


def eager_io_session(module: nn.Module, limits: Limits, mode: str = "io") -> EagerIOSession:
    """A copy of the component with its stacks in an explicit-cache mode (``io`` by default):
    prefill and decode take and return the cache as tensors, the contract ONNX Runtime and
    TensorRT sessions keep."""
    module = copy.deepcopy(module)
    prepare(module, limits)
    kv_mode = KV_MODES.get(mode)
    slots = install(module, kv_mode)
    specs = method_specs(module, limits)
    layers = kv_stacks(module)
    c = layers[0].cfg
    n = 2 * len(kv_layers(module))
    dtype = next(module.parameters()).dtype
    start = limits.max_context if kv_mode.static else 0  # static-io tensors always hold max_context positions
    empty = lambda: [torch.zeros(1, c.num_key_value_heads, start, c.head_dim, dtype=dtype) for _ in range(n)]  # noqa: E731
    return EagerIOSession({s.name: s.module for s in specs if not s.resets}, slots, empty)


def voiced_signal(seconds: float, sr: int = 16000) -> torch.Tensor:
    """A vowel-like test signal: 120 Hz harmonics under formant-shaped gains, with a slow glide."""
    t = torch.arange(int(seconds * sr)) / sr
    f0 = 120 + 20 * torch.sin(2 * math.pi * 0.5 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / sr
    formants = torch.tensor([700.0, 1200.0, 2600.0])
    wav = sum(
        torch.exp(-((k * 120 - formants) ** 2).min() / (2 * 200.0**2)) * torch.sin(k * phase) for k in range(1, 30)
    )
    return (0.3 * wav / wav.abs().max()).float()


def image_tiles(n: int, size: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    tiles = [torch.stack([torch.sin(3 * x + i), torch.cos(2 * y - i), x * y]) * 1.5 for i in range(n)]
    return torch.stack(tiles)


def teacher_forced(ref: EagerSession, prefix: torch.Tensor, embed: Callable[[int], torch.Tensor], allowed: int, steps: int,
                   start: int | None = None) -> Script:  # fmt: skip
    """prefill(prefix), then ``steps`` decodes of the reference's own greedy continuation (the
    first of them ``start`` where a decoder begins with a fixed token, VITA's sos)."""
    n = prefix.shape[1]
    script: Script = [("prefill", (prefix, torch.arange(n)))]
    logits = ref.run("prefill", script[0][1])[0]
    for i in range(steps):
        tok = start if i == 0 and start is not None else int(logits[0, -1, :allowed].argmax())
        inputs = (embed(tok), torch.tensor([n + i]))
        script.append(("decode", inputs))
        logits = ref.run("decode", inputs)[0]
    ref.reset()
    return script



def _to_np(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().numpy() if x.is_floating_point() else x.detach().numpy()


def _counted(sess: EagerSession, script: Script) -> tuple[list[list[torch.Tensor]], list[int]]:
    """Run a script, counting each call's floating-point operations against weights: linear
    layers (mm, addmm) and convolutions. Attention's batched matmuls (bmm, sdpa) are left out: the
    reference attends over its whole static KV cache where a device kernel reads only the filled
    prefix, so counting them would lift the floor above what a device must do."""
    from torch.utils.flop_counter import FlopCounterMode

    outs, flops = [], []
    for method, inputs in script:
        with FlopCounterMode(display=False) as counter:
            outs.append(sess.run(method, inputs))
        per_op = counter.get_flop_counts().get("Global", {})
        flops.append(int(sum(n for op, n in per_op.items() if not any(k in str(op) for k in ("bmm", "scaled_dot_product")))))
    return outs, flops


def flops_per_position(script: Script, flops: list[int], methods: dict[str, Any]) -> dict[str, float]:
    """method -> operations per position of its first input's symbolic dims (tokens, frames,
    tiles), averaged over the script's calls: what a compute roofline multiplies a call's
    positions by."""
    from omni_export.runtime_py.timing import positions, symbolic_axes

    axes = symbolic_axes(methods)
    per: dict[str, list[float]] = {}
    for (method, inputs), f in zip(script, flops, strict=True):
        per.setdefault(method, []).append(f / max(positions(axes.get(method, []), inputs[0]), 1))
    return {m: float(np.mean(v)) for m, v in per.items()}


def method_flops(module: nn.Module, ctx: Context) -> dict[str, float]:
    """flops_per_position for an eager component (a checkpoint run without a bundle)."""
    ref32, specs = eager_methods(module, ctx.limits)
    with torch.inference_mode():
        script = component(module).golden_script(ctx, ref32)
        ref32.reset()
        _, flops = _counted(ref32, script)
        ref32.reset()
    return flops_per_position(script, flops, {s.name: s for s in specs})


def replay(module: nn.Module, limits: Limits, script: Script, per_method: int | None = None) -> None:
    """Run golden ``script`` on the eager ``module`` (for measurements taken with hooks); with
    ``per_method``, only the first calls of each method. Leaves its caches zeroed."""
    ref, _ = eager_session(module, limits)
    seen: dict[str, int] = {}
    ref.reset()
    with torch.inference_mode():
        for method, inputs in script:
            seen[method] = seen.get(method, 0) + 1
            if per_method is None or seen[method] <= per_method:
                ref.run(method, inputs)
    ref.reset()


def make_golden(module: nn.Module, ctx: Context) -> tuple[list[GoldenCall], dict[str, tuple[list[str], list[str]]], Script, list[int]]:
    """Golden calls for one eager component, with fp32 and fp16 reference outputs; also the script
    and each call's operation count (for the roofline). The module may be stored in any float
    type (a bf16 checkpoint): each reference computes in its own type (computing_in) without a
    copy of the component."""
    with computing_in(module, torch.float32):
        ref32, io = eager_session(module, ctx.limits)
        with torch.inference_mode():
            script = component(module).golden_script(ctx, ref32)
            ref32.reset()
            outs: dict[str, list[list[torch.Tensor]]] = {}
            outs["fp32"], flops = _counted(ref32, script)
            ref32.reset()
    with computing_in(module, torch.float16):
        ref16, _ = eager_session(module, ctx.limits)
        with torch.inference_mode():
            ref16.reset()  # the fp16 session casts inputs itself
            outs["fp16"] = [ref16.run(method, inputs) for method, inputs in script]
            ref16.reset()
    calls = []
    for i, (method, inputs) in enumerate(script):
        in_names, out_names = io[method]
        calls.append(GoldenCall(
            method,
            {n: _to_np(x) for n, x in zip(in_names, inputs, strict=True)},
            {p: {n: _to_np(y) for n, y in zip(out_names, outs[p][i], strict=True)} for p in outs},
        ))  # fmt: skip
    return calls, io, script, flops
