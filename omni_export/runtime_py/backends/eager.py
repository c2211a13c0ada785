"""torch eager: the reference. Methods are plain callables over the component's modules."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from omni_export.runtime_py.backends.base import SESSIONS, Session


class EagerSession(Session):
    backend = "eager"

    def __init__(self, methods: dict[str, Callable[..., object]], reset: Callable[[], None] | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:  # fmt: skip
        """``dtype``/``device``: the modules' float dtype and device (CUDA for the GPU reference);
        inputs go there, outputs come back as fp32 on the CPU, so callers feed the same tensors to
        every backend."""
        self._methods = methods
        self._reset = reset
        self._dtype = dtype
        self._device = device if device is not None and torch.device(device).type != "cpu" else None

    @property
    def methods(self) -> set[str]:
        return set(self._methods)

    @torch.inference_mode()
    def run(self, method: str, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self._dtype is not None:
            inputs = [x.to(self._dtype) if x.is_floating_point() and x.dtype != self._dtype else x for x in inputs]
        if self._device is not None:
            inputs = [x.to(self._device) for x in inputs]
        out = self._methods[method](*inputs)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        outs = [o.float() if o.is_floating_point() else o for o in outs]
        return outs if self._device is None else [o.cpu() for o in outs]

    def reset(self) -> None:
        if self._reset is not None:
            self._reset()


SESSIONS.register(EagerSession.backend, EagerSession)


class EagerIOSession(EagerSession):
    """The eager modules with their stacks in ``io`` mode (export/components/kv.py): prefill and
    decode take the cache as tensors and return it grown, as ONNX Runtime and TensorRT do. Used to
    check that the explicit-cache path agrees with the reference, without any compiled backend."""

    stateful = False

    def __init__(self, methods: dict[str, Callable[..., object]], slots: Any, empty: Callable[[], list[torch.Tensor]]) -> None:
        super().__init__(methods)
        self._slots, self._empty = slots, empty

    def new_cache(self) -> list[torch.Tensor]:
        return self._empty()

    @torch.inference_mode()
    def run_cached(self, method: str, inputs: Sequence[torch.Tensor], cache: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        self._slots.past, self._slots.present = list(cache), {}
        outs = self.run(method, inputs)
        return outs, [self._slots.present[i] for i in range(len(cache))]

    def reset(self) -> None:
        raise AssertionError("an explicit-cache session is never reset: its caller owns the cache")
