"""Full-size components of a family, one at a time, on ExecuTorch (android profile, fp32 XNNPACK):
each built at the family's full preset with random weights, its golden script run eagerly, traced
and lowered, then replayed from the .pte against the eager outputs. Each phase runs in its own
interpreter so its peak RSS is its own. Prints a table and writes JSON.

    .venv/bin/python benchmarks/full_components.py --family vita15 \\
        --components audio_encoder tts_nar tts_ar codec_decoder --out docs/runtime/full-vita-speech
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from phases import phase  # benchmarks/phases.py (this script's own folder is on sys.path)

COMMON = """
import resource, sys, time, torch
from pathlib import Path
from omni_export.export.families import FAMILIES
from omni_export.export.golden import Context, eager_session
from omni_export.export.trace_specs import Limits
from omni_export.export.components.base import component
family, name, work, size = FAMILIES.get(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[-1]
spec = next(s for s in family.specs(family.preset(size)) if s.name == name)
limits = Limits(max_context=1024, tiles_per_call=1)
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
def rss(): return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024**2
def build():
    torch.manual_seed(0)
    return spec.build().eval()
def script_of(m):
    sess, _ = eager_session(m, limits)
    with torch.inference_mode():
        return sess, component(m).golden_script(Context(None, limits), sess)
"""

EAGER = COMMON + """
m = build()
sess, script = script_of(m)
sess.reset()
outs, ms = [], []
with torch.inference_mode():
    for method, inputs in script:
        t = time.perf_counter()
        outs.append([o.float() for o in sess.run(method, inputs)])
        ms.append((time.perf_counter() - t) * 1000)
torch.save({"state": m.state_dict(), "script": script, "outs": outs}, work / f"{name}-ref.pt")
print({"params": sum(p.numel() for p in m.parameters()), "calls": len(script), "ms": ms, "peak_rss_gib": peak()})
"""

LOWER = COMMON + """
from omni_export.export.trace import trace_component
from omni_export.profiles import get_profile
from omni_export.targets import TARGETS
m = build()
m.load_state_dict(torch.load(work / f"{name}-ref.pt", weights_only=True)["state"])
target = TARGETS.get("executorch")
t = time.perf_counter()
with target.trace_context(m, limits, None):
    traced = trace_component(name, m, limits, target.kv_mode_for(m))
trace_s = time.perf_counter() - t
art = target.lower(traced, get_profile("android"), work, {}, {})
print({"trace_s": trace_s, "lower_s": art.build_s, "file": art.files[0], "bytes": (work / art.files[0]).stat().st_size,
       "delegated": art.delegated_share, "peak_rss_gib": peak()})
"""

RUN = COMMON + """
from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (the cache's llama:: kernels)
from executorch.runtime import Runtime
ref = torch.load(work / f"{name}-ref.pt", weights_only=True)
prog = Runtime.get().load_program(work / sys.argv[4])
methods = {n: prog.load_method(n) for n in prog.method_names}
loaded = rss()
if "reset_cache" in methods:
    methods["reset_cache"].execute([])
cos, ms = [], []
for (method, inputs), want in zip(ref["script"], ref["outs"]):
    t = time.perf_counter()
    got = methods[method].execute([i.contiguous() if torch.is_tensor(i) else i for i in inputs])  # a cache handed on may be a view
    ms.append((time.perf_counter() - t) * 1000)
    for g, w in zip(got, want):
        if w.is_floating_point() and w.numel() > 1:
            cos.append(torch.nn.functional.cosine_similarity(g.float().flatten(), w.flatten(), dim=0).item())
print({"ms": ms, "worst_cosine": min(cos), "rss_after_load_gib": loaded, "peak_rss_gib": peak()})
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", required=True)
    ap.add_argument("--components", nargs="+", required=True)
    ap.add_argument("--size", default="full", help="the family's preset (tiny: a quick check of the script)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/full-components"))
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.txt")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    results, lines = {}, []
    header = f"{'component':<14} {'params':>8} {'calls':>5} {'eager ms':>9} {'et ms':>8} {'cosine':>9} {'trace+lower s':>14} {'lower peak':>10} {'.pte MB':>8} {'rss loaded':>10}"
    lines.append(header)
    for name in a.components:
        _, eager = phase(EAGER, a.family, name, str(a.work), a.size)
        _, lowered = phase(LOWER, a.family, name, str(a.work), a.size)
        _, run = phase(RUN, a.family, name, str(a.work), lowered["file"], a.size)
        results[name] = {"eager": eager, "lower": lowered, "executorch": run}
        lines.append(f"{name:<14} {eager['params'] / 1e6:>7.1f}M {eager['calls']:>5} {sum(eager['ms']):>9.0f} {sum(run['ms']):>8.0f} "
                     f"{run['worst_cosine']:>9.6f} {lowered['trace_s']:>5.0f} + {lowered['lower_s']:>5.0f} {lowered['peak_rss_gib']:>7.2f} GiB "
                     f"{lowered['bytes'] / 1e6:>8.1f} {run['rss_after_load_gib']:>6.2f} GiB")  # fmt: skip
        print(lines[-1] if len(lines) > 2 else "\n".join(lines), flush=True)
    text = "\n".join(lines) + "\n(eager ms / et ms: the golden script's calls, summed; cosine: worst output vs eager fp32)"
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
        a.out.with_suffix(".txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
