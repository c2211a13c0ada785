"""torch eager: the reference. Methods are plain callables over the component's modules."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from omni_export.runtime_py.backends.base import SESSIONS, Session


class EagerSession(Session):
    backend = "eager"

    def __init__(self, methods: dict[str, Callable[..., object]], reset: Callable[[], None] | None = None) -> None:
        self._methods = methods
        self._reset = reset

    @classmethod
    def open(cls, path):  # type: ignore[no-untyped-def]
        raise NotImplementedError("an eager session is built from a loaded checkpoint, not from a bundle file")

    @property
    def methods(self) -> set[str]:
        return set(self._methods)

    @torch.inference_mode()
    def run(self, method: str, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = self._methods[method](*inputs)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def reset(self) -> None:
        if self._reset is not None:
            self._reset()


SESSIONS.register(EagerSession.backend, EagerSession)
