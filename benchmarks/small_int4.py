"""The issue-13 acceptance run: a `small` synthetic checkpoint (random weights) exported with the
main job at `--target android --quant int4`, in a fresh process under /usr/bin/time -v. Reports
whether the bundle passed parity (promotion included), its LLM artifact against the same LLM at
fp16 (2 bytes per parameter), the promoted layers, wall time and peak RSS, then the runtime's
resident memory of the bundle (`omni-export memory`). Table and JSON.

    .venv/bin/python benchmarks/small_int4.py --family interactiveomni --dir /tmp/s/io --out docs/quantization/small-int4-interactiveomni
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import publish  # noqa: E402

CLI = [sys.executable, "-m", "omni_export"]


def _timed(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """(process, wall s, peak RSS GiB) of ``cmd`` under GNU time."""
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    return p, wall, int(peak.group(1)) / 1024**2 if peak else float("nan")


def llm_params(checkpoint: Path) -> int:
    from omni_export.export.checkpoint import load_checkpoint

    ck = load_checkpoint(checkpoint, components=["llm"])
    return sum(p.numel() for p in ck.components["llm"].parameters())


def run(family: str, checkpoint: Path, bundle: Path) -> dict:
    if not (checkpoint / "config.json").is_file():
        subprocess.run([*CLI, "synth", "--family", family, "--size", "small", "--out", str(checkpoint)], check=True)
    p, wall, peak = _timed([*CLI, "--target", "android", "--model", str(checkpoint), "--quant", "int4", "--out", str(bundle), "--overwrite"])
    if p.returncode not in (0, 4):
        raise RuntimeError(f"export failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    root = bundle if p.returncode == 0 else bundle.with_name(bundle.name + ".rejected")
    manifest = json.loads((root / "manifest.json").read_text())
    parity = json.loads((root / "reports" / "parity.json").read_text())
    llm = manifest["components"]["llm"]
    llm_bytes = sum(manifest["files"][f]["bytes"] for f in llm["files"])
    params = llm_params(checkpoint)
    promoted = [r["pattern"] for r in manifest["quant"]["rules"] if r["pattern"].startswith("^")]
    out = {"family": family, "exit": p.returncode, "passed": p.returncode == 0, "recipe": manifest["quant"]["recipe"],
           "wall_s": round(wall, 1), "peak_rss_gib": round(peak, 2), "llm_params": params, "llm_artifact_bytes": llm_bytes,
           "llm_fp16_bytes": 2 * params, "llm_vs_fp16": round(llm_bytes / (2 * params), 3),
           "llm_tables": llm["quant"]["tables"] if llm.get("quant") else {}, "promoted_layers": len(promoted),
           "worst_cosine": {r["component"]: min(x["cosine"] for x in r["results"] if x["reference"] == r["gate_reference"]) for r in parity}}  # fmt: skip
    if p.returncode == 0:
        m = subprocess.run([*CLI, "memory", str(root), "--json"], capture_output=True, text=True, check=True)
        mem = json.loads(m.stdout)
        out["runtime_rss_gib"] = round(mem["final_bytes"] / 1024**3, 3)
        out["runtime_components"] = {c["component"]: {"file_mb": round(c["file_bytes"] / 1e6, 1), "plan_mb": round((c["planned_bytes"] or 0) / 1e6, 1),
                                                      "resident_mb": round(c["total_bytes"] / 1e6, 1)} for c in mem["components"]}  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", required=True)
    ap.add_argument("--dir", type=Path, required=True, help="the small checkpoint (written first when missing)")
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.txt")
    a = ap.parse_args()
    bundle = a.bundle or a.dir.with_name(a.dir.name + "-android-int4")
    r = run(a.family, a.dir, bundle)
    from rich.table import Table

    t = Table(title=f"{a.family} small, android int4")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in r.items():
        t.add_row(k, json.dumps(v) if isinstance(v, dict) else f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v))
    publish(t, r, a.out)
    shutil.rmtree(bundle.with_name(bundle.name + ".rejected"), ignore_errors=True) if r["passed"] else None


if __name__ == "__main__":
    main()
