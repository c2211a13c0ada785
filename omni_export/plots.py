"""PNG figures written atomically, drawn off-screen (no display on build hosts or devices)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omni_export.files import atomic_write_bytes


@contextmanager
def png(path: Path, nrows: int = 1, figsize: tuple[float, float] = (9, 4), **subplots: Any) -> Iterator[Any]:
    """Yields the axes of a new figure; on exit lays it out and writes it to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, 1, figsize=figsize, **subplots)
    try:
        yield axes
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        atomic_write_bytes(Path(path), buf.getvalue())
    finally:
        plt.close(fig)
