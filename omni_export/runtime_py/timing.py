"""Every session call is a span on one clock: the latency report, the timeline and each turn's
Stats all read the same record, so the numbers cannot disagree."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from omni_export.runtime_py.backends.base import Session


@dataclass(frozen=True)
class Span:
    component: str
    method: str
    t0: float
    t1: float
    positions: int  # positions the call processed (see TimedSession)

    @property
    def ms(self) -> float:
        return (self.t1 - self.t0) * 1000

    @property
    def stage(self) -> str:
        return f"{self.component}.{self.method}"


class Recorder:
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.marks: list[tuple[str, float]] = []  # ("audio_end", t), ("first_audio", t), ...
        self.calls: list[tuple[str, str, list[torch.Tensor]]] | None = None  # kept only while replay is wanted

    def mark(self, name: str, t: float | None = None) -> float:
        t = time.perf_counter() if t is None else t
        self.marks.append((name, t))
        return t

    def since(self, t: float) -> list[Span]:
        return [s for s in self.spans if s.t0 >= t]

    def clear(self) -> None:
        self.spans.clear()
        self.marks.clear()


class TimedSession(Session):
    """Wraps a session; records a Span per call. ``positions`` comes from the manifest's symbolic
    dims of the first input (tokens, frames, tiles...), 1 when it has none: the count a compute
    roofline multiplies by."""

    def __init__(self, inner: Session, component: str, recorder: Recorder, symbolic: dict[str, list[int]]) -> None:
        self.inner, self.component, self.recorder, self._symbolic = inner, component, recorder, symbolic
        self.stateful = inner.stateful  # type: ignore[misc]
        self.backend = inner.backend  # type: ignore[misc]

    @property
    def methods(self) -> set[str]:
        return self.inner.methods

    def reset(self) -> None:
        self.inner.reset()

    def run(self, method: str, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self._timed(method, inputs, lambda: self.inner.run(method, inputs))

    def new_cache(self) -> Any:
        return self.inner.new_cache()

    def run_cached(self, method: str, inputs: Sequence[torch.Tensor], cache: Any) -> tuple[list[torch.Tensor], Any]:
        return self._timed(method, inputs, lambda: self.inner.run_cached(method, inputs, cache))

    def _timed(self, method: str, inputs: Sequence[torch.Tensor], call: Callable[[], Any]) -> Any:
        if self.recorder.calls is not None:
            self.recorder.calls.append((self.component, method, [x.clone() for x in inputs]))
        t0 = time.perf_counter()
        out = call()
        t1 = time.perf_counter()
        n = positions(self._symbolic.get(method, []), inputs[0]) if inputs else 1
        self.recorder.spans.append(Span(self.component, method, t0, t1, n))
        return out


def positions(axes: list[int], first_input: torch.Tensor) -> int:
    """The product of the first input's symbolic dims (tokens, frames, tiles); 1 when none."""
    n = 1
    for axis in axes:
        n *= int(first_input.shape[axis])
    return n


def symbolic_axes(methods: dict[str, Any]) -> dict[str, list[int]]:
    """method -> axes of its first input that are symbolic in the manifest (``methods``: name ->
    MethodEntry)."""
    return {name: [i for i, d in enumerate(m.inputs[0].shape) if isinstance(d, str)] if m.inputs else [] for name, m in methods.items()}
