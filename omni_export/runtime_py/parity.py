"""Parity: one definition of every metric (DESIGN.md, Metrics) and the replay of a component's
golden calls on any session, judged against the eager reference."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from omni_export.bundle.golden import GoldenCall
from omni_export.runtime_py.backends.base import Session
from omni_export.runtime_py.kv_cache import KVStack

if TYPE_CHECKING:
    from omni_export.bundle.manifest import ComponentEntry, RuntimeSettings


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom else float(np.array_equal(a, b))


def rel_l2(a: np.ndarray, ref: np.ndarray) -> float:
    n = np.linalg.norm(ref.astype(np.float64))
    return float(np.linalg.norm((a - ref).astype(np.float64)) / n) if n else float(np.abs(a).max(initial=0.0))


def max_abs(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - ref).max(initial=0.0))


def psnr(a: np.ndarray, ref: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB, peak = max |ref|; capped at 200 dB for identical arrays."""
    mse = float(np.mean((a.astype(np.float64) - ref) ** 2))
    if not np.isfinite(mse):  # a NaN or inf in the output: no signal survives
        return 0.0
    peak = float(np.abs(ref).max(initial=0.0))
    return 200.0 if mse == 0 else min(200.0, 10 * np.log10(peak**2 / mse)) if peak else 0.0


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# A token the reference rates within this many nats of its own top-1 is a tie, not a different
# answer: on near-uniform distributions the fp16 reference itself breaks such ties differently
# from fp32. Trained models put their top-1 far above this.
TIE_NATS = 0.02
# Top-1 is judged where the reference has made a choice: its top token holds at least this
# probability. An untrained decoder's logits are near-uniform (top-1 ~ 1/vocab) everywhere; any
# perturbation reorders them, and agreement there says nothing about the artifact.
DECISIVE_P = 0.05


def decisive(ref: np.ndarray, min_p: float = DECISIVE_P) -> np.ndarray:
    """Mask of positions whose reference top-1 probability is at least ``min_p``."""
    b = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    return np.exp(_log_softmax(b).max(-1)) >= min_p


def top1_agreement(logits: np.ndarray, ref: np.ndarray, tie_nats: float = TIE_NATS, min_p: float = 0.0) -> float | None:
    """Share of positions (those where the reference is decisive, with ``min_p``) where the
    artifact's argmax is the reference's, or ties with it. None when no position qualifies."""
    a, b = logits.reshape(-1, logits.shape[-1]), ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    keep = decisive(b, min_p) if min_p > 0 else np.ones(len(b), dtype=bool)
    if not keep.any():
        return None
    a, b = a[keep], b[keep]
    gap = b.max(-1) - b[np.arange(len(b)), a.argmax(-1)]  # logit gaps are log-prob gaps
    return float(np.mean(gap <= tie_nats))


def mean_kl(logits: np.ndarray, ref: np.ndarray) -> float:
    """Mean over positions of KL(reference || artifact)."""
    p = _log_softmax(ref.reshape(-1, ref.shape[-1]))
    q = _log_softmax(logits.reshape(-1, logits.shape[-1]))
    return float(np.mean((np.exp(p) * (p - q)).sum(-1)))


@dataclass
class OutputParity:
    method: str
    output: str
    reference: str  # fp32 or fp16
    cosine: float
    rel_l2: float
    max_abs: float
    psnr: float
    top1: float | None = None  # over decisive positions; None when the reference is decisive nowhere
    top1_strict: float | None = None  # argmax equality at every position, ties counted as misses
    decisive: int | None = None  # positions top-1 was judged on
    positions: int | None = None
    kl: float | None = None


@dataclass
class ComponentParity:
    component: str
    gate_reference: str
    threshold: dict[str, float]
    results: list[OutputParity] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    backend: str = ""  # the runtime that replayed the artifact
    not_run: str = ""  # why nothing could replay it on this host; such a component never passes

    @property
    def passed(self) -> bool:
        return not self.failures and not self.not_run

    @property
    def status(self) -> str:
        return "not run on this host" if self.not_run else ("pass" if self.passed else "FAIL")

    def worst(self, reference: str) -> dict[str, float]:
        rows = [r for r in self.results if r.reference == reference]
        out = {"cosine": min((r.cosine for r in rows), default=1.0), "psnr": min((r.psnr for r in rows), default=200.0)}
        tops = [r.top1 for r in rows if r.top1 is not None]
        if tops:
            out["top1"] = min(tops)
        kls = [r.kl for r in rows if r.kl is not None]
        if kls:
            out["kl"] = max(kls)
        return out

    def to_dict(self) -> dict:
        return {"component": self.component, "passed": self.passed, "status": self.status, "backend": self.backend,
                "not_run": self.not_run, "gate_reference": self.gate_reference, "threshold": self.threshold,
                "failures": self.failures, "results": [asdict(r) for r in self.results]}  # fmt: skip


def replay(session: Session, calls: list[GoldenCall], io: Callable[[str], tuple[list[str], list[str]]],
           kv_methods: tuple[str, ...] = ()) -> list[dict[str, np.ndarray]]:  # fmt: skip
    """Run the golden calls in order on a fresh session; ``io(method)`` gives the manifest's input
    and output names; ``kv_methods`` run through the component's KV cache, however the session
    holds it. Returns each call's named outputs."""
    stack = KVStack("replay", session, 0, 0, kv_methods) if kv_methods else None
    if stack is not None:
        stack.reset()
    if session.stateful:
        session.reset()
    results = []
    for call in calls:
        in_names, names = io(call.method)
        # copy(): C-contiguous and keeps 0-d scalars 0-d (ascontiguousarray would make them 1-d).
        inputs = [torch.from_numpy(call.inputs[n].copy()) for n in in_names]
        outs = stack.call(call.method, inputs) if stack is not None and call.method in kv_methods else session.run(call.method, inputs)
        results.append({n: (o.detach().float().numpy() if isinstance(o, torch.Tensor) else np.asarray(o)) for n, o in zip(names, outs)})
    return results


def judge(component: str, calls: list[GoldenCall], got: list[dict[str, np.ndarray]], gate_reference: str,
          cosine_min: float, top1_min: float, kl_max: float) -> ComponentParity:  # fmt: skip
    """Metrics per (method, output) over all calls, against both references; the gate uses one."""
    report = ComponentParity(component, gate_reference, {"cosine_min": cosine_min, "top1_min": top1_min, "kl_max": kl_max})
    keys = list(dict.fromkeys((c.method, n) for c in calls for n in c.outputs["fp32"]))
    for reference in ("fp32", "fp16"):
        for method, name in keys:
            idx = [i for i, c in enumerate(calls) if c.method == method]
            a = np.concatenate([got[i][name].reshape(-1) for i in idx])
            r = np.concatenate([calls[i].outputs[reference][name].reshape(-1).astype(np.float64) for i in idx])
            row = OutputParity(method, name, reference, cosine(a, r), rel_l2(a, r), max_abs(a, r), psnr(a, r))
            if name == "logits":
                vocab = calls[idx[0]].outputs[reference][name].shape[-1]
                a2, r2 = a.reshape(-1, vocab), r.reshape(-1, vocab)
                row.top1 = top1_agreement(a2, r2, min_p=DECISIVE_P)
                row.top1_strict = top1_agreement(a2, r2, tie_nats=0.0)
                row.decisive, row.positions = int(decisive(r2).sum()), len(r2)
                row.kl = mean_kl(a2, r2)
            report.results.append(row)
            if reference != gate_reference:
                continue
            # Written so that a NaN fails: every comparison with NaN is false.
            bad = int(a.size - np.isfinite(a).sum())
            if bad and np.isfinite(r).all():
                report.failures.append(f"{method}.{name}: {bad} of {a.size} values are NaN or infinite (the reference's are finite)")
            if not row.cosine >= cosine_min:
                report.failures.append(f"{method}.{name}: cosine {row.cosine:.6f} < {cosine_min}")
            if row.top1 is not None and not row.top1 >= top1_min:
                report.failures.append(f"{method}.{name}: top-1 agreement {row.top1:.3f} < {top1_min}")
            if row.kl is not None and not row.kl <= kl_max:
                report.failures.append(f"{method}.{name}: KL {row.kl:.5f} > {kl_max}")
    return report


def not_run(component: str, gate_reference: str, threshold: dict[str, float], reason: str) -> ComponentParity:
    return ComponentParity(component, gate_reference, threshold, not_run=reason)


def replay_component(entry: ComponentEntry, root: Path, settings: RuntimeSettings, calls: list[GoldenCall],
                     backend: str | None = None) -> tuple[list[dict[str, np.ndarray]] | None, str, str]:  # fmt: skip
    """Replay a bundle component's golden calls on the host backend that can run its artifact
    (its parity backend). Returns (outputs, backend, "") or (None, backend, why it was not run)."""
    from omni_export.runtime_py.backends import SESSIONS, open_session

    name = backend or entry.parity_backend
    if not name:
        return None, "", f"no runtime on any host replays {entry.backend} artifacts"
    reason = SESSIONS.get(name).unavailable() if name in SESSIONS else f"the {name} runtime is not part of this omni-export"
    if reason:
        return None, name, reason
    session = open_session(entry, root, settings, backend=name)
    kv = entry.kv_cache.methods if entry.kv_cache else ()
    return replay(session, calls, entry.io_names, kv), name, ""


def check_bundle(bundle: str | Path, backend: str | None = None) -> list[ComponentParity]:
    """Re-run every component's golden calls on this host, on the runtime that replays the
    component's artifact (or on ``backend``: a device runtime such as TensorRT's engines),
    against the thresholds and reference the build recorded."""
    import json

    from omni_export.bundle.golden import read_golden
    from omni_export.bundle.manifest import read_manifest

    bundle = Path(bundle)
    m = read_manifest(bundle)
    recorded = {}
    report = bundle / "reports" / "parity.json"
    if report.is_file():
        recorded = {r["component"]: r for r in json.loads(report.read_text())}
    out = []
    for name, comp in m.components.items():
        th = recorded.get(name, {}).get("threshold", {"cosine_min": 0.999, "top1_min": 0.98, "kl_max": 0.01})
        gate = recorded.get(name, {}).get("gate_reference", "fp16")
        calls = read_golden(bundle / comp.golden)
        got, used, reason = replay_component(comp, bundle, m.profile.runtime, calls, backend)
        if got is None:
            out.append(not_run(name, gate, th, reason))
            continue
        result = judge(name, calls, got, gate, th["cosine_min"], th["top1_min"], th["kl_max"])
        result.backend = used
        out.append(result)
    return out
