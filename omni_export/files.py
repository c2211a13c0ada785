"""File helpers: strict JSON reading, atomic writes (temp file + rename), output checks, and
native libraries' stderr routed to the log."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omni_export.errors import CheckpointError, OutputError


@contextlib.contextmanager
def native_chatter(what: str) -> Iterator[None]:
    """What native libraries (and code that bypasses ``logging``) write to the process's stderr
    while ``what`` runs, C++ included, goes to this package's log (the log file; the terminal
    with ``--verbose``), not between the CLI's lines. Errors still raise as exceptions."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (embedded interpreters): nothing to redirect
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace").strip()
            if text:
                logging.getLogger("omni_export.native").info("%s:\n%s", what, text)


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


def check_bundle_out(out: Path, overwrite: bool, marker: str = "manifest.json") -> None:
    """Before any work: ``out`` can become a bundle. ``--overwrite`` replaces only what is plainly
    a bundle (a folder holding ``marker``) or an empty folder, never anything else that happens
    to be at that path (a home folder, a file)."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise OutputError(f"--out {out} is a file or link, not a folder; choose a new folder for the bundle.")
        if not overwrite:
            raise OutputError(f"{out} already exists; remove it or pass --overwrite.")
        if any(out.iterdir()) and not (out / marker).is_file():
            raise OutputError(f"{out} is not an omni-export bundle (no {marker}) and not empty; --overwrite replaces only a "
                              f"bundle or an empty folder. Choose another --out.")  # fmt: skip
    _check_parent(out)


def _check_parent(out: Path) -> None:
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write under {parent}; choose an --out you can write to.")


def check_output_file(out: Path) -> None:
    """Before any work: a file can be written at ``out`` (not a folder, its folder writable)."""
    out = Path(out)
    if out.is_dir():
        raise OutputError(f"--out {out} is a folder; give a file name (e.g. {out / 'reply.wav'}).")
    if out.exists() and not os.access(out, os.W_OK):
        raise OutputError(f"cannot overwrite {out}; choose an --out you can write to.")
    _check_parent(out)


def replace_dir(tmp: Path, final: Path) -> None:
    """Publish a directory built at ``tmp`` under ``final`` (whatever was there goes)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
