"""Session: run a named method of one component on some backend.

Two kinds of backend hold the KV cache differently: *stateful* ones keep it inside the artifact
(ExecuTorch mutable buffers, Core ML states; ``reset`` zeroes it), the others take and return it
as explicit tensors (ONNX Runtime, TensorRT). The pipeline asks ``stateful`` and adapts."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch

from omni_export.registry import Registry


class Session(ABC):
    backend: ClassVar[str]
    stateful: ClassVar[bool] = True

    @abstractmethod
    def run(self, method: str, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run ``method`` on ``inputs``; outputs in the manifest's order."""

    @abstractmethod
    def reset(self) -> None:
        """Start a new conversation: zero the KV caches."""

    @property
    @abstractmethod
    def methods(self) -> set[str]: ...


SESSIONS: Registry[type[Session]] = Registry("runtime backend")


def open_session(backend: str, path: Path) -> Session:
    return SESSIONS.get(backend).open(path)  # type: ignore[attr-defined]
