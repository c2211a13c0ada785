"""ExecuTorch's process-wide backend options (``executorch::runtime::set_option``), which its
Python bindings do not expose.

The one the bundles use: XNNPACK's weight cache. Without it every loaded method packs its own
copy of every weight it delegates: an LLM's prefill and decode hold the packed weights twice
(measured on the 4B bundle: 2.4 GB per method). With it, methods (and programs) that name the
same weight share one packing; XNNPACK names weights by the SHA-256 of their bytes, so only
identical data is shared. An app enables it the same way, through the C++ call, before loading.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Mapping
from pathlib import Path

from omni_export.runtime_py.backends.base import BackendUnavailableError

log = logging.getLogger(__name__)

KEY_BYTES, VALUE_BYTES = 64, 256  # runtime/backend/options.h: kMaxOptionKeyLength, kMaxOptionValueLength
BOOL, INT, STRING = 0, 1, 2  # the alternatives of its OptionValue variant, in order


class _Storage(ctypes.Union):
    _fields_ = [("b", ctypes.c_bool), ("i", ctypes.c_int), ("s", ctypes.c_char * VALUE_BYTES)]


class _Option(ctypes.Structure):  # BackendOption: a key, then std::variant<bool, int, array<char, 256>>
    _fields_ = [("key", ctypes.c_char * KEY_BYTES), ("value", _Storage), ("index", ctypes.c_ubyte)]


class _Span(ctypes.Structure):
    _fields_ = [("data", ctypes.POINTER(_Option)), ("size", ctypes.c_size_t)]


_SET = "_ZN10executorch7runtime10set_optionEPKcNS0_4SpanINS0_13BackendOptionEEE"
_GET = "_ZN10executorch7runtime10get_optionEPKcNS0_4SpanINS0_13BackendOptionEEE"


@functools.cache
def _calls() -> tuple[ctypes._CFuncPtr, ctypes._CFuncPtr]:
    import executorch

    # The library the bindings themselves link (their RPATH): the same backend registry.
    lib = ctypes.CDLL(str(Path(next(iter(executorch.__path__))) / "lib" / "libexecutorch.so"))
    calls = getattr(lib, _SET), getattr(lib, _GET)
    for call in calls:
        call.argtypes, call.restype = [ctypes.c_char_p, _Span], ctypes.c_uint32
    return calls


def _option(key: str, value: bool | int | str | None = None) -> _Option:
    opt = _Option()
    opt.key = key.encode()
    if isinstance(value, bool):
        opt.value.b, opt.index = value, BOOL
    elif isinstance(value, int):
        opt.value.i, opt.index = value, INT
    elif isinstance(value, str):
        opt.value.s, opt.index = value.encode()[: VALUE_BYTES - 1], STRING
    return opt


def _call(fn, backend: str, opt: _Option) -> None:  # type: ignore[no-untyped-def]
    err = fn(backend.encode(), _Span(ctypes.pointer(opt), 1))
    if err:
        raise BackendUnavailableError(f"ExecuTorch refused option {opt.key.decode()!r} for {backend} (error {err:#x}); "
                                 "see the log for the runtime's message")  # fmt: skip


def get_option(backend: str, key: str) -> bool | int | str:
    opt = _option(key)
    _call(_calls()[1], backend, opt)
    return {BOOL: lambda: bool(opt.value.b), INT: lambda: int(opt.value.i), STRING: lambda: opt.value.s.decode()}[opt.index]()


def set_option(backend: str, key: str, value: bool | int | str) -> None:
    """Set one option and read it back: a value that does not come back means this runtime's
    option layout is not the one above, and nothing is assumed to have been set."""
    _call(_calls()[0], backend, _option(key, value))
    got = get_option(backend, key)
    if got != value:
        raise BackendUnavailableError(f"ExecuTorch option {backend}.{key}: set {value!r}, read back {got!r}; "
                                 "this executorch build's BackendOption layout differs from the one omni-export knows")  # fmt: skip


def parse(text: str) -> bool | int | str:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(low)
    except ValueError:
        return text


def apply(options: Mapping[str, str]) -> dict[str, bool | int | str]:
    """Apply a manifest's ``Backend.key = value`` options; returns what was set. Process-wide,
    as on a device: they hold for every program loaded after."""
    done = {}
    for name, text in options.items():
        backend, _, key = name.partition(".")
        if not key:
            raise BackendUnavailableError(f"ExecuTorch option {name!r} is not Backend.key (e.g. XnnpackBackend.weight_cache_enabled)")
        value = parse(text)
        set_option(backend, key, value)
        done[name] = value
    if done:
        log.info("ExecuTorch backend options: %s", done)
    return done
