"""ONNX Runtime over a component's graphs (one per method; prefill and decode share one).

Decoder caches are explicit: the session hands ``KVStack`` the cache as a list of OrtValues and
binds them as the next call's ``past_*`` inputs with I/O binding, so the cache stays in ONNX
Runtime's memory between steps and never round-trips through NumPy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omni_export.runtime_py.backends.base import SESSIONS, Session, host_cores

_NP = {"float32": np.float32, "float16": np.float16}


def graph_interface_problems(entry: Any, root: Path) -> list[str]:
    """Each method's ONNX graph has the manifest's inputs and outputs, in order (the KV cache's
    past and present tensors after them where the cache is explicit)."""
    import onnx

    problems, kv = [], entry.kv_cache
    for method, m in entry.methods.items():
        path = Path(root) / m.entry
        try:
            graph = onnx.load(str(path), load_external_data=False).graph
        except Exception as exc:  # protobuf's DecodeError and friends: a damaged file
            problems.append(f"{m.entry}: not an ONNX graph ({type(exc).__name__}: {str(exc)[:120]})")
            continue
        cached = kv is not None and kv.held_as in ("io", "static-io") and method in kv.methods
        want_in = [t.name for t in m.inputs] + (list(kv.inputs) if cached else [])
        want_out = [t.name for t in m.outputs] + (list(kv.outputs) if cached else [])
        inits = {i.name for i in graph.initializer}
        have_in = [i.name for i in graph.input if i.name not in inits]
        have_out = [o.name for o in graph.output]
        if have_in != want_in or have_out != want_out:
            problems.append(f"{m.entry} ({method}): graph takes {have_in} -> {have_out}, the manifest says {want_in} -> {want_out}")
    return problems


class OnnxRuntimeSession(Session):
    backend = "onnxruntime"
    stateful = False

    def __init__(self, entry: Any, root: Path, settings: Any) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The profile's threads, never more than this host's cores; 0: all of them. ORT's own
        # default picked 1 thread on a 2-vCPU VM.
        so.intra_op_num_threads = min(settings.threads, host_cores()) if settings.threads else host_cores()
        so.inter_op_num_threads = 1
        so.log_severity_level = 3  # errors only: the library's warnings go nowhere near the CLI
        for key, value in settings.options.items():
            so.add_session_config_entry(key, value)
        providers = list(settings.providers) or ["CPUExecutionProvider"]
        self.entry, self._ort = entry, ort
        graphs: dict[str, Any] = {}
        self._graphs = {}
        for method, m in entry.methods.items():
            if m.entry not in graphs:
                graphs[m.entry] = ort.InferenceSession(str(Path(root) / m.entry), so, providers=providers)
            self._graphs[method] = graphs[m.entry]
        kv = entry.kv_cache
        self._kv = kv
        self._outputs = {method: [t.name for t in m.outputs] for method, m in entry.methods.items()}
        self._inputs = {method: [t.name for t in m.inputs] for method, m in entry.methods.items()}

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return f"onnxruntime is not installed ({exc}); pip install onnxruntime"
        return None

    @classmethod
    def open(cls, entry, root: Path, settings) -> OnnxRuntimeSession:  # type: ignore[no-untyped-def]
        return cls(entry, root, settings)

    @classmethod
    def interface_problems(cls, entry, root: Path) -> list[str]:  # type: ignore[no-untyped-def]
        return graph_interface_problems(entry, root)

    @property
    def methods(self) -> set[str]:
        return set(self._graphs)

    def reset(self) -> None:
        """Nothing is kept between calls: the caller's KVStack owns the cache."""

    def run(self, method: str, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        feeds = {n: x.detach().contiguous().numpy() for n, x in zip(self._inputs[method], inputs, strict=True)}
        return [torch.from_numpy(o) for o in self._graphs[method].run(self._outputs[method], feeds)]

    def new_cache(self) -> list[Any]:
        kv = self._kv
        empty = np.zeros(kv.shape(kv.initial_positions), dtype=_NP[kv.dtype])
        return [self._ort.OrtValue.ortvalue_from_numpy(empty.copy()) for _ in kv.inputs]

    def run_cached(self, method: str, inputs: Sequence[torch.Tensor], cache: list[Any]) -> tuple[list[torch.Tensor], list[Any]]:
        sess, kv = self._graphs[method], self._kv
        io = sess.io_binding()
        for name, x in zip(self._inputs[method], inputs, strict=True):
            io.bind_cpu_input(name, x.detach().contiguous().numpy())
        for name, value in zip(kv.inputs, cache, strict=True):
            io.bind_ortvalue_input(name, value)
        names = self._outputs[method]
        # Bound again on every call: a binding that held last call's output would take it as a
        # pre-allocated buffer of the old size.
        for name in names:
            io.bind_output(name, "cpu")
        for name, value in zip(kv.outputs, cache, strict=True):
            # static-io: present is past's own buffer, written in place (nothing copied);
            # io: the graph returns a new, longer tensor
            io.bind_ortvalue_output(name, value) if kv.in_place else io.bind_output(name, "cpu")
        sess.run_with_iobinding(io)
        values = io.get_outputs()
        outs = [torch.from_numpy(v.numpy()) for v in values[: len(names)]]
        return outs, (cache if kv.in_place else list(values[len(names) :]))


SESSIONS.register(OnnxRuntimeSession.backend, OnnxRuntimeSession)
