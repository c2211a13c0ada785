"""ExecuTorch for Android and any ARM/x86 CPU: XNNPACK-delegated, one multi-method ``.pte`` per
component. Methods of one component share their weights and their KV cache (mutable buffers
planned once with ``share_mutable_buffers``), so ``prefill`` fills the cache ``decode`` reads;
``reset_cache`` zeroes it."""

from __future__ import annotations

import copy
import functools
import gc
import logging
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omni_export.export.components.base import Role
from omni_export.export.components.kv import KV_MODES, Attend, KVCache, KVMode
from omni_export.export.components.layers import RMSNorm
from omni_export.targets import torchao_encode
from omni_export.bundle.manifest import Delegation, RuntimeSettings
from omni_export.files import staged_file
from omni_export.targets.base import TARGETS, Artifact, LoweringError, Target, apply_floats, delegation, library_chatter, traced_forms
from omni_export.targets.precision import fp16_forms, measure_fp16
from omni_export.targets.tables import shared_tables

log = logging.getLogger(__name__)


# Operator namespaces that are real kernels; getitem, sym_size and SymInt arithmetic are bookkeeping.
_KERNEL_PREFIXES = ("aten_", "dim_order_ops_", "quantized_decomposed_", "llama_", "torchao_")


def _delegation(graph_module) -> Delegation:  # type: ignore[no-untyped-def]
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    fallback = {
        op: b.non_delegated for op, b in info.delegation_by_operator.items()
        if b.non_delegated and op.startswith(_KERNEL_PREFIXES)
    }  # fmt: skip
    return delegation(info.num_delegated_nodes, sum(fallback.values()), info.num_delegated_subgraphs, fallback)


@contextmanager
def _no_onednn() -> Iterator[None]:
    """Host CPU kernel choice must not shape a device graph: with oneDNN on, convolutions pick an
    algorithm by input size while exporting and lowering re-trace, and that choice becomes a shape
    guard on the example size (a Whisper encoder declared for 30 s came out accepting 6.4 s)."""
    with warnings.catch_warnings():
        # restoring the flags warns about Intel-GPU TF32, which has nothing to do with this host
        warnings.filterwarnings("ignore", message="TF32 acceleration")
        with torch.backends.mkldnn.flags(enabled=False):
            yield


@contextmanager
def _tracing() -> Iterator[None]:
    """Tracing and lowering alike: host kernels kept out of the graph, exporter chatter to the log."""
    with library_chatter("executorch", "torch.export"), _no_onednn():
        yield


def _mean_last(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x.mean(-1, keepdim=True)`` as a product with a constant averaging column: XNNPACK takes
    a linear over any rank, where its mean.dim is 4-D pooling only. A norm left to the portable
    kernels splits every decoder layer into several delegate calls (slower to lower, and a
    boundary crossing per norm at run time)."""
    return F.linear(x, m.xnnpack_average.to(x.dtype))  # fp32 inside an fp16 build's norms


class XnnpackRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(_mean_last(self, h * h) + self.eps)
        return self.weight * h.to(dtype)


class XnnpackLayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x - _mean_last(self, x)
        y = xc * torch.rsqrt(_mean_last(self, xc * xc) + self.eps)
        y = y if self.weight is None else y * self.weight
        return y if self.bias is None else y + self.bias


@contextmanager
def xnnpack_forms(module: nn.Module) -> Iterator[None]:
    """While tracing: norms in forms XNNPACK delegates whole (equal to fp32 rounding; parity
    checks every build). The averaging column is a constant of the graph (a buffer while traced)."""
    with traced_forms(module, {RMSNorm: XnnpackRMSNorm, nn.LayerNorm: XnnpackLayerNorm},
                      lambda m: not isinstance(m, nn.LayerNorm) or len(m.normalized_shape) == 1):  # fmt: skip
        norms = [m for m in module.modules() if isinstance(m, (XnnpackRMSNorm, XnnpackLayerNorm))]
        for m in norms:
            d = m.weight.shape[0] if isinstance(m, RMSNorm) else m.normalized_shape[0]
            m.register_buffer("xnnpack_average", torch.full((1, d), 1.0 / d), persistent=False)
        try:
            yield
        finally:
            for m in norms:
                del m._buffers["xnnpack_average"]


class ExecuTorchCache(KVCache):
    """Buffers [1, max_len, kv_heads, D] written in place by ``llama::update_cache`` from the
    first position (the positions of one call are consecutive)."""

    def __init__(self, kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype) -> None:
        super().__init__()
        shape = (1, max_len, kv_heads, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, k, v, input_pos):  # type: ignore[no-untyped-def]
        start = _start(input_pos, self.k_cache.shape[1])
        torch.ops.llama.update_cache(k.to(self.k_cache.dtype), self.k_cache, start)
        torch.ops.llama.update_cache(v.to(self.v_cache.dtype), self.v_cache, start)
        return self.k_cache, self.v_cache

    def reset(self) -> None:
        # In place, as update() writes: zero_() traces as a new zero tensor copied over each
        # buffer, all planned at once, and the runtime sizes every method's arena to the largest
        # method's (a second whole cache at 0.6B: 117 MB); one zero image here is reused.
        zeros = torch.zeros_like(self.k_cache)
        torch.ops.llama.update_cache(zeros, self.k_cache, 0)
        torch.ops.llama.update_cache(zeros, self.v_cache, 0)


class ExecuTorchAttention(Attend):
    """``llama::custom_sdpa``: attends to the filled prefix only, grouped heads without copies."""

    def __init__(self, n_rep: int, whole_call: bool, head_dim: int, dtype: torch.dtype) -> None:
        super().__init__(n_rep, whole_call)
        self.register_buffer("turn", _half_turn(head_dim, dtype), persistent=False)

    def half_turn(self, x):  # type: ignore[no-untyped-def]
        # a linear by a signed permutation (exact: one +-1 per row): rotate_half's slices and
        # concatenation over a dynamic token count are not XNNPACK's, and each one it refuses
        # cuts the delegated graph (four per layer)
        return F.linear(x, self.turn if self.turn.dtype == x.dtype else self.turn.to(x.dtype))

    def forward(self, q, keys, values, input_pos):  # type: ignore[no-untyped-def]
        b, _, h, d = q.shape
        # not causal: every query reads the filled prefix through this call's last position;
        # the kernel takes one element type, the cache's
        out = torch.ops.llama.custom_sdpa(q.to(keys.dtype), keys, values, _start(input_pos, keys.shape[1]), None, 0, not self.whole_call)
        return out.reshape(b, -1, h * d).to(q.dtype)  # the token count inferred: see QwenAttention


@functools.lru_cache(maxsize=8)  # one tensor every layer's attention holds (made before tracing)
def _half_turn(d: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight W with ``F.linear(x, W) == rotate_half(x)``: out[i] = -x[i + d/2] for i < d/2,
    x[i - d/2] after."""
    half, w = d // 2, torch.zeros(d, d, dtype=dtype)
    w[torch.arange(half), torch.arange(half, d)] = -1
    w[torch.arange(half, d), torch.arange(half)] = 1
    return w


def _start(input_pos: torch.Tensor, max_len: int):  # type: ignore[no-untyped-def]
    start = input_pos[0].item()
    torch._check(start >= 0)
    torch._check(start < max_len)
    return start


def _et_cache(dtype: torch.dtype | None = None):  # type: ignore[no-untyped-def]
    """Caches in the stack's dtype, or in ``dtype`` whatever the stack's."""

    def make(stack, layer: int, max_len: int, slots) -> KVCache:  # type: ignore[no-untyped-def]
        from executorch.extension.llm.custom_ops import (
            custom_ops,  # noqa: F401  (registers the ops)
        )

        return ExecuTorchCache(stack.cfg.num_key_value_heads, stack.cfg.head_dim, max_len, dtype or stack.norm.weight.dtype)

    return make


# In-place update and prefix-only attention: index_put + masked SDPA over repeated heads would
# copy whole caches every step.
_ET_AXES = ("batch", "positions", "kv_heads", "head_dim")
def _et_attend(stack, n_rep: int, layer: int, slots) -> Attend:  # type: ignore[no-untyped-def]
    return ExecuTorchAttention(n_rep, stack.whole_call, stack.cfg.head_dim, stack.norm.weight.dtype)


ET_KV = KV_MODES.register("executorch", KVMode("executorch", "buffers", _ET_AXES, _et_cache(), _et_attend, one_step=True))
ET_KV16 = KV_MODES.register("executorch-fp16", KVMode("executorch-fp16", "buffers", _ET_AXES, _et_cache(torch.float16), _et_attend,
                                                      one_step=True))  # fmt: skip


@contextmanager
def _weights_shared_with_preprocess() -> Iterator[None]:
    """ExecuTorch deep-copies the program of every partition of every method before XNNPACK
    preprocesses any, so that the backend may rewrite a graph of its own; the copies take the
    weights with them and are all held at once (the 4B LLM's lowering peaked at 23.78 GB with
    prefill's and decode's copies of every code, 15.49 GB without). The graph is still copied; the
    weight tensors are shared, as ExecuTorch's CUDA backend does for the same reason (XNNPACK's
    passes build new constants and never write into the source's)."""
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    def copy_sharing_weights(cls, program, compile_specs):  # type: ignore[no-untyped-def]
        weights = (*program.state_dict.values(), *program.constants.values())
        return copy.deepcopy(program, {id(t): t for t in weights if isinstance(t, torch.Tensor)})

    had = "copy_exported_program_for_preprocess" in XnnpackBackend.__dict__
    before = XnnpackBackend.__dict__.get("copy_exported_program_for_preprocess")
    XnnpackBackend.copy_exported_program_for_preprocess = classmethod(copy_sharing_weights)
    try:
        yield
    finally:
        if had:
            XnnpackBackend.copy_exported_program_for_preprocess = before
        else:
            del XnnpackBackend.copy_exported_program_for_preprocess


@contextmanager
def _no_graphs_left_behind() -> Iterator[None]:
    """ExecuTorch keeps the graphs it lowered reachable from module state after lowering returns:
    ``exir.backend.utils.is_same_node`` is an unbounded ``lru_cache`` keyed by graph nodes, the
    partitioners' module-level ``WhyNoPartition`` loggers hold the last node they rejected, and
    torch's class-wide caches (fake-tensor dispatch, ShapeEnv's methods) key calls by their
    arguments, lowered modules among them. Each reaches a graph, its program and every lowered
    module with their payloads: a tiny bundle's build left 99 lowered modules alive, the 4B build
    8.7 GB resident after its LLM. All are let go when lowering ends."""
    try:
        yield
    finally:
        from executorch.exir.backend import utils
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        utils.is_same_node.cache_clear()
        torch._subclasses.fake_tensor.FakeTensorMode.cache_clear()
        # ShapeEnv's methods are lru_caches on the class, keyed by the instance: they keep every
        # shape environment (and its own dispatch cache, which holds lowered modules) alive.
        for attr in vars(ShapeEnv).values():
            if callable(clear := getattr(attr, "cache_clear", None)):
                clear()
        # Each shape environment's own dispatch cache closes a cycle through C++ (its symbolic
        # sizes live in tensors' C++ sizes) that the collector cannot see, let alone free.
        for obj in gc.get_objects():
            if type(obj) is ShapeEnv:
                obj.fake_tensor_cache.clear()
        for name, mod in list(sys.modules.items()):
            if name.startswith("executorch.") and mod is not None:
                for value in list(vars(mod).values()):
                    if isinstance(value, utils.WhyNoPartition):
                        value.node, value.reason = None, ""


def _data_outside(tag: str):  # type: ignore[no-untyped-def]
    """An edge pass that sends the constants XNNPACK will take to the ``tag`` data file (the
    program's own constants go there by ``external_constants``); ExecuTorch stores equal bytes
    in one file once."""
    from executorch.exir.pass_base import PassResult

    def run(gm):  # type: ignore[no-untyped-def]
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                node.meta.setdefault("custom", {})["delegate_constant_tag"] = tag
        return PassResult(gm, True)

    return run


def _constants_outside(edge, tag: str):  # type: ignore[no-untyped-def]
    """The program's constants to the ``tag`` data file, but not its mutable buffers (the KV
    cache): those are planned memory, which a data file cannot hold."""
    mutable = set()
    for method in edge.methods:
        sig = edge.exported_program(method).graph_signature
        written = set(sig.buffers_to_mutate.values())
        mutable |= {ph for ph, buf in sig.inputs_to_buffers.items() if buf in written}
    return lambda node: None if node.name in mutable else tag


def _check_ranges(traced, edge) -> None:  # type: ignore[no-untyped-def]
    """The lowered program must accept every size the trace declared: a lowered upper bound would
    pass parity on the golden sizes and fail on the device. (Lower bounds are not enforced by the
    runtime, which only checks capacity; torch specialises size-1 minimums to 2 anyway.)"""
    for method, program in traced.programs.items():
        declared = {str(k): v.upper for k, v in program.range_constraints.items()}
        lowered = {str(k): v.upper for k, v in edge.exported_program(method).range_constraints.items()}
        narrowed = {k: (declared[k], lowered[k]) for k in declared if k in lowered and lowered[k] < declared[k]}
        if narrowed:
            raise LoweringError(f"{traced.name}.{method}: lowering cut dynamic upper bounds {narrowed} (declared, lowered)")


FP32_ROLES = (Role.FRONTEND.value, Role.VOCODER.value, Role.ACOUSTIC.value)  # see float_class_for


class ExecuTorchTarget(Target):
    name = "executorch"
    backend = "executorch"
    parity_backend = "executorch"
    kv_mode = ET_KV.name
    extension = ".pte"
    quant_activation = "int8 dynamic, asymmetric per token (XNNPACK)"
    no_shared_head = ""

    def float_class_for(self, profile, recipe, role=None) -> str:  # type: ignore[no-untyped-def]
        """fp16 where the profile's cores compute it and the recipe asks for it, quantized stacks
        included: their linears then take fp16 activations (XNNPACK's qd8-f16 kernels), and what
        the recipe keeps float (norms, attention, the body between linears) runs fp16 but for the
        layers the precision plan measures fp16 cannot hold. Vocoders stay fp32: every layer of
        the demo's HiFT measured within 4e-4 in fp16, yet XNNPACK's fp16 waveform missed the gate
        (cosine 0.991 against 0.999): rounding accumulates through its upsampling stack. Flow
        stays fp32 too: in fp16 its encoder returned NaN from the second chunk on (the one that
        attends over the cache), where the eager fp16 reference is finite. So do audio front
        ends, which hold no weight for the plan to measure: VITA's log-mel in fp16 missed its
        gate (cosine 0.9986 against 0.999)."""
        et = profile.executorch
        fp16 = et is not None and et.float_dtype == "fp16" and recipe.float_dtype == "fp16"
        return "fp16" if fp16 and role not in FP32_ROLES else self.float_class

    def precision_plan(self, module, run_script, skip, precision):  # type: ignore[no-untyped-def]
        return measure_fp16(module, run_script, skip) if precision == "fp16" else None

    @contextmanager
    def trace_context(self, module: nn.Module, limits, plan=None) -> Iterator[None]:  # type: ignore[no-untyped-def]
        # An fp16 build: the body in fp16, the plan's layers in fp32 (their casts stay outside
        # XNNPACK, which converts no dtype: a kept layer costs a delegate boundary each side).
        if plan is not None and not plan.whole:
            torchao_encode.activations_to(module, torch.float16, plan.keep)
        forms = fp16_forms(module, plan, xnnpack_forms) if plan is not None else xnnpack_forms(module)
        with _tracing(), forms:
            yield

    def kv_mode_for(self, module: nn.Module, profile=None) -> str:  # type: ignore[no-untyped-def]
        fp16 = profile is not None and profile.executorch is not None and profile.executorch.kv_dtype == "fp16"
        return ET_KV16.name if fp16 else self.kv_mode

    def runtime_settings(self, profile) -> RuntimeSettings:  # type: ignore[no-untyped-def]
        # No XNNPACK weight cache: it let a decoder's prefill and decode methods share one packing
        # of each weight, and each decoder is one method now (the 0.6B bundle's methods have
        # 128-576 bytes of weights in common; loaded RSS 1046 MB with it, 1053 without). With it,
        # ExecuTorch 1.5.1 crashes loading an fp16 body whose subgraph XNNPACK partly moves to
        # fp32 (xnn_weights_cache_alias_data); bundles built before keep their recorded option.
        return RuntimeSettings(threads=profile.executorch.threads if profile.executorch else 0)

    @staticmethod
    def _lower(traced, partitioners: list, metadata: dict[str, Any], data_tag: str | None = None):  # type: ignore[no-untyped-def]
        from executorch.exir import (
            EdgeCompileConfig,
            ExecutorchBackendConfig,
            to_edge_transform_and_lower,
        )
        from executorch.exir.passes import MemoryPlanningPass

        edge = to_edge_transform_and_lower(
            traced.programs,
            transform_passes=[_data_outside(data_tag)] if data_tag else None,
            partitioner=partitioners,
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
            constant_methods=metadata or None,
        )
        delegation = {m: _delegation(edge.exported_program(m).graph_module) for m in traced.programs}
        _check_ranges(traced, edge)
        program = edge.to_executorch(
            ExecutorchBackendConfig(
                # Caches are not stored initialised (that is a cache image per method); the component's
                # reset_cache method zeroes them, and the runtime calls it before the first turn.
                memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=True),
                emit_mutable_buffer_names=True,
                extract_delegate_segments=True,
                external_constants=_constants_outside(edge, data_tag) if data_tag else False,
            )
        )
        return program, delegation

    def check_quant(self, configs, profile=None):  # type: ignore[no-untyped-def]
        return torchao_encode.check(configs, self.name)

    def encode(self, module, tensors, floats):  # type: ignore[no-untyped-def]
        torchao_encode.encode(module, tensors)
        apply_floats(module, floats)

    def lower(self, traced, profile, root: Path, metadata: dict[str, Any], quant) -> Artifact:  # type: ignore[no-untyped-def]
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
            XnnpackPartitioner,
        )

        delegates = profile.executorch.delegates if profile.executorch else ("xnnpack",)
        partitioners = {"xnnpack": XnnpackPartitioner}
        unknown = [d for d in delegates if d not in partitioners]
        if unknown:
            raise LoweringError(f"profile {profile.name}: ExecuTorch delegate(s) {unknown} are not supported; known: {sorted(partitioners)}")
        start = time.perf_counter()
        # A table a tied head reads too: every weight goes to one .ptd beside the program, where
        # the gather's codes and the XNNPACK head's (the same bytes) are stored once.
        data_tag = traced.name if shared_tables(traced.module) else None
        with _tracing(), _weights_shared_with_preprocess(), _no_graphs_left_behind():
            try:
                program, delegation = self._lower(traced, [partitioners[d]() for d in delegates], metadata, data_tag)
            except Exception as exc:  # exir raises many types; name the component and the first line
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise LoweringError(f"ExecuTorch cannot lower {traced.name}: {type(exc).__name__}: {first}") from exc
        files = [f"artifacts/{traced.name}{self.extension}"]
        with staged_file(root / files[0]) as tmp, open(tmp, "wb") as f:
            program.write_to_file(f)
        for tag, cord in (program._tensor_data or {}).items():  # written by write_to_file above; a Cord, not one bytes copy
            files.append(f"artifacts/{tag}.ptd")
            with staged_file(root / files[-1]) as tmp, open(tmp, "wb") as f:
                cord.write_to_file(f)
        entries = {m: traced.aliases[m] for m in traced.specs}
        return Artifact(traced.name, tuple(files), entries, self.backend, delegation, time.perf_counter() - start)


TARGETS.register(ExecuTorchTarget.name, ExecuTorchTarget())
