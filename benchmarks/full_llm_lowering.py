"""The LLM's build phases alone, as the main job runs them (encode, trace, ExecuTorch lowering,
garbage collected, parity replay), with the resident set sampled every 0.5 s and split into
anonymous memory and file-backed pages (the quantization cache's mapped codes: reclaimable).
It reuses a bundle the main job built from the same checkpoint (its quantization cache and the
LLM's golden calls), so the LLM's phases can be measured again without the whole 1 h 48 min
build. Slow at full size (25 min for the 4B on this host); not in the default tests.

    .venv/bin/python benchmarks/full_llm_lowering.py --model /tmp/io4b \\
        --bundle /tmp/io4b-android-int4.rejected --out docs/export/full-4b-llm-phases.json
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import threading
import time
from pathlib import Path

from omni_export.phases import _status as _read  # one /proc/self/status field, in bytes


def _status() -> dict[str, int]:
    return {key: _read(key) or 0 for key in ("VmRSS", "RssAnon", "RssFile")}


class Sampler:
    """Peak VmRSS / RssAnon / RssFile per phase, sampled on a thread."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.phase, self.peaks, self.every = "setup", {}, every_s
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.sample()
            time.sleep(self.every)

    def sample(self) -> dict[str, int]:
        now = _status()
        peak = self.peaks.setdefault(self.phase, dict.fromkeys(now, 0))
        for key, value in now.items():
            peak[key] = max(peak[key], value)
        return now


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="the checkpoint the bundle was built from")
    ap.add_argument("--bundle", type=Path, required=True, help="an android int4 bundle (or .rejected) built from it")
    ap.add_argument("--out", type=Path, required=True, help="JSON to write")
    args = ap.parse_args()
    sampler = Sampler()

    import torch

    from omni_export.bundle.golden import read_golden
    from omni_export.bundle.manifest import read_manifest
    from omni_export.export.checkpoint import load_checkpoint
    from omni_export.export.safetensors_io import trim_heap
    from omni_export.export.trace import trace_component
    from omni_export.export.trace_specs import Limits
    from omni_export.export.widen import cast_floats
    from omni_export.profiles import get_profile
    from omni_export.quantize.engine import plan
    from omni_export.quantize.presets import PRESETS
    from omni_export.quantize.result import QuantResult
    from omni_export.runtime_py.parity import replay_component
    from omni_export.targets import TARGETS
    from omni_export.targets.base import recipe_for_target
    from omni_export.targets.tables import split_tables, swap_tables

    m = read_manifest(args.bundle)
    quant = QuantResult.load(Path(json.loads((args.bundle / "reports" / "quant.json").read_text())["cache"]))
    profile, target = get_profile(m.profile.name), TARGETS.get("executorch")
    ckpt = load_checkpoint(args.model)
    recipe, _ = recipe_for_target(target, PRESETS.get(m.quant.recipe), ckpt.components)
    plan(ckpt.components, recipe)
    module = ckpt.components["llm"]
    ckpt.components = {"llm": module}
    times: dict[str, float] = {}

    def phase(name: str) -> None:
        gc.collect()
        trim_heap()
        sampler.sample()
        sampler.phase = name
        times[name] = time.perf_counter()

    phase("encode")
    qtensors = quant.for_component("llm")
    tables, qlinears = split_tables(module, qtensors)
    tied = {h: t[len("llm") + 1:] for h in qlinears if (t := quant.shares(f"llm.{h}"))}
    cast_floats(module, torch.float32, {f"{p}.weight" for p in qtensors})
    swap_tables(module, tables, {t: h for h, t in tied.items()})
    target.encode(module, qlinears, quant.floats_for("llm"))
    limits = Limits(max_context=m.profile.max_context, prefill_chunk=m.model["prefill_chunk"])
    phase("trace")
    with target.trace_context(module, limits, None):
        traced = trace_component("llm", module, limits, target.kv_mode_for(module, profile))
    phase("lower")
    work = Path(tempfile.mkdtemp(prefix="llm-lowering-"))
    target.lower(traced, profile, work, {}, qlinears)
    left = sampler.sample()  # what lowering leaves before the collector runs
    del traced
    phase("parity")
    after_lowering = sampler.sample()
    got, backend, why = replay_component(m.components["llm"], work, target.runtime_settings(profile), read_golden(args.bundle / m.components["llm"].golden))
    if got is None:
        raise SystemExit(f"parity not run: {why}")
    del got
    phase("done")
    order = list(times) + [None]
    result = {
        "model": str(args.model), "bundle": str(args.bundle),
        "phases": [{"phase": p, "wall_s": round((times[n] if n else time.perf_counter()) - times[p], 1),
                    **{f"peak_{k}_GB": round(v / 1e9, 2) for k, v in sampler.peaks[p].items()}}
                   for p, n in zip(order, order[1:]) if p != "done"],
        "left_by_lowering_GB": {k: round(v / 1e9, 2) for k, v in left.items()},
        "after_collect_GB": {k: round(v / 1e9, 2) for k, v in after_lowering.items()},
        "end_GB": {k: round(v / 1e9, 2) for k, v in sampler.sample().items()},
        "parity_backend": backend,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{'phase':<8} {'wall s':>8} {'peak RSS GB':>12} {'anon GB':>8} {'file GB':>8}")
    for row in result["phases"]:
        print(f"{row['phase']:<8} {row['wall_s']:>8} {row['peak_VmRSS_GB']:>12} {row['peak_RssAnon_GB']:>8} {row['peak_RssFile_GB']:>8}")
    print("left by lowering", result["left_by_lowering_GB"], "after collecting", result["after_collect_GB"])


if __name__ == "__main__":
    main()
