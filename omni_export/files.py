"""File helpers: strict JSON reading, staged writes (a unique hidden temporary beside the output,
renamed into place when whole: ``staged_file``, ``staged_dir`` + ``replace_dir``; every writer in
the package goes through them), output checks, and native libraries' stderr routed to the log."""

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


def read_json(path: Path, error: type[Exception] = CheckpointError, kind: type = dict) -> Any:
    """A JSON file holding a ``kind`` (an object unless said otherwise), or ``error`` saying why not."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} is missing.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc}); the file is corrupt or truncated.") from None
    if not isinstance(data, kind):
        raise error(f"{path} must hold a JSON {'object' if kind is dict else 'array'}")
    return data


def _stage_name(final: Path, suffix: str) -> str:
    """A hidden name beside ``final``, unique to this process and call: two runs writing the same
    output never share a temporary, and a stale one names the process that left it."""
    return f".{final.name}.{os.getpid()}-{os.urandom(4).hex()}{suffix}"


@contextlib.contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """Write ``path`` atomically: the caller writes the yielded temporary beside it, which
    replaces ``path`` only when the block ends without error (and is removed otherwise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(_stage_name(path, ".tmp"))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    with staged_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


STAGED_DIR = ".partial"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale(final: Path) -> list[Path]:
    """Remove what runs that were killed (SIGKILL, power loss) left beside ``final``: staged
    folders and files whose process is gone. Returns what was removed."""
    final = Path(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    prefix = f".{final.name}."
    for p in final.parent.iterdir():
        rest = p.name[len(prefix) :] if p.name.startswith(prefix) else ""
        pid = rest.split("-", 1)[0]
        if not (rest.endswith((STAGED_DIR, ".tmp", ".old")) and pid.isdigit()) or _alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        removed.append(p)
    return removed


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Build a folder for ``final`` in a fresh hidden folder beside it (a unique name), removed if
    the block fails or is interrupted (Ctrl-C included); publishing it is the caller's
    (``replace_dir``), so a caller can also keep it elsewhere (a rejected bundle). What a killed
    run left is swept first."""
    final = Path(final)
    sweep_stale(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(_stage_name(final, STAGED_DIR))
    tmp.mkdir()
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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
    """Publish a directory built at ``tmp`` under ``final``. What was there is moved aside first
    and deleted only once the new one is in place, so an interruption never leaves neither."""
    final = Path(final)
    old = None
    if final.exists() or final.is_symlink():
        old = final.with_name(_stage_name(final, ".old"))
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink(missing_ok=True)
