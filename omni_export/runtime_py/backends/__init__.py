"""Backend sessions behind one call surface; registered by backend name."""

# Importing registers them.
from omni_export.runtime_py.backends import coreml as _coreml  # noqa: E402,F401
from omni_export.runtime_py.backends import eager as _eager  # noqa: E402,F401
from omni_export.runtime_py.backends import executorch as _executorch  # noqa: E402,F401
from omni_export.runtime_py.backends import onnxruntime as _onnxruntime  # noqa: E402,F401
from omni_export.runtime_py.backends import tensorrt as _tensorrt  # noqa: E402,F401
from omni_export.runtime_py.backends.base import SESSIONS, BackendUnavailableError, Session, open_session

__all__ = ["SESSIONS", "BackendUnavailableError", "Session", "open_session"]
