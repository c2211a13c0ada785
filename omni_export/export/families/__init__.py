"""Model families, registered by name and by config.json ``model_type``."""

# Importing registers them.
from omni_export.export.families import (
    interactiveomni as _interactiveomni,  # noqa: E402,F401
)
from omni_export.export.families import vita15 as _vita15  # noqa: E402,F401
from omni_export.export.families.base import (
    FAMILIES,
    MAIN_WEIGHTS,
    MODEL_TYPES,
    SIZES,
    ComponentSpec,
    Family,
    register,
)

__all__ = ["FAMILIES", "MAIN_WEIGHTS", "MODEL_TYPES", "SIZES", "ComponentSpec", "Family", "register"]
