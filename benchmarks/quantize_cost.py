"""Calibration + quantization wall time and peak RSS, each run in its own process (its own
RUSAGE_SELF peak). The checkpoint is loaded as stored (bf16, memory-mapped); decoder stacks are
quantized layer by layer, one layer in fp32 at a time.

    .venv/bin/python benchmarks/quantize_cost.py --model DIR --methods rtn,awq,gptq [--only llm] [--samples 8]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from full_checkpoint import phase  # noqa: E402

QUANTIZE = """
import resource, sys, time, torch
from omni_export.export.checkpoint import load_checkpoint
from omni_export.quantize.engine import quantize_components
from omni_export.quantize.presets import PRESETS
from omni_export.quantize.recipe import QuantConfig, QuantRecipe, QuantRule
model, method, only, samples = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ck = load_checkpoint(model, components=[only] if only else None)
base = PRESETS.get("int4")
with_method = lambda c: None if c is None else QuantConfig(**{**c.__dict__, "method": method})
rules = tuple(QuantRule(r.pattern, with_method(r.config)) for r in base.rules)
if only:  # the int4 preset's choice for that component, everything else float
    rules = (QuantRule("^" + only + r"\.", with_method(base.config_for(only + ".x"))), QuantRule(".", None))
recipe = QuantRecipe("int4-" + method, rules)
comps = {k: v for k, v in ck.components.items() if not only or k == only}
t = time.perf_counter()
res = quantize_components(comps, recipe, ck.fingerprint(), ck.tokenizer, samples=samples)
wall = time.perf_counter() - t
print({"method": method, "seconds": wall, "tensors": len(res.tensors), "params_quantized": sum(q.q.numel() for q in res.tensors.values()),
       "bytes": sum(q.nbytes() for q in res.tensors.values()),
       "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2})
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--methods", default="rtn,awq,gptq")
    ap.add_argument("--only", default="", help="one component (e.g. llm); default: every component the int4 preset quantizes")
    ap.add_argument("--samples", type=int, default=8)
    a = ap.parse_args()
    rows = []
    for method in a.methods.split(","):
        wall, r = phase(QUANTIZE, a.model, method, a.only, str(a.samples))
        rows.append({**r, "process_s": wall})
        print(f"{method:5s} quantize {r['seconds']:8.1f} s  process {wall:8.1f} s  peak RSS {r['peak_rss_gib']:6.2f} GiB  "
              f"{r['tensors']} tensors, {r['params_quantized'] / 1e6:,.1f} M params -> {r['bytes'] / 1e9:.3f} GB", flush=True)  # fmt: skip
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
