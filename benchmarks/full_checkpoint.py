"""Write and load a full-size synthetic checkpoint, each phase in its own process so its peak RSS
is its own. Prints a table and JSON.

    .venv/bin/python benchmarks/full_checkpoint.py --family interactiveomni --size full --dir /tmp/io4b
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from phases import phase  # benchmarks/phases.py (this script's own folder is on sys.path)

WRITE = """
import resource, sys
from omni_export.export.synthetic import write_synthetic
write_synthetic(sys.argv[1], sys.argv[2], sys.argv[3], overwrite=True)
print({"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2})
"""
LOAD = """
import resource, sys, time, torch
from omni_export.export.checkpoint import load_checkpoint
t = time.perf_counter()
ck = load_checkpoint(sys.argv[1])
load_s = time.perf_counter() - t
rss_after_load = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024**2
llm = ck.components["llm"]
llm.model.setup_cache(8)
t = time.perf_counter()
with torch.inference_mode():
    logits = llm(llm.embed(torch.tensor([[1, 2, 3, 4]])), torch.arange(4))
step_s = time.perf_counter() - t
assert torch.isfinite(logits.float()).all()
params = sum(p.numel() for m in ck.components.values() for p in m.parameters())
print({"load_s": load_s, "rss_after_load_gib": rss_after_load, "llm_prefill_4tok_s": step_s, "params": params,
       "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2})
"""


def measure(family: str, size: str, directory: Path) -> dict:
    w_wall, w = phase(WRITE, family, size, str(directory))
    disk = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    l_wall, inner = phase(LOAD, str(directory))
    return {"family": family, "size": size, "params": inner["params"], "disk_gb": disk / 1e9,
            "write_s": w_wall, "write_peak_rss_gib": w["peak_rss_gib"], "load_process_s": l_wall, "load_s": inner["load_s"],
            "rss_after_load_gib": inner["rss_after_load_gib"], "load_peak_rss_gib": inner["peak_rss_gib"],
            "llm_prefill_4tok_s": inner["llm_prefill_4tok_s"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", required=True)
    ap.add_argument("--size", default="full")
    ap.add_argument("--dir", type=Path, required=True)
    a = ap.parse_args()
    r = measure(a.family, a.size, a.dir)
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{a.family} {a.size}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in r.items():
        t.add_row(k, f"{v:,.2f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v))
    Console().print(t)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
