"""Which layers an fp16 target keeps in fp32, by measured error.

Each layer that holds weights (linears, norms, convolutions, embeddings) and each attention is
run twice on the inputs it sees in the float reference's golden calls: as it is (fp32) and as an
fp16 copy. A layer is kept in fp32 when its fp16 output is not finite, when its relative error is
above ``TOLERANCE``, or when its input or output leaves fp16's range (then its nearest ancestor
whose outputs fit is kept too: a layer cannot hand fp16 back a value fp16 cannot hold; with no
such ancestor, the whole component stays fp32). Method inputs are rounded to fp16 where the body
starts, so a kept first layer sees fp16 inputs. The build report lists every kept layer with its
figure and reason, how many were measured, and the worst layer left in fp16, so a reader sees the
margin. Quantized linears are not measured: their weights are the QuantResult's whatever the
activation dtype."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from omni_export.export.components.kv import Attend, KVCache
from omni_export.export.precision import keep_float32, to_half

FP16_MAX = 65504.0
# Relative L2 error of one layer's fp16 output against its fp32 output on the same inputs. A
# well-conditioned fp16 layer lands near 1e-3 (fp16's 2^-11 rounding, accumulated); an order of
# magnitude above that is a layer losing real information.
TOLERANCE = 1e-2
CALLS_PER_METHOD = 2  # the first prefill and decode steps say what the rest would


@dataclass
class LayerPrecision:
    path: str
    kind: str
    rel_err: float  # worst over the measured calls
    max_abs: float  # largest |input| or |output| seen in fp32
    kept_fp32: bool = False
    reason: str = ""
    measured: bool = True  # False: an ancestor kept for a measured layer

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rel_err"] = d["rel_err"] if math.isfinite(d["rel_err"]) else "inf"
        return d


@dataclass
class PrecisionPlan:
    """The measured layers of one component and the paths kept in fp32."""

    layers: list[LayerPrecision] = field(default_factory=list)

    @property
    def keep(self) -> list[str]:
        kept = [lp.path for lp in self.layers if lp.kept_fp32]
        if "" in kept:  # the component itself: nothing of it runs in fp16
            return [""]
        # A kept parent covers its children.
        return [p for p in kept if not any(p.startswith(q + ".") for q in kept if q != p)]

    @property
    def whole(self) -> bool:
        """The whole component stays fp32 (a top-level layer's values leave fp16's range)."""
        return self.keep == [""]

    def report(self) -> list[dict]:
        return [lp.to_dict() for lp in self.layers if lp.kept_fp32] + [
            {"measured_layers": sum(lp.measured for lp in self.layers), "worst_kept_fp16": _worst(lp for lp in self.layers if not lp.kept_fp32)}
        ]


def _worst(rows: Iterable[LayerPrecision]) -> dict | None:
    rows = list(rows)
    if not rows:
        return None
    w = max(rows, key=lambda r: r.rel_err)
    return {"path": w.path, "kind": w.kind, "rel_err": w.rel_err}


def _candidates(module: nn.Module, skip: set[str]) -> dict[str, nn.Module]:
    out = {}
    for path, m in module.named_modules():
        if not path or path in skip or isinstance(m, KVCache):
            continue
        if isinstance(m, Attend) or next(m.parameters(recurse=False), None) is not None:
            out[path] = m
    return out


def _floats(values: Sequence[object]) -> list[torch.Tensor]:
    flat: list[torch.Tensor] = []
    for v in values:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            flat.append(v)
        elif isinstance(v, (tuple, list)):
            flat.extend(_floats(v))
    return flat


def _half(v: object) -> object:
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.half()
    if isinstance(v, (tuple, list)):
        return type(v)(_half(x) for x in v)
    return v


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    if not torch.isfinite(a).all():
        return math.inf
    n = ref.norm()
    return float((a - ref).norm() / n) if n > 0 else float((a - ref).abs().max(initial=0.0) if a.numel() else 0.0)


def _holder(path: str, out_max: dict[str, float]) -> str:
    """The nearest ancestor of ``path`` whose outputs fit fp16 ("" when none does)."""
    parent = path.rpartition(".")[0]
    while parent and out_max.get(parent, math.inf) > FP16_MAX:
        parent = parent.rpartition(".")[0]
    return parent


def measure_fp16(module: nn.Module, run_script, skip: set[str] = frozenset(), tolerance: float = TOLERANCE) -> PrecisionPlan:  # type: ignore[assignment,no-untyped-def]
    """Measure every candidate layer of fp32 ``module`` while ``run_script()`` drives it (the
    golden calls); returns the plan. Each layer's fp16 copy exists only for its own check."""
    found: dict[str, LayerPrecision] = {}
    busy = [False]

    def hook(path: str, m: nn.Module):  # type: ignore[no-untyped-def]
        def check(_m, args, kwargs, output):  # type: ignore[no-untyped-def]
            if busy[0]:
                return
            busy[0] = True
            try:
                ref = _floats([output])
                seen = max([float(t.abs().max()) for t in [*_floats(list(args)), *ref] if t.numel()] or [0.0])
                half = copy.deepcopy(m)
                for sub in half.modules():  # a standalone check: not the original's hooks (computing_in's widening)
                    sub._forward_pre_hooks.clear()
                    sub._forward_hooks.clear()
                half = half.half()
                with torch.no_grad():
                    got = _floats([half(*_half(list(args)), **{k: _half(v) for k, v in kwargs.items()})])
                err = max([_rel(g.float(), r.float()) for g, r in zip(got, ref, strict=False)] or [0.0])
                lp = found.setdefault(path, LayerPrecision(path, type(m).__name__, 0.0, 0.0))
                lp.rel_err, lp.max_abs = max(lp.rel_err, err), max(lp.max_abs, seen)
            finally:
                busy[0] = False

        return check

    out_max: dict[str, float] = {}  # every module's largest |output|: where an overflow can be handed back

    def track(path: str):  # type: ignore[no-untyped-def]
        def see(_m, _args, output):  # type: ignore[no-untyped-def]
            if not busy[0]:
                vals = [float(t.abs().max()) for t in _floats([output]) if t.numel()]
                out_max[path] = max([out_max.get(path, 0.0), *vals])

        return see

    handles = [m.register_forward_hook(hook(p, m), with_kwargs=True) for p, m in _candidates(module, set(skip)).items()]
    handles += [m.register_forward_hook(track(p)) for p, m in module.named_modules() if p]
    try:
        run_script()
    finally:
        for h in handles:
            h.remove()
    plan = PrecisionPlan(sorted(found.values(), key=lambda lp: lp.path))
    paths = {lp.path for lp in plan.layers}
    for lp in list(plan.layers):
        if lp.max_abs > FP16_MAX:
            lp.kept_fp32, lp.reason = True, f"values up to {lp.max_abs:.3g} exceed fp16's range"
            holder = _holder(lp.path, out_max)
            if holder not in paths:  # "" is the component: it then runs in fp32 throughout
                plan.layers.append(LayerPrecision(holder, type(module.get_submodule(holder)).__name__, lp.rel_err,
                                                  out_max.get(holder, math.inf), True,
                                                  f"holds {lp.path}, whose values exceed fp16's range", measured=False))  # fmt: skip
                paths.add(holder)
        elif not math.isfinite(lp.rel_err):
            lp.kept_fp32, lp.reason = True, "fp16 output is not finite"
        elif lp.rel_err > tolerance:
            lp.kept_fp32, lp.reason = True, f"fp16 relative error {lp.rel_err:.2e} > {tolerance:g}"
    return plan


@contextmanager
def fp16_forms(module: nn.Module, plan: PrecisionPlan | None,
               forms: Callable[[nn.Module], AbstractContextManager[None]] = lambda m: nullcontext()) -> Iterator[None]:  # fmt: skip
    """While an fp16 target traces ``module``: its body in fp16 with ``plan``'s layers kept fp32
    (the whole component fp32 when the plan says so), audio spectra as matmuls over the DFT basis
    (neither TensorRT nor the Neural Engine has an FFT) and the target's own module ``forms``.
    The module is the compiler's copy, consumed by this build: it stays fp16 afterwards."""
    whole = plan is not None and plan.whole
    with forms(module), matmul_spectra(module):
        undo = [] if whole else keep_float32(module, plan.keep if plan else [])
        if not whole:
            to_half(module)
        try:
            yield
        finally:
            for owner, leaf, inner in undo:
                setattr(owner, leaf, inner)


@contextmanager
def matmul_spectra(module: nn.Module) -> Iterator[None]:
    """Audio front ends' framing and spectrum as gathers and matmuls over the DFT basis (for
    compilers without FFT or unfold: TensorRT, Core ML)."""
    spectra = [m for m in module.modules() if getattr(m, "dft", None) == "fft"]
    for m in spectra:
        m.dft = "matmul"
    try:
        yield
    finally:
        for m in spectra:
            m.dft = "fft"
