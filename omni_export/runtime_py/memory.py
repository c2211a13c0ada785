"""Where a bundle's memory goes once a runtime holds it: each component's session opened in turn
(all kept open, as the pipeline keeps them), the resident set measured after loading and again
after its golden calls have run once (a runtime's memory plan, activations and KV cache are
touched on first use, not at load). Resident bytes, not virtual: what the device's memory
budget pays for."""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omni_export.runtime_py.profiler import peak_rss_bytes


def rss_bytes() -> int:
    """The process's resident set now (Linux /proc; elsewhere the peak, the closest the OS says)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except OSError:
        return peak_rss_bytes()


@dataclass(frozen=True)
class ComponentMemory:
    component: str
    backend: str
    file_bytes: int
    load_bytes: int  # resident growth when its session opened
    run_bytes: int  # further growth over its golden calls (plan, activations, cache pages)
    planned_bytes: int | None  # what the artifact's memory plan asks for (ExecuTorch); None: not said

    @property
    def total_bytes(self) -> int:
        return self.load_bytes + self.run_bytes


@dataclass(frozen=True)
class BundleMemory:
    bundle: str
    runtime_bytes: int  # resident after importing the runtimes, before any component
    components: tuple[ComponentMemory, ...]
    final_bytes: int  # resident with every session open and run once
    peak_bytes: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for c, src in zip(d["components"], self.components, strict=True):
            c["total_bytes"] = src.total_bytes
        return d


def measure_bundle(bundle: str | Path, backend: str | None = None, progress=None) -> BundleMemory:  # type: ignore[no-untyped-def]
    """Open every component of ``bundle`` in this process, one after another, and record what each
    adds to the resident set. Run it in a fresh process: what this one already holds is the baseline."""
    from omni_export.bundle.golden import read_golden
    from omni_export.bundle.manifest import read_manifest
    from omni_export.runtime_py.backends import SESSIONS, open_session
    from omni_export.runtime_py.parity import replay

    root = Path(bundle)
    m = read_manifest(root)
    kinds = {backend or c.backend for c in m.components.values()}
    for kind in kinds:  # import each runtime first: its libraries are not any component's cost
        SESSIONS.get(kind).unavailable()
    gc.collect()
    base = rss_bytes()
    sessions, rows = [], []
    for i, (name, entry) in enumerate(m.components.items()):
        if progress:
            progress(name, i, len(m.components))
        calls = read_golden(root / entry.golden)  # read before measuring: the golden data is not the runtime's
        gc.collect()
        before = rss_bytes()
        session = open_session(entry, root, m.profile.runtime, backend=backend)
        loaded = rss_bytes()
        replay(session, calls, entry.io_names, entry.kv_cache.methods if entry.kv_cache else ())
        del calls
        gc.collect()
        ran = rss_bytes()
        sessions.append(session)
        size = sum(m.files[f].bytes for f in entry.files if f in m.files)
        rows.append(ComponentMemory(name, backend or entry.backend, size, loaded - before, max(0, ran - loaded), session.planned_bytes()))
    final = rss_bytes()
    del sessions
    return BundleMemory(str(root), base, tuple(rows), final, peak_rss_bytes())
