"""TensorRT over a component's engines (built on the device by ``build-engines``).

Each engine is deserialised once, with one execution context per optimization profile (a
cached step has ``decode`` and ``prefill``). The KV cache stays on the GPU: a conversation's
cache is two flat buffers per layer tensor, allocated once at the context's full length; each
step reads the past from one and writes the present (past + this step) into the other, and the
next step swaps them. Methods without a cache whose shapes repeat (the flow's ODE steps, the
vocoder's fixed chunks) replay a CUDA graph captured when a method sees the same shapes twice in
a row; the decode step's shapes grow every call (the past is one longer), so it runs plainly.
Buffers are torch CUDA tensors, so nothing beyond TensorRT and torch is needed."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from omni_export.runtime_py.backends.base import SESSIONS, BackendUnavailableError, Session

PLAN = "tensorrt/build_plan.json"


@dataclass
class GpuCache:
    """One conversation's cache: ``buffers[side][i]`` is layer tensor i's flat storage."""

    buffers: tuple[list[torch.Tensor], list[torch.Tensor]]
    positions: int = 0
    side: int = 0


class _Engine:
    def __init__(self, trt, runtime, path: Path, n_profiles: int, stream: torch.cuda.Stream) -> None:  # type: ignore[no-untyped-def]
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BackendUnavailableError(f"{path}: TensorRT could not load this engine (built by another TensorRT version or for another GPU?); "
                                          "rebuild it here with `omni-export build-engines BUNDLE`")  # fmt: skip
        self.engine = engine
        self.names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in self.names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _TORCH[str(engine.get_tensor_dtype(n)).rsplit(".", 1)[-1]] for n in self.names}
        self.contexts = []
        for i in range(min(n_profiles, engine.num_optimization_profiles)):
            ctx = engine.create_execution_context()
            ctx.set_optimization_profile_async(i, stream.cuda_stream)
            self.contexts.append(ctx)
        stream.synchronize()


_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32, "INT64": torch.int64,
          "INT8": torch.int8, "BOOL": torch.bool, "UINT8": torch.uint8}  # fmt: skip


class TensorRTSession(Session):
    backend = "tensorrt"
    stateful = False

    def __init__(self, entry: Any, root: Path, settings: Any) -> None:
        import tensorrt as trt

        root = Path(root)
        plan = json.loads((root / PLAN).read_text())
        graphs = {e["onnx"]: e for e in plan["engines"]}
        self._stream = torch.cuda.Stream()
        self._logger = trt.Logger(trt.Logger.ERROR)
        runtime = trt.Runtime(self._logger)
        loaded: dict[str, _Engine] = {}
        self._methods: dict[str, _Engine] = {}
        for method, m in entry.methods.items():
            g = graphs.get(m.entry)
            if g is None:
                raise BackendUnavailableError(f"{m.entry} is not in {PLAN}; re-export the bundle")
            path = root / g["engine"]
            if not path.is_file():
                raise BackendUnavailableError(f"{g['engine']} has not been built; run `omni-export build-engines {root}` on this device")
            if g["engine"] not in loaded:
                loaded[g["engine"]] = _Engine(trt, runtime, path, len(g["profiles"]), self._stream)
            self._methods[method] = loaded[g["engine"]]
        self._profiles = {m.entry: [p["name"] for p in graphs[m.entry]["profiles"]] for m in entry.methods.values()}
        self._entry_of = {method: m.entry for method, m in entry.methods.items()}
        self._in = {method: [t.name for t in m.inputs] for method, m in entry.methods.items()}
        self._out = {method: [t.name for t in m.outputs] for method, m in entry.methods.items()}
        self._kv = entry.kv_cache
        # method -> (shapes, CUDA graph, its input buffers, its output buffers)
        self._graphs: dict[str, tuple[tuple, torch.cuda.CUDAGraph, list[torch.Tensor], list[torch.Tensor]]] = {}
        self._last: dict[str, tuple] = {}

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import tensorrt  # noqa: F401
        except ImportError as exc:
            return f"TensorRT's Python package is not importable ({exc}); it runs on the device (JetPack ships it)"
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible to torch"
        return None

    @classmethod
    def interface_problems(cls, entry, root: Path) -> list[str]:  # type: ignore[no-untyped-def]
        # The engines are built from these graphs and checked against them when built.
        from omni_export.runtime_py.backends.onnxruntime import graph_interface_problems

        return graph_interface_problems(entry, root)

    @classmethod
    def open(cls, entry, root: Path, settings) -> TensorRTSession:  # type: ignore[no-untyped-def]
        return cls(entry, root, settings)

    @property
    def methods(self) -> set[str]:
        return set(self._methods)

    def reset(self) -> None:
        """Nothing is kept between calls: the caller's KVStack owns the cache."""

    def _profile(self, method: str, inputs: Sequence[torch.Tensor]) -> int:
        names = self._profiles[self._entry_of[method]]
        if "decode" in names and inputs[0].shape[1] == 1:
            return names.index("decode")
        return names.index("prefill") if "prefill" in names else 0

    def _bind(self, eng: _Engine, ctx, feeds: dict[str, torch.Tensor], outputs: Sequence[str]) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
        """Input shapes and addresses set; ``outputs`` allocated at their resolved shapes and bound."""
        for name, x in feeds.items():
            ctx.set_input_shape(name, tuple(x.shape))
            ctx.set_tensor_address(name, x.data_ptr())
        out = {n: torch.empty(tuple(ctx.get_tensor_shape(n)), dtype=eng.dtypes[n], device="cuda") for n in outputs}
        for n, t in out.items():
            ctx.set_tensor_address(n, t.data_ptr())
        return out

    def _device(self, eng: _Engine, names: list[str], inputs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: x.detach().to("cuda", eng.dtypes[n], non_blocking=True).contiguous() for n, x in zip(names, inputs, strict=True)}

    def run(self, method: str, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        eng = self._methods[method]
        shapes = tuple(tuple(x.shape) for x in inputs)
        held = self._graphs.get(method)
        with torch.cuda.stream(self._stream):
            if held is not None and held[0] == shapes:
                _, graph, static_in, outs = held
                for dst, x in zip(static_in, inputs, strict=True):
                    dst.copy_(x, non_blocking=True)
                graph.replay()
            else:
                # A graph holds its shapes and addresses: any change means a new one. TensorRT
                # needs one plain enqueue after a shape change before it can be captured.
                self._graphs.pop(method, None)
                ctx = eng.contexts[self._profile(method, inputs)]
                feeds = self._device(eng, self._in[method], inputs)
                out = self._bind(eng, ctx, feeds, self._out[method])
                ctx.execute_async_v3(self._stream.cuda_stream)
                outs = [out[n] for n in self._out[method]]
                if self._last.get(method) == shapes:  # the same shapes twice in a row: capture them
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=self._stream):
                        ctx.execute_async_v3(self._stream.cuda_stream)
                    self._graphs[method] = (shapes, graph, list(feeds.values()), outs)
                self._last[method] = shapes
            result = [o.float().cpu() if o.is_floating_point() else o.cpu() for o in outs]
        self._stream.synchronize()
        return result

    # -- the KV cache on the GPU ----------------------------------------------------------------
    def new_cache(self) -> GpuCache:
        kv = self._kv
        size = _numel(kv.shape(kv.max_len))
        dtype = _TORCH["HALF"] if kv.dtype == "float16" else torch.float32
        return GpuCache(tuple([torch.zeros(size, dtype=dtype, device="cuda") for _ in kv.inputs] for _ in range(2)))  # type: ignore[arg-type]

    def run_cached(self, method: str, inputs: Sequence[torch.Tensor], cache: GpuCache) -> tuple[list[torch.Tensor], GpuCache]:
        eng, kv = self._methods[method], self._kv
        tokens = inputs[0].shape[1]
        past_shape, present_shape = kv.shape(cache.positions), kv.shape(cache.positions + tokens)
        n_past, n_present = _numel(past_shape), _numel(present_shape)
        src, dst = cache.buffers[cache.side], cache.buffers[1 - cache.side]
        with torch.cuda.stream(self._stream):
            ctx = eng.contexts[self._profile(method, inputs)]
            feeds = self._device(eng, self._in[method], inputs)
            feeds.update({n: b[:n_past].view(past_shape) for n, b in zip(kv.inputs, src, strict=True)})
            outs = self._bind(eng, ctx, feeds, self._out[method])
            for n, b in zip(kv.outputs, dst, strict=True):
                ctx.set_tensor_address(n, b[:n_present].data_ptr())
            ctx.execute_async_v3(self._stream.cuda_stream)
            result = [o.float().cpu() if o.is_floating_point() else o.cpu() for o in (outs[n] for n in self._out[method])]
        self._stream.synchronize()
        return result, GpuCache(cache.buffers, cache.positions + tokens, 1 - cache.side)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


SESSIONS.register(TensorRTSession.backend, TensorRTSession)
