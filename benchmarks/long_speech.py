"""Long spoken replies on one bundle: a text turn decoded to MAX_NEW_TOKENS with speech, the
flow's work grouped per call of the speech stream (one group = one encode plus its ODE steps,
which is one flow chunk in the streamed flow), and the turn's TTFA and real-time factor. What it
shows: whether a flow chunk costs the same at the end of a long reply as at its start. Prints a
table, writes JSON and a plot of flow time per chunk against the reply's speech position.

    .venv/bin/python benchmarks/long_speech.py BUNDLE --max-new-tokens 400 --out docs/runtime/long-speech
    (several --max-new-tokens values run one after another in the same process)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

PROMPT = "Tell me a long story about a lighthouse keeper."


def flow_groups(spans) -> list[float]:  # type: ignore[no-untyped-def]
    """ms of flow work per encode call (the encode and the steps that follow it)."""
    groups: list[float] = []
    for s in spans:
        if s.component != "flow" or s.method == "speaker":
            continue
        if s.method.startswith("encode"):
            groups.append(0.0)
        if groups:
            groups[-1] += s.ms
    return groups


def one_reply(p, max_new_tokens: int, seed: int) -> dict:  # type: ignore[no-untyped-def]
    from omni_export.runtime_py.pipeline import collect

    p.reset()
    p.recorder.clear()
    p.add_text(PROMPT)
    reply = collect(p.respond_stream(max_new_tokens, seed=seed), p.config["output_sample_rate"])
    s = reply.stats
    groups = flow_groups(p.recorder.spans)
    turn_s = (max(sp.t1 for sp in p.recorder.spans) - min(sp.t0 for sp in p.recorder.spans))
    return {"max_new_tokens": max_new_tokens, "new_tokens": s.new_tokens, "audio_s": round(s.audio_s, 2),
            "ttfa_ms": s.ttfa_ms, "rtf": round(turn_s / s.audio_s, 4) if s.audio_s else None,
            "flow_calls": len(groups), "flow_ms_first": round(groups[0], 2) if groups else None,
            "flow_ms_last": round(groups[-1], 2) if groups else None,
            "flow_ms_median": round(float(np.median(groups)), 2) if groups else None,
            "flow_ms_total": round(sum(groups), 1), "flow_ms_per_call": [round(g, 2) for g in groups]}  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    from omni_export.plots import png

    with png(path) as ax:
        for r in rows:
            ax.plot(range(1, len(r["flow_ms_per_call"]) + 1), r["flow_ms_per_call"], marker=".", label=f"{r['new_tokens']} text tokens")
        ax.set_xlabel("flow call in the reply (one per 25 speech tokens = 1 s of speech)")
        ax.set_ylabel("flow ms per call")
        ax.legend()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--max-new-tokens", type=int, nargs="+", default=[100, 400])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True, help="path prefix: OUT.json, OUT.png, OUT.txt")
    a = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    from omni_export import api

    p = api.open_runtime(a.bundle).pipeline
    one_reply(p, 8, a.seed)  # warm-up: first calls allocate
    rows = [one_reply(p, n, a.seed) for n in a.max_new_tokens]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps({"bundle": str(a.bundle), "replies": rows}, indent=1))
    plot(rows, a.out.with_suffix(".png"))
    t = Table(title=f"long spoken replies on {a.bundle.name}")
    for col in ("text tokens", "speech s", "TTFA ms", "RTF", "flow calls", "flow ms first", "flow ms last", "flow ms median", "flow s total"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["new_tokens"]), f"{r['audio_s']:.1f}", f"{r['ttfa_ms']:.0f}", f"{r['rtf']:.3f}", str(r["flow_calls"]),
                  f"{r['flow_ms_first']:.1f}", f"{r['flow_ms_last']:.1f}", f"{r['flow_ms_median']:.1f}", f"{r['flow_ms_total'] / 1000:.2f}")  # fmt: skip
    console = Console(record=True, width=120)
    console.print(t)
    a.out.with_suffix(".txt").write_text(console.export_text())


if __name__ == "__main__":
    main()
