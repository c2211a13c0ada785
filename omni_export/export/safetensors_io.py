"""Safetensors without whole-file copies.

Reading: the header is parsed here and every tensor is a view of a private (copy-on-write) memory
map, so loading touches pages only as they are used. Writing: the header is written first from
the tensors' shapes (known from the meta-device model), then tensors are produced and written
one at a time, so a shard never has to be held in memory."""

from __future__ import annotations

import ctypes
import functools
import json
import mmap
import struct
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from omni_export.errors import CheckpointError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 << 20
# (address, length, map) of every map open: release_pages finds a tensor's map by address. Weak:
# a map lives as long as the tensors viewing it.
_MAPS: list[tuple[int, int, weakref.ref[mmap.mmap]]] = []


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    """Return the C heap's free pages to the kernel. glibc keeps what torch frees below its mmap
    threshold (up to 32 MB a block): quantizing a 300M-parameter encoder leaves 2 GB of free heap
    resident without this."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def release_pages(tensors: Iterable[torch.Tensor], trim: bool = True) -> int:
    """Give the kernel back the resident pages under ``tensors`` that were read from a safetensors
    map (others are skipped); returns the bytes released. The tensors stay valid: a page is read
    from the file again when next touched, so a component's stored weights cost memory only while
    a phase reads them. Safe because the maps are private and nothing writes through them (a
    written page would revert to the file's bytes). ``trim``: the C heap too (trim_heap)."""
    done = 0
    page = mmap.PAGESIZE
    seen: set[int] = set()
    for t in tensors:
        if not isinstance(t, torch.Tensor) or type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type != "cpu":
            continue
        storage = t.untyped_storage()
        addr, n = storage.data_ptr(), storage.nbytes()
        if addr in seen or not n:
            continue
        seen.add(addr)
        for base, length, ref in _MAPS:
            if base <= addr < base + length and (m := ref()) is not None:
                start = (addr - base) // page * page
                end = min(length, -(-(addr - base + n) // page) * page)
                m.madvise(mmap.MADV_DONTNEED, start, end - start)
                done += end - start
                break
    if trim:
        trim_heap()
    return done


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
            _MAPS[:] = [e for e in _MAPS if e[2]() is not None]
            _MAPS.append((torch.frombuffer(self._map, dtype=torch.uint8, count=1).data_ptr(), len(self._map), weakref.ref(self._map)))
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=self.base + begin)
        return flat.view(shape)


def write_streaming(
    path: Path,
    entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write ``entries`` (name, shape, dtype) to ``path``; ``produce(name)`` is called once per
    tensor, in order, and must return that shape and dtype. Returns the data size in bytes."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        n = dtype.itemsize
        for d in shape:
            n *= d
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as the reference writer does
    with Path(path).open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in entries:
            t = produce(name)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{name}: produced {tuple(t.shape)} {t.dtype}, declared {tuple(shape)} {dtype}")
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return offset
