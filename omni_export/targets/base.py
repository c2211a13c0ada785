"""The Target protocol: lower one traced component (and, later, its QuantResult) for one device
profile into artifact files, and name the runtime backend that opens them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from omni_export.errors import OmniExportError
from omni_export.registry import Registry

if TYPE_CHECKING:
    from omni_export.export.trace import TracedComponent
    from omni_export.export.trace_specs import Limits
    from omni_export.profiles import Profile
    from omni_export.quantize.recipe import QuantConfig
    from omni_export.quantize.result import QTensor


class QuantEncodingError(OmniExportError):
    """The target cannot encode this quantization (bits, symmetry or activation handling)."""


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
    # How quantized linears treat their activations on this target (the manifest records it).
    quant_activation: ClassVar[str] = "float"

    def supports(self, traced: TracedComponent) -> bool:
        return True

    def trace_context(self, module: nn.Module, limits: Limits) -> AbstractContextManager[None]:
        """Export-only patches this target wants while ``module`` is traced (none by default)."""
        return nullcontext()

    def kv_layout(self) -> str:
        return "[1, kv_heads, max_len, head_dim] per layer, written at input_pos"

    def check_quant(self, configs: dict[str, QuantConfig]) -> list[str]:
        """Refuse, before any work, quantization this target cannot encode; return notes on how
        it will encode the rest. By default a target encodes none."""
        if configs:
            raise QuantEncodingError(f"target {self.name} cannot encode quantized weights yet; choose a float preset (fp32, fp16)")
        return []

    def encode(self, module: nn.Module, tensors: dict[str, QTensor], floats: dict[str, Any]) -> None:
        """Put a component's QuantResult into ``module`` in the form this target lowers."""
        raise QuantEncodingError(f"target {self.name} cannot encode quantized weights")

    @abstractmethod
    def lower(self, traced: TracedComponent, profile: Profile, root: Path, metadata: dict[str, Any]) -> Artifact:
        """Write the artifact for ``traced`` under ``root`` and describe it."""


TARGETS: Registry[Target] = Registry("target")
