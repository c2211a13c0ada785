"""Lowering targets, registered by name. Heavy backend imports happen inside each target's lower()."""

# Importing registers them.
from omni_export.targets import coreml as _coreml  # noqa: E402,F401
from omni_export.targets import executorch as _executorch  # noqa: E402,F401
from omni_export.targets import onnxruntime as _onnxruntime  # noqa: E402,F401
from omni_export.targets import tensorrt as _tensorrt  # noqa: E402,F401
from omni_export.targets.base import TARGETS, Artifact, LoweringError, QuantEncodingError, Target

__all__ = ["TARGETS", "Artifact", "LoweringError", "QuantEncodingError", "Target"]
