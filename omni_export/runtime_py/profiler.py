"""Latency of a scripted conversation, measured where the runtime runs: a warm-up run, then N
runs of the same script on a fresh conversation each. Everything comes from the pipeline's one
span record, so per-stage percentiles, the turn figures and the timeline agree.

The report is plain JSON (no roofline: that needs the device profile and is added where the
report lands, see profiles/roofline.py)."""

from __future__ import annotations

import platform
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from omni_export.runtime_py.script import Script, play

REPORT_VERSION = 1


def percentile(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


def measure(pipeline, script: Script, runs: int = 3, warmup: int = 1,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:  # type: ignore[no-untyped-def]  # fmt: skip
    step = progress or (lambda what: None)
    turns: list[dict[str, Any]] = []
    calls: dict[str, list[float]] = {}
    positions: dict[str, list[int]] = {}
    timeline: dict[str, Any] = {}
    for r in range(warmup + runs):
        kind = "warm-up" if r < warmup else f"run {r - warmup + 1}/{runs}"
        pipeline.reset()
        pipeline.recorder.clear()
        t0 = time.perf_counter()
        stats = []
        for s in play(pipeline, script):
            step(f"{kind}: turn {s.turn + 1}/{len(script.turn)}")
            stats.append(s)
        if r < warmup:
            continue
        for s in stats:
            turns.append({"run": r - warmup, **s.to_dict()})
        for span in pipeline.recorder.spans:
            calls.setdefault(span.stage, []).append(span.ms)
            positions.setdefault(span.stage, []).append(span.positions)
        if r == warmup + runs - 1:  # the last run is drawn
            timeline = {
                "spans": [[s.component, s.method, round((s.t0 - t0) * 1000, 3), round((s.t1 - t0) * 1000, 3)] for s in pipeline.recorder.spans],
                "marks": [[name, round((t - t0) * 1000, 3)] for name, t in pipeline.recorder.marks],
            }  # fmt: skip
    stages = {
        name: {"calls": len(ms), "calls_per_run": len(ms) / runs, "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90),
               "total_ms_per_run": sum(ms) / runs, "positions_p50": percentile([float(p) for p in positions[name]], 50)}
        for name, ms in sorted(calls.items())
    }  # fmt: skip

    def col(key: str) -> list[float]:
        return [t[key] for t in turns if t.get(key) is not None]

    summary = {key: {"p50": percentile(col(key), 50), "p90": percentile(col(key), 90)} for key in ("ttft_ms", "ttfa_ms", "decode_tok_s", "rtf")}
    return {
        "version": REPORT_VERSION,
        "runs": runs, "warmup": warmup, "turns_per_run": len(script.turn),
        "host": {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version()},
        "backends": sorted({s.backend for s in pipeline.sessions.values()}),
        "summary": summary,
        "peak_rss_bytes": peak_rss_bytes(),
        "stages": stages,
        "turns": turns,
        "timeline": timeline,
    }  # fmt: skip
