"""File helpers: strict JSON reading and atomic writes (temp file + rename)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from omni_export.errors import CheckpointError


def cache_dir() -> Path:
    """Where generated data lives between runs (demo checkpoint, quantization results)."""
    root = os.environ.get("OMNI_EXPORT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "omni-export"
    return Path(root)


def read_json(path: Path, error: type[Exception] = CheckpointError) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} is missing.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc}); the file is corrupt or truncated.") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object")
    return data


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def replace_dir(tmp: Path, final: Path) -> None:
    """Publish a directory built at ``tmp`` under ``final`` (whatever was there goes)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
