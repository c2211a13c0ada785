"""torch.export of every component, per method, with the dynamic shapes each needs.

A component that cannot be traced fails with a TraceError naming the component, the method, the
module path inside the component and the source line and op that broke, not a stack of
framework frames."""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass

import torch
from torch import nn
from torch.export import ExportedProgram

from omni_export.errors import OmniExportError
from omni_export.bundle.manifest import KVLayout
from omni_export.export.components.kv import KV_MODES, REFERENCE, KVMode, kv_stacks, reset_kv, use_kv
from omni_export.export.kv_methods import plan_methods
from omni_export.export.precision import CastIO
from omni_export.export.trace_specs import TORCH_DTYPES, Limits, MethodSpec, dtype_of, method_specs

log = logging.getLogger(__name__)


class TraceError(OmniExportError):
    """A component could not be captured by torch.export."""


@dataclass
class TracedComponent:
    name: str
    module: nn.Module
    specs: dict[str, MethodSpec]  # the methods the bundle exposes
    programs: dict[str, ExportedProgram]  # what was traced, by program name
    program_specs: dict[str, MethodSpec]
    aliases: dict[str, str]  # method -> the program that runs it
    kv: KVLayout | None = None


def prepare(module: nn.Module, limits: Limits) -> None:
    """Give every KV-cached stack a zeroed static cache of the traced length."""
    for stack in kv_stacks(module, allocated=False):
        stack.setup_cache(limits.max_context)


def _explain(component: str, method: str, root: nn.Module, exc: BaseException) -> str:
    """The deepest frame running a module of this component names the module path and the line."""
    names = {id(m): n for n, m in root.named_modules()}
    where, module_path = "", ""
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            module_path = names[id(owner)] or "(component root)"
            where = f"{frame.f_code.co_filename}:{lineno} in {type(owner).__name__}.{frame.f_code.co_name}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"cannot trace {component}.{method}: {type(exc).__name__}: {first}"
        + (f"\n  module: {component}.{module_path}" if module_path else "")
        + (f"\n  at {where}" if where else "")
        + "\n  Make the op there shape-static and data-independent (no Python branches on tensor values,"
        " .item() or .tolist()), or register an export-friendly replacement for the module."
    )


def trace_component(name: str, module: nn.Module, limits: Limits, kv: KVMode | str = REFERENCE) -> TracedComponent:
    """Trace every method of ``module`` with its stacks' caches in ``kv`` mode (the target's)."""
    module.eval()
    prepare(module, limits)
    with use_kv(module, kv) as slots:
        mode = KV_MODES.get(kv) if isinstance(kv, str) else kv
        plan = plan_methods(method_specs(module, limits), module, mode, slots, limits)
        programs = {}
        for spec in plan.programs.values():
            programs[spec.name] = _export(name, module, spec)
    reset_kv(module)  # tracing ran example inputs through the caches
    return TracedComponent(name, module, plan.methods, programs, plan.programs, plan.aliases, plan.kv)


def _boundary(spec: MethodSpec) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The method as traced: where the body's float dtype differs from the spec's (an fp16 body
    behind fp32 inputs and outputs), a CastIO in front of it and examples in the spec's dtypes."""
    body = dtype_of(spec.module) if next(spec.module.parameters(), None) is not None else torch.float32
    if body == torch.float32:
        return spec.module, spec.example_inputs
    want_in = [TORCH_DTYPES[t.dtype] if x.is_floating_point() else None for t, x in zip(spec.inputs, spec.example_inputs, strict=True)]
    examples = tuple(x if d is None else x.to(d) for x, d in zip(spec.example_inputs, want_in, strict=True))
    inner = [None if d is None else x.dtype for x, d in zip(spec.example_inputs, want_in, strict=True)]
    want_out = [TORCH_DTYPES[t.dtype] if t.dtype in ("float32", "float16", "bfloat16") else None for t in spec.outputs]
    return CastIO(spec.module, inner, want_out), examples


def _export(name: str, module: nn.Module, spec: MethodSpec) -> ExportedProgram:
    traced, examples = _boundary(spec)
    code = traced.forward.__code__
    dyn = spec.dynamic_shapes
    if code.co_flags & 0x04 and dyn is not None:  # forward(..., *args): the *args shapes nest one level
        named = code.co_argcount - 1
        dyn = (*dyn[:named], tuple(dyn[named:]))
    try:
        # Default grad mode, as ExecuTorch's own exports do; under no_grad the host's conv kernel
        # choice differed and, re-traced in lowering, cut dynamic ranges (see the target's
        # oneDNN note and its range check).
        program = torch.export.export(traced, examples, dynamic_shapes=dyn, strict=False)
    except Exception as exc:  # torch.export raises many unrelated types
        raise TraceError(_explain(name, spec.name, module, exc)) from exc
    log.info("traced %s.%s: %d nodes", name, spec.name, len(program.graph.nodes))
    return program
