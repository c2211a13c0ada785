"""One benchmark phase in a fresh interpreter, shared by the full-size benchmark scripts."""

from __future__ import annotations

import ast
import subprocess
import sys
import time


def phase(code: str, *args: str) -> tuple[float, dict]:
    """Run ``code`` with ``args`` in a fresh interpreter and return (wall seconds, the dict it printed
    last). Each phase reports its own peak RSS (RUSAGE_SELF): the parent's RUSAGE_CHILDREN peak is
    a maximum over every child it ever waited for."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"phase failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return time.perf_counter() - t, ast.literal_eval(p.stdout.strip().splitlines()[-1])
