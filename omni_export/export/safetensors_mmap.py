"""Zero-copy safetensors reading: the header is parsed here and every tensor is a view of a private
(copy-on-write) memory map, so loading a checkpoint touches pages only as they are used and the
resident set grows with what is computed on, not with the file size."""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch

from omni_export.errors import CheckpointError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_MAX_HEADER = 100 << 20


class SafetensorsFile:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        with self.path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise self._corrupt("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise self._corrupt(f"header length {n} exceeds the file")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise self._corrupt("header is not valid JSON") from None
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            dtype = DTYPES.get(e.get("dtype"))
            if dtype is None:
                raise self._corrupt(f"tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
            begin, end = e["data_offsets"]
            shape = tuple(e["shape"])
            numel = 1
            for d in shape:
                numel *= d
            if end - begin != numel * dtype.itemsize:
                raise self._corrupt(f"tensor {name!r}: {end - begin} bytes do not hold shape {list(shape)} {dtype}")
            if self.base + end > size:
                raise self._corrupt(f"tensor {name!r} ends at byte {self.base + end} but the file has {size}: truncated")
            self.entries[name] = (dtype, shape, begin, end)
        self._map: mmap.mmap | None = None

    def _corrupt(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path} is not a valid safetensors file ({why}); it is corrupt or truncated, re-download it.")

    def keys(self) -> set[str]:
        return set(self.entries)

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        dtype, shape, _, _ = self.entries[name]
        return shape, dtype

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        if self._map is None:
            with self.path.open("rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=self.base + begin)
        return flat.view(shape)
