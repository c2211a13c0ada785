"""Session: run a named method of one component on some backend.

Backends hold a decoder's KV cache in one of two ways. *Stateful* ones keep it inside the
artifact (ExecuTorch mutable buffers, Core ML states, the eager reference): ``reset`` zeroes it
and each call writes at its positions. *Explicit* ones (ONNX Runtime, TensorRT) take the cache as
tensors after the method's inputs and hand back the grown cache after its outputs; the caller
owns it as an opaque value (``new_cache``, ``run_cached``), so a backend can keep it in its own
memory (ORT values, GPU buffers) between steps. ``KVStack`` drives both.

A session opens from its manifest entry and the bundle's runtime settings (threads, compute
units), never from a bare path."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from omni_export.errors import OmniExportError
from omni_export.registry import Registry

if TYPE_CHECKING:
    from omni_export.bundle.manifest import ComponentEntry, RuntimeSettings


class BackendUnavailableError(OmniExportError):
    """The backend cannot run on this host (not installed, or not this operating system)."""


class Session(ABC):
    backend: ClassVar[str]
    stateful: ClassVar[bool] = True

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this backend cannot run on this host, or None when it can."""
        return None

    @classmethod
    def open(cls, entry: ComponentEntry, root: Path, settings: RuntimeSettings) -> Session:
        raise NotImplementedError(f"{cls.backend} sessions are not opened from bundle files")

    @classmethod
    def interface_problems(cls, entry: ComponentEntry, root: Path) -> list[str]:
        """How the artifact's own methods, inputs and outputs differ from what the manifest says,
        read from the files without running them (empty: they agree). ``verify`` and
        ``open_session`` both ask, so an edited or swapped artifact is refused before it runs."""
        return []

    @abstractmethod
    def run(self, method: str, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run ``method`` on ``inputs``; outputs in the manifest's order."""

    @abstractmethod
    def reset(self) -> None:
        """Start a new conversation: zero the KV caches (stateful backends)."""

    @property
    @abstractmethod
    def methods(self) -> set[str]: ...

    def planned_bytes(self) -> int | None:
        """Bytes the artifact's own memory plan asks the runtime for (None: the runtime plans at
        run time and does not say)."""
        return None

    # -- explicit-cache backends ------------------------------------------------------------------
    def new_cache(self) -> Any:
        """An empty cache (0 positions) in the backend's own memory."""
        raise NotImplementedError(f"{self.backend} keeps its cache inside the artifact")

    def run_cached(self, method: str, inputs: Sequence[torch.Tensor], cache: Any) -> tuple[list[torch.Tensor], Any]:
        """Run a cached method (prefill, decode) with ``cache``; returns its outputs and the grown cache."""
        raise NotImplementedError(f"{self.backend} keeps its cache inside the artifact")


SESSIONS: Registry[type[Session]] = Registry("runtime backend")


def host_cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def open_session(entry: ComponentEntry, root: Path, settings: RuntimeSettings, backend: str | None = None) -> Session:
    """The component's session on ``backend`` (default: the one its manifest entry names)."""
    from omni_export.files import native_chatter

    from omni_export.bundle.manifest import BundleError

    cls = SESSIONS.get(backend or entry.backend)
    with native_chatter(f"{cls.backend} session"):  # runtimes print CPU probes and load failures as they start
        reason = cls.unavailable()
        if reason:
            raise BackendUnavailableError(f"the {cls.backend} runtime cannot run here: {reason}")
        problems = cls.interface_problems(entry, Path(root))
        if problems:
            raise BundleError("the bundle's artifacts do not match its manifest:\n  - " + "\n  - ".join(problems)
                              + "\nThe bundle was altered after it was built; rebuild it (omni-export --target ...).")  # fmt: skip
        try:
            return cls.open(entry, Path(root), settings)
        except (OSError, RuntimeError, ValueError) as exc:  # runtimes raise their own load errors as these
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise BundleError(f"{cls.backend} cannot load {entry.files[0]}: {first}. The file is damaged; rebuild the bundle.") from None
