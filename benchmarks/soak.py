"""A long conversation on one bundle: TURNS spoken turns in one pipeline (real speech from
espeak-ng, 160 ms microphone chunks at 48 kHz, so the streaming resampler runs too; a reply with
speech each turn; the history dropped and restarted when a turn would not fit: context policy
"reset"), recording after every turn the process RSS, the KV position, TTFT, TTFA and the turn's
wall time. What it shows: memory that stays flat (no growth per turn) and latency that does not
drift. Prints a table of every tenth turn, writes JSON and a plot of RSS and latency per turn.

    .venv/bin/python benchmarks/soak.py BUNDLE --turns 100 --out docs/runtime/soak
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

QUESTIONS = ["What is shown in this picture?", "Tell me a short story.", "How does the weather look today?",
             "Can you say that again, slowly?", "What time is it where you are?"]  # fmt: skip


def rss_mb() -> float:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) / 1024


def spoken(text: str, folder: Path) -> Path:
    path = folder / f"{abs(hash(text))}.wav"
    if not path.exists():
        subprocess.run(["espeak-ng", "-w", str(path), text], check=True)
    return path


def soak(bundle: Path, turns: int, max_new_tokens: int) -> list[dict]:
    from omni_export import api
    from omni_export.runtime_py.audio import read_audio
    from omni_export.runtime_py.pipeline import collect

    runtime = api.open_runtime(bundle, context_policy="reset")
    p = runtime.pipeline
    rate = p.config["output_sample_rate"]
    step = int(0.16 * 48000)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        wavs = [read_audio(spoken(q, Path(tmp)), 48000) for q in QUESTIONS]
        p.reset()
        for i in range(turns):
            t0 = time.perf_counter()
            mic = wavs[i % len(wavs)]
            for k in range(0, len(mic), step):
                p.push_audio(mic[k : k + step], sample_rate=48000)
            reply = collect(p.respond_stream(max_new_tokens, seed=i), rate)
            s = reply.stats
            rows.append({"turn": i + 1, "rss_mb": round(rss_mb(), 1), "position": s.position, "prompt_tokens": s.prompt_tokens,
                         "new_tokens": s.new_tokens, "context_reset": s.context_reset, "ttft_ms": s.ttft_ms, "ttfa_ms": s.ttfa_ms,
                         "audio_s": round(s.audio_s, 3), "turn_s": round(time.perf_counter() - t0, 3)})  # fmt: skip
    return rows


def plot(rows: list[dict], path: Path) -> None:
    from omni_export.plots import png

    turns = [r["turn"] for r in rows]
    with png(path, 2, figsize=(9, 6), sharex=True) as (a, b):
        a.plot(turns, [r["rss_mb"] for r in rows])
        a.set_ylabel("RSS (MB)")
        for t in (r["turn"] for r in rows if r["context_reset"]):
            a.axvline(t, color="grey", lw=0.5, ls=":")
        b.plot(turns, [r["ttft_ms"] for r in rows], label="TTFT")
        b.plot(turns, [r["ttfa_ms"] for r in rows], label="TTFA")
        b.set_ylabel("ms")
        b.set_xlabel("turn (dotted: history dropped to fit)")
        b.legend()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--turns", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--out", type=Path, required=True, help="path prefix: OUT.json, OUT.png, OUT.txt")
    a = ap.parse_args()
    rows = soak(a.bundle, a.turns, a.max_new_tokens)
    first = [r["rss_mb"] for r in rows[: max(1, len(rows) // 10)]]
    last = [r["rss_mb"] for r in rows[-max(1, len(rows) // 10) :]]
    summary = {"bundle": str(a.bundle), "turns": len(rows), "rss_first_tenth_mb": float(np.median(first)),
               "rss_last_tenth_mb": float(np.median(last)), "rss_growth_mb": float(np.median(last) - np.median(first)),
               "context_resets": sum(r["context_reset"] for r in rows),
               "ttft_ms_median": float(np.median([r["ttft_ms"] for r in rows])),
               "ttfa_ms_median": float(np.median([r["ttfa_ms"] for r in rows if r["ttfa_ms"] is not None]))}  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps({"summary": summary, "turns": rows}, indent=1))
    plot(rows, a.out.with_suffix(".png"))
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{len(rows)}-turn soak of {a.bundle.name}")
    for col in ("turn", "RSS MB", "KV position", "reset", "TTFT ms", "TTFA ms", "turn s"):
        t.add_column(col, justify="right")
    for r in rows:
        if r["turn"] == 1 or r["turn"] % 10 == 0:
            t.add_row(str(r["turn"]), f"{r['rss_mb']:.0f}", str(r["position"]), "yes" if r["context_reset"] else "",
                      f"{r['ttft_ms']:.0f}", f"{r['ttfa_ms']:.0f}" if r["ttfa_ms"] is not None else "-", f"{r['turn_s']:.2f}")  # fmt: skip
    console = Console(record=True, width=100)
    console.print(t)
    console.print(json.dumps(summary))
    a.out.with_suffix(".txt").write_text(console.export_text())


if __name__ == "__main__":
    main()
