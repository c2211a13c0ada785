"""The main job on a full-size (4B- or 7B-shaped) synthetic checkpoint, as a user runs it
(`omni-export --target android --model CKPT --quant int4`), in a fresh process under GNU time:
wall time and peak RSS of the whole job against the checkpoint's stored (bf16) weight bytes, and
of each phase (reports/phases.json of the bundle; the log's phase lines when the job died before
writing one). Slow: an hour or more on a 2-core host. Table and JSON.

    .venv/bin/python benchmarks/full_export.py --family interactiveomni --dir /tmp/io4b --out docs/export/full-4b-interactiveomni
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import publish  # noqa: E402

CLI = [sys.executable, "-m", "omni_export"]


def _log_phases(since: float) -> list[dict]:
    from omni_export.cli import LOG_FILE
    from omni_export.files import cache_dir

    from datetime import datetime

    path = cache_dir() / "logs" / LOG_FILE
    if not path.is_file() or path.stat().st_mtime < since:
        return []
    found = re.finditer(r"^(\S+ \S+),\d+ INFO omni_export.phases: phase (\{.*\})$", path.read_text(errors="replace"), re.M)
    return [json.loads(m.group(2)) for m in found if datetime.fromisoformat(m.group(1)).timestamp() >= since]


def run(family: str, size: str, checkpoint: Path, bundle: Path, quant: str, target: str, extra: list[str]) -> dict:
    if not (checkpoint / "config.json").is_file():
        subprocess.run([*CLI, "synth", "--family", family, "--size", size, "--out", str(checkpoint)], check=True)
    index = checkpoint / "model.safetensors.index.json"
    stored = json.loads(index.read_text())["metadata"]["total_size"] if index.is_file() else (checkpoint / "model.safetensors").stat().st_size
    started = time.time()
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *CLI, "--target", target, "--model", str(checkpoint), "--quant", quant, "--out", str(bundle),
                        "--overwrite", *extra], capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - t
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    root = bundle if p.returncode == 0 else bundle.with_name(bundle.name + ".rejected")
    report = root / "reports" / "phases.json"
    phases = json.loads(report.read_text()) if report.is_file() and report.stat().st_mtime >= started else _log_phases(started)
    out = {"family": family, "size": size, "target": target, "quant": quant, "exit": p.returncode, "wall_s": round(wall, 1),
           "gnu_time_max_rss_gb": round(int(peak.group(1)) * 1024 / 1e9, 2) if peak else None, "stored_weight_gb": round(stored / 1e9, 2),
           "phases": [{**ph, "peak_rss_gb": round((ph["peak_rss_bytes"] or 0) / 1e9, 2)} for ph in phases]}  # fmt: skip
    if p.returncode:
        out["stderr_tail"] = p.stderr[-2000:]
    return summarize(out)


def summarize(out: dict) -> dict:
    """The job's peak: the highest of its phases' peaks and GNU time's. Each phase resets the
    kernel's high-water mark (clear_refs), and the kernel folds it into the figure GNU time reads
    only when a thread exits, so GNU time alone can miss a phase's peak (4B run 4: parity 13.15
    GB, GNU time 12.65)."""
    peaks = [ph["peak_rss_gb"] for ph in out["phases"]] + [out.get("gnu_time_max_rss_gb") or 0.0]
    peak = max(peaks) if any(peaks) else None
    return {**out, "peak_rss_gb": peak, "peak_vs_stored": round(peak / out["stored_weight_gb"], 3) if peak else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", required=True)
    ap.add_argument("--size", default="full")
    ap.add_argument("--dir", type=Path, required=True, help="the checkpoint (written first when missing)")
    ap.add_argument("--target", default="android")
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.txt")
    ap.add_argument("extra", nargs="*", help="more main-job options, after --")
    a = ap.parse_args()
    bundle = a.bundle or a.dir.with_name(f"{a.dir.name}-{a.target}-{a.quant}")
    r = run(a.family, a.size, a.dir, bundle, a.quant, a.target, a.extra)
    publish(table(r), r, a.out)


def table(r: dict):  # type: ignore[no-untyped-def]
    from rich.table import Table

    t = Table(title=f"{r['family']} {r['size']}, {r['target']} {r['quant']}: exit {r['exit']}, {r['wall_s']} s, peak RSS {r['peak_rss_gb']} GB "
                    f"= {r['peak_vs_stored']}x the stored weights ({r['stored_weight_gb']} GB)")  # fmt: skip
    for col in ("component", "step", "seconds", "peak RSS GB", "RSS after GB"):
        t.add_column(col, justify="left" if col in ("component", "step") else "right")
    for ph in r["phases"]:
        t.add_row(ph["component"], ph["step"], f"{ph['seconds']:.1f}", f"{ph['peak_rss_gb']:.2f}", f"{(ph['rss_end_bytes'] or 0) / 1e9:.2f}")
    return t


if __name__ == "__main__":
    main()
