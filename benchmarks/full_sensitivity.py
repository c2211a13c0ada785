"""The sensitivity analysis alone on a full-size checkpoint, as the main job calls it: wall
time, peak RSS (the kernel's high-water mark), the ranking used, and the proposal it makes. Slow
at full size (25 min for the 4B LLM on this 2-core host); not in the default tests.

After a missed gate (`api.quant_report(..., components=[...], measured={...})`):

    .venv/bin/python benchmarks/full_sensitivity.py --model /tmp/io4b --component llm \\
        --measured 0.685109 --out /tmp/sens4b.json

``--measured``: the component's worst cosine in the rejected bundle's reports/parity.json.
Without it, the estimate before lowering (`screen`, every quantized component unless
``--component`` names some): what `omni-export --target android --quant int4` now does first.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--component", action="append", default=None, help="default: llm with --measured, else every component")
    ap.add_argument("--measured", type=float, default=None, help="the artifact's worst cosine for the component")
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--target", default="android")
    ap.add_argument("--ranking", default="auto", choices=("auto", "exact", "block"))
    ap.add_argument("--out", type=Path, required=True, help="JSON to write")
    args = ap.parse_args()

    from omni_export import api
    from omni_export.phases import _status

    t0, last = time.perf_counter(), [""]

    def progress(what: str, i: int, n: int) -> None:
        if what != last[0] or i == n or i % 6 == 0:
            print(f"{time.perf_counter() - t0:8.1f} s  {what} {i}/{n}  RSS {(_status('VmRSS') or 0) / 1e9:.2f} GB", flush=True)
        last[0] = what

    if args.measured is not None:
        comps = args.component or ["llm"]
        reports, _ = api.quant_report(args.model, args.quant, args.target, progress, components=comps[:1],
                                      measured={comps[0]: args.measured}, ranking=args.ranking)  # fmt: skip
    else:
        reports, _ = api.quant_report(args.model, args.quant, args.target, progress, components=args.component,
                                      ranking=args.ranking, screen=api.ESTIMATE_ERROR_SCALE)  # fmt: skip
    out = {"model": str(args.model), "seconds": round(time.perf_counter() - t0, 1), "peak_rss_gb": round((_status("VmHWM") or 0) / 1e9, 2),
           "mode": "after a missed gate" if args.measured is not None else "estimate before lowering", "components": {}}  # fmt: skip
    for r in reports:
        out["components"][r.component] = {
            "screened": r.screened, "ranking": r.ranking, "all_quantized": r.all_quantized.__dict__, "error_scale": r.error_scale,
            "threshold": r.threshold.__dict__, "proposal_damage": r.proposal_damage.__dict__ if r.proposal_damage else None,
            "promoted": 0 if r.screened else sum(1 for c in r.proposal.values() if c.bits == 8) - sum(1 for _, c, *_ in r.layers if c.bits == 8),
            "layers": len(r.layers), "bytes_recipe": r.bytes_recipe, "bytes_proposal": r.bytes_proposal,
            "worst": [f for f, *_ in r.layers[:10]]}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
