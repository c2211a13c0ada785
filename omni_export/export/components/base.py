"""What omni-export needs to know about a component class, kept with the class: its role in the
pipeline, the methods it exports, its golden inputs and its calibration inputs. Tracing, golden
I/O and quantization ask the module; nothing keeps a table keyed by class."""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from omni_export.errors import OmniExportError

if TYPE_CHECKING:
    from omni_export.export.golden import Context, Script
    from omni_export.export.trace_specs import Limits, MethodSpec
    from omni_export.quantize.calibrate import Calibration, Sources
    from omni_export.runtime_py.backends.eager import EagerSession


class Role(str, Enum):
    """What a component does; quantization presets choose precision by role, so a new family with
    other component names still gets the right precision."""

    FRONTEND = "frontend"  # waveform -> features, no weights
    ENCODER = "encoder"  # images / audio -> LLM-width tokens
    DECODER = "decoder"  # token-level transformer stacks: the LLM, speech-token LMs, TTS stacks
    ACOUSTIC = "acoustic"  # speech tokens -> mel (flow matching)
    VOCODER = "vocoder"  # mel or codec codes -> waveform


class NotAComponentError(OmniExportError):
    """A module that does not describe itself as a component was asked to."""


class Component:
    """Mixin for every exportable component module."""

    role: ClassVar[Role]

    def export_methods(self, limits: Limits) -> list[MethodSpec]:
        """The methods a bundle exposes, with example inputs, dynamic shapes and named I/O."""
        raise NotImplementedError

    def golden_script(self, ctx: Context, ref: EagerSession) -> Script:
        """Realistic calls (method, inputs) replayed on the reference and on every artifact."""
        raise NotImplementedError

    def stream_state_elements(self) -> int:
        """Elements of state the runtime holds between this component's calls besides a KV cache
        (the flow's attention windows): counted by the fit check."""
        return 0

    def calibration(self, sources: Sources) -> Calibration:
        """Inputs quantization calibrates on. By default the golden script: components fed by
        another model (speech decoders, vocoders) have no real-world input of their own."""
        from omni_export.quantize.calibrate import golden_calibration

        return golden_calibration(self, sources)  # type: ignore[arg-type]


def component(module: Any) -> Component:
    if not isinstance(module, Component) or not isinstance(module, nn.Module):
        raise NotAComponentError(
            f"{type(module).__name__} is not an omni-export component: subclass omni_export.export.components.base.Component "
            "and give it a role, export_methods and golden_script"
        )
    return module


def role_of(module: Any) -> Role:
    return component(module).role
