"""The latency timeline as a PNG: one row per component, a bar per call, each turn's end of user
audio and first audio out marked. Drawn from a latency report's ``timeline`` (the last run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omni_export.plots import png

MARKS = {"audio_end": ("tab:red", "end of user audio"), "first_audio": ("tab:green", "first audio out")}


def draw_timeline(report: dict[str, Any], path: Path, title: str = "") -> Path:
    import matplotlib.pyplot as plt

    spans = report["timeline"]["spans"]
    rows = sorted({c for c, *_ in spans}, key=lambda c: min(s[2] for s in spans if s[0] == c))
    colours = plt.get_cmap("tab10")
    with png(path, figsize=(14, 1.0 + 0.45 * len(rows))) as ax:
        for i, row in enumerate(rows):
            bars = [(t0 / 1000, max((t1 - t0) / 1000, 1e-4)) for c, _, t0, t1 in spans if c == row]
            ax.broken_barh(bars, (i - 0.4, 0.8), color=colours(i % 10))
        seen = set()
        for name, t in report["timeline"]["marks"]:
            colour, label = MARKS.get(name, ("black", name))
            ax.axvline(t / 1000, color=colour, linestyle="--", linewidth=1, label=None if name in seen else label)
            seen.add(name)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("seconds since the conversation started (last measured run)")
        ax.set_title(title or "streaming pipeline timeline")
        ax.grid(axis="x", alpha=0.3)
        if seen:
            ax.legend(loc="upper right", fontsize=8)
    return Path(path)
