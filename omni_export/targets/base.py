"""The Target protocol: lower one traced component (and, later, its QuantResult) for one device
profile into artifact files, and name the runtime backend that opens them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from omni_export.registry import Registry

if TYPE_CHECKING:
    from omni_export.export.trace import TracedComponent
    from omni_export.export.trace_specs import Limits
    from omni_export.profiles import Profile


@dataclass(frozen=True)
class Delegation:
    """How much of one method's graph a backend delegate runs."""

    delegated_nodes: int
    portable_nodes: int
    subgraphs: int
    fallback_ops: dict[str, int] = field(default_factory=dict)  # op -> count run by portable kernels

    @property
    def share(self) -> float:
        total = self.delegated_nodes + self.portable_nodes
        return self.delegated_nodes / total if total else 1.0


@dataclass(frozen=True)
class Artifact:
    component: str
    file: str  # relative to the bundle root
    backend: str
    delegation: dict[str, Delegation]
    build_s: float

    @property
    def delegated_share(self) -> float:
        d = sum(x.delegated_nodes for x in self.delegation.values())
        p = sum(x.portable_nodes for x in self.delegation.values())
        return d / (d + p) if d + p else 1.0


class Target(ABC):
    name: ClassVar[str]
    backend: ClassVar[str]
    extension: ClassVar[str]

    def supports(self, traced: TracedComponent) -> bool:
        return True

    def trace_context(self, module: nn.Module, limits: Limits) -> AbstractContextManager[None]:
        """Export-only patches this target wants while ``module`` is traced (none by default)."""
        return nullcontext()

    def kv_layout(self) -> str:
        return "[1, kv_heads, max_len, head_dim] per layer, written at input_pos"

    @abstractmethod
    def lower(self, traced: TracedComponent, profile: Profile, root: Path, metadata: dict[str, Any]) -> Artifact:
        """Write the artifact for ``traced`` under ``root`` and describe it."""


TARGETS: Registry[Target] = Registry("target")
