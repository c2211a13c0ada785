"""Core ML over a component's multifunction ``.mlpackage`` (macOS only: Core ML has no runtime
elsewhere). Each method loads its own function (``MLModel(..., function_name=...)``) on the
compute units the manifest gives it; the decoder methods share one KV state, made by the first
of them and replaced by a new one on ``reset``.

A method whose token count is enumerated (prefill) is called with the enumerated sizes only: a
longer or odd-sized prompt is split into the largest sizes that fit and the remainder goes
through ``decode`` one token at a time, so no call is padded and every position is written once.

Not run on the machines this project is built on (Linux); the macOS-marked tests drive it."""

from __future__ import annotations

import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omni_export.runtime_py.backends.base import SESSIONS, Session

_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int32, "int32": np.int32}


def split_tokens(n: int, sizes: Sequence[int]) -> list[int]:
    """``n`` tokens as a run of enumerated sizes, largest first, then single tokens (decode)."""
    out, left = [], n
    for size in sorted(sizes, reverse=True):
        while left >= size:
            out.append(size)
            left -= size
    return out + [1] * left


class CoreMLSession(Session):
    backend = "coreml"
    stateful = True

    def __init__(self, entry: Any, root: Path, settings: Any) -> None:
        import coremltools as ct

        from omni_export.targets.coreml import function_of

        self.entry = entry
        self._models = {}
        for method, m in entry.methods.items():
            package, function = function_of(m.entry)
            units = m.compute_units or settings.compute_units or "ALL"
            self._models[method] = ct.models.MLModel(str(Path(root) / package), function_name=function,
                                                     compute_units=ct.ComputeUnit[units])  # fmt: skip
        kv = entry.kv_cache
        self._kv_methods = set(kv.methods) if kv else set()
        self._state_owner = kv.methods[0] if kv else None
        self._state = None
        self.reset()

    @classmethod
    def unavailable(cls) -> str | None:
        if sys.platform != "darwin":
            return f"Core ML predicts only on macOS (this host runs {platform.system()})"
        try:
            import coremltools  # noqa: F401
        except ImportError as exc:
            return f"coremltools is not installed ({exc}); pip install coremltools"
        return None

    @classmethod
    def open(cls, entry, root: Path, settings) -> CoreMLSession:  # type: ignore[no-untyped-def]
        return cls(entry, root, settings)

    @classmethod
    def interface_problems(cls, entry, root: Path) -> list[str]:  # type: ignore[no-untyped-def]
        """Each method is a function of its package with the manifest's input and output names
        (read with coremltools on any host)."""
        from omni_export.targets.coreml import function_of
        from omni_export.targets.coreml_package import load_spec

        problems, specs = [], {}
        for method, m in entry.methods.items():
            package, function = function_of(m.entry)
            try:
                spec = specs.get(package) or specs.setdefault(package, load_spec(Path(root) / package))
            except Exception as exc:  # protobuf and coremltools raise their own types for a damaged package
                problems.append(f"{package}: not a Core ML package ({type(exc).__name__}: {str(exc)[:120]})")
                continue
            fn = next((f for f in spec.description.functions if f.name == function), None)
            if fn is None:
                problems.append(f"{package}: has no function {function!r} (the manifest's {method})")
                continue
            have = ([i.name for i in fn.input], [o.name for o in fn.output])
            want = ([t.name for t in m.inputs], [t.name for t in m.outputs])
            if have != want:
                problems.append(f"{package}#{function}: takes {have[0]} -> {have[1]}, the manifest says {want[0]} -> {want[1]}")
        return problems

    @property
    def methods(self) -> set[str]:
        return set(self._models)

    def reset(self) -> None:
        self._state = self._models[self._state_owner].make_state() if self._state_owner else None

    def _feeds(self, method: str, inputs: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
        specs = self.entry.methods[method].inputs
        # Core ML takes int64 as int32 and a scalar as a one-element vector (see the build's notes)
        return {t.name: np.atleast_1d(x.detach().cpu().numpy().astype(_NP[t.dtype])) for t, x in zip(specs, inputs, strict=True)}

    def _predict(self, method: str, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        state = self._state if method in self._kv_methods else None
        out = self._models[method].predict(self._feeds(method, inputs), state=state) if state is not None \
            else self._models[method].predict(self._feeds(method, inputs))  # fmt: skip
        return [torch.from_numpy(np.asarray(out[t.name], dtype=np.float32) if t.dtype.startswith("float") else np.asarray(out[t.name]))
                for t in self.entry.methods[method].outputs]  # fmt: skip

    def run(self, method: str, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        m = self.entry.methods[method]
        if not m.enumerated or method not in self._kv_methods:
            return self._predict(method, inputs)
        (dim, sizes), = m.enumerated.items()
        embeds, positions = inputs
        n = positions.shape[0]
        if n in sizes:
            return self._predict(method, inputs)
        single = next(name for name, e in self.entry.methods.items() if name in self._kv_methods and not e.enumerated)
        parts, at = [], 0
        for size in split_tokens(n, sizes):
            use = method if size > 1 else single
            parts.append(self._predict(use, [embeds[:, at : at + size], positions[at : at + size]]))
            at += size
        axes = [list(t.shape).index(dim) if dim in t.shape else 0 for t in m.outputs]
        return [torch.cat([p[i] for p in parts], dim=axis) for i, axis in enumerate(axes)]


SESSIONS.register(CoreMLSession.backend, CoreMLSession)
