"""Export cost against optimum-executorch on the same weights (issue 13, item 2).

A Qwen3-0.6B-shaped LLM (random N(0, 0.02) weights, tied embeddings, bf16; the shape of
shared/research/peer-baseline-cpu.md) planted into a tiny InteractiveOmni checkpoint. The same
LLM, written as a transformers directory, goes through optimum-executorch's export (its
xnnpack recipe, 8da4w g32 linears, 8-bit embeddings, context 1024); the checkpoint goes through
this project's main job (`--target android --quant int4 --context 1024`: every component, golden
I/O, parity, promotion when a gate is missed). Each runs alone in its own process under
/usr/bin/time -v, one after the other. Prints wall time, peak RSS and the LLM artifact's bytes of
each, with the ratios; our per-phase seconds come from the bundle's build report.

optimum-executorch lives in its own venv (it pins transformers 5.0.0rc1):

    python3 -m venv /work/peer/oe && /work/peer/oe/bin/pip install torch==2.13.0 optimum-executorch==1.1.0
    .venv/bin/python benchmarks/export_cost.py --work /tmp/q06 --optimum /work/peer/oe/bin/optimum-cli --out docs/quantization/export-cost
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import hf_llm  # noqa: E402
from report import publish  # noqa: E402

CONTEXT = 1024


def planted_checkpoint(out: Path) -> Path:
    """Tiny InteractiveOmni with a Qwen3-0.6B-shaped LLM (the speech LM reads its hidden size)."""
    if (out / "config.json").is_file():
        return out
    from omni_export.export.families import FAMILIES
    from omni_export.export.families import interactiveomni as io
    from omni_export.export.synthetic import write_synthetic

    family = FAMILIES.get("interactiveomni")
    tiny = io._preset("tiny")
    llm = io._qwen3(151936, 1024, 28, 16, 8, 3072, 128)
    cfg = replace(tiny, llm=llm, voicelm=replace(tiny.voicelm, speech_lm=replace(tiny.voicelm.speech_lm, text_dim=llm.hidden_size)))
    family.preset = lambda size: cfg  # type: ignore[method-assign]  # this process writes one checkpoint
    write_synthetic("interactiveomni", "tiny", out)
    return out


def timed(cmd: list[str], log: Path) -> dict:
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *map(str, cmd)], capture_output=True, text=True)
    wall = time.perf_counter() - t
    log.write_text(p.stdout + "\n" + p.stderr)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    return {"exit": p.returncode, "wall_s": round(wall, 1), "peak_rss_gib": round(int(peak.group(1)) / 1024**2, 2) if peak else None}


def ours(checkpoint: Path, bundle: Path, log: Path) -> dict:
    r = timed([sys.executable, "-m", "omni_export", "--target", "android", "--model", checkpoint, "--quant", "int4",
               "--context", CONTEXT, "--out", bundle, "--overwrite"], log)  # fmt: skip
    root = bundle if r["exit"] == 0 else bundle.with_name(bundle.name + ".rejected")
    build = json.loads((root / "reports" / "build.json").read_text())
    m = json.loads((root / "manifest.json").read_text())
    r["llm_bytes"] = sum(m["files"][f]["bytes"] for f in m["components"]["llm"]["files"])
    r["recipe"] = m["quant"]["recipe"]
    llm = next(c for c in build["components"] if c["component"] == "llm")
    r["llm_phases_s"] = {k: v for k, v in llm.items() if k.endswith("_s")}
    r["all_components_s"] = round(sum(v for c in build["components"] for k, v in c.items() if k.endswith("_s")), 1)
    return r


def optimum(cli: Path, hf_dir: Path, out: Path, log: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    r = timed([cli, "export", "executorch", "--model", hf_dir, "--task", "text-generation", "--recipe", "xnnpack",
               "--use_custom_sdpa", "--use_custom_kv_cache", "--qlinear", "8da4w", "--qlinear_group_size", "32",
               "--qembedding", "8w", "--max_seq_len", CONTEXT, "--output_dir", out], log)  # fmt: skip
    pte = out / "model.pte"
    r["llm_bytes"] = pte.stat().st_size if pte.is_file() else None
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True, help="folder for the checkpoint, the HF copy and both exports")
    ap.add_argument("--optimum", type=Path, required=True, help="optimum-cli of a venv with optimum-executorch")
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.txt")
    ap.add_argument("--only", choices=("ours", "optimum"), default=None)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    ck = planted_checkpoint(a.work / "checkpoint")
    hf = hf_llm(ck, a.work / "hf")
    res = {}
    if a.only in (None, "optimum"):
        res["optimum-executorch"] = optimum(a.optimum, hf, a.work / "optimum", a.work / "optimum.log")
    if a.only in (None, "ours"):
        res["omni-export"] = ours(ck, a.work / "bundle", a.work / "ours.log")
    if len(res) == 2:
        o, p = res["omni-export"], res["optimum-executorch"]
        res["ratio (ours / optimum)"] = {k: round(o[k] / p[k], 3) for k in ("wall_s", "peak_rss_gib", "llm_bytes") if o.get(k) and p.get(k)}
    from rich.table import Table

    t = Table(title="export of a Qwen3-0.6B-shaped LLM, int4 (8da4w g32, 8-bit embeddings), context 1024")
    for col in ("", "exit", "wall s", "peak RSS GiB", "LLM artifact MB"):
        t.add_column(col, justify="left" if not col else "right")
    for name, r in res.items():
        size = r.get("llm_bytes")
        if name.startswith("ratio"):
            t.add_row(name, "", f"{r.get('wall_s', '-')}x", f"{r.get('peak_rss_gib', '-')}x", f"{r.get('llm_bytes', '-')}x")
        else:
            t.add_row(name, str(r["exit"]), f"{r['wall_s']:.0f}", f"{r['peak_rss_gib']}", f"{size / 1e6:.1f}" if size else "-")
    publish(t, res, a.out)


if __name__ == "__main__":
    main()
