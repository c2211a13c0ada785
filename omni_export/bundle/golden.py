"""Golden I/O: an ordered list of method calls on one component, each with its named inputs and
the eager reference outputs in fp32 and fp16. Stateful methods replay in order (prefill, then
decode steps through the cache), so the same file checks any backend.

npz layout: ``calls`` (method names in order), ``in/I/NAME``, ``fp32/I/NAME``, ``fp16/I/NAME``
for call I, with NAME the manifest's input/output names."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omni_export.errors import OmniExportError
from omni_export.files import atomic_write_bytes

PRECISIONS = ("fp32", "fp16")


@dataclass
class GoldenCall:
    method: str
    inputs: dict[str, np.ndarray]
    outputs: dict[str, dict[str, np.ndarray]]  # precision -> output name -> array


def write_golden(path: Path, calls: list[GoldenCall]) -> Path:
    arrays: dict[str, np.ndarray] = {"calls": np.array([c.method for c in calls])}
    for i, call in enumerate(calls):
        arrays.update({f"in/{i}/{k}": v for k, v in call.inputs.items()})
        for prec, outs in call.outputs.items():
            arrays.update({f"{prec}/{i}/{k}": v for k, v in outs.items()})
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def read_golden(path: Path) -> list[GoldenCall]:
    try:
        return _read_golden(path)
    except Exception as exc:  # numpy, zipfile and the layout checks below raise many types for a damaged file
        raise OmniExportError(f"cannot read golden file {path}: {type(exc).__name__}: {str(exc)[:160]}. "
                              "The file is damaged; rebuild the bundle.") from None  # fmt: skip


def _read_golden(path: Path) -> list[GoldenCall]:
    data = np.load(path, allow_pickle=False)
    calls = [GoldenCall(str(m), {}, {p: {} for p in PRECISIONS}) for m in data["calls"]]
    for key in data.files:
        if key == "calls":
            continue
        kind, idx, name = key.split("/", 2)
        call = calls[int(idx)]
        (call.inputs if kind == "in" else call.outputs[kind])[name] = data[key]
    return calls
