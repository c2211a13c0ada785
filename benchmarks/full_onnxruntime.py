"""The ONNX and Core ML paths at full size: a 4B-shaped LLM (InteractiveOmni `full`, Qwen3-4B shapes)
quantized int4 (RTN; g32 for ONNX Runtime, g64 for TensorRT), traced with the explicit KV cache,
lowered to ONNX by the target (``--target onnxruntime``: fp32 graphs for the CPU provider;
``--target tensorrt``: the strongly typed fp16 graphs TensorRT builds engines from, op-checked;
``--target coreml``: the stateful multifunction .mlpackage, validated) and, for the ONNX graphs,
run by ONNX Runtime on this host. Each phase runs in its own process so its peak RSS is its
own. Prints a table and JSON.

    .venv/bin/python benchmarks/full_checkpoint.py --family interactiveomni --dir /tmp/io4b   # writes it
    .venv/bin/python benchmarks/full_onnxruntime.py --checkpoint /tmp/io4b --out /tmp/io4b-onnx
    .venv/bin/python benchmarks/full_onnxruntime.py --target tensorrt --checkpoint /tmp/io4b --out /tmp/io4b-trt
    .venv/bin/python benchmarks/full_onnxruntime.py --target coreml --checkpoint /tmp/io4b --out /tmp/io4b-coreml

This is the LLM alone (the component that dominates memory and time); the whole-model main job at
this size is the real-size issue's work.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from full_checkpoint import phase  # noqa: E402

EXPORT = """
import json, resource, sys, time
from pathlib import Path
import torch
from omni_export.configs import to_dict
from omni_export.bundle.manifest import ComponentEntry, MethodEntry, TensorSpec
from omni_export.export.checkpoint import load_checkpoint
from omni_export.export.trace import trace_component
from omni_export.export.trace_specs import Limits
from omni_export.profiles import get_profile
from omni_export.quantize.engine import quantize_components
from omni_export.quantize.recipe import QuantConfig, QuantRecipe, QuantRule
from omni_export.targets.base import TARGETS
import omni_export.targets  # noqa: F401  (registers the targets)

src, out, context, target_name, profile_name, group = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6])
rss = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024**2
t = {}
t0 = time.perf_counter()
ck = load_checkpoint(src, components=["llm"])  # bf16, memory-mapped
llm = ck.components["llm"]
t["load_s"] = time.perf_counter() - t0
recipe = QuantRecipe("int4-llm", (QuantRule(".", QuantConfig(bits=4, group_size=group)),))
t0 = time.perf_counter()
result = quantize_components({"llm": llm}, recipe, "full", ck.tokenizer)
t["quantize_s"] = time.perf_counter() - t0
t["rss_after_quantize_gib"] = rss()
target = TARGETS.get(target_name)
profile = get_profile(profile_name)
tensors = result.for_component("llm")
target.encode(llm, tensors, result.floats_for("llm"))
if target_name != "tensorrt":
    # What stays float (embedding table, norms) is traced fp32 (ONNX Runtime runs it so; Core ML's
    # converter takes it to fp16 itself); the quantized linears hold the QuantResult now.
    llm.float()
# (TensorRT: its trace context takes the bf16 body to fp16 directly. The fp32-layer measurement
# needs the fp32 module and golden calls, which the main job has; it is not run here.)
limits = Limits(max_context=context, prefill_chunk=min(Limits.prefill_chunk, context))
t0 = time.perf_counter()
with target.trace_context(llm, limits):
    traced = trace_component("llm", llm, limits, target.kv_mode)
t["trace_s"] = time.perf_counter() - t0
t0 = time.perf_counter()
art = target.lower(traced, profile, out, {}, tensors)
t["lower_s"] = time.perf_counter() - t0
methods = {n: MethodEntry(tuple(TensorSpec(x.name, x.dtype, x.shape) for x in s.inputs),
                          tuple(TensorSpec(x.name, x.dtype, x.shape) for x in s.outputs), art.entries[n])
           for n, s in traced.specs.items()}
entry = ComponentEntry(backend=art.backend, files=art.files, methods=methods, role="decoder", precision="int4",
                       golden="", parity_backend="onnxruntime", description="llm", kv_cache=traced.kv)
t["rss_after_lower_gib"] = rss()
(out / "entry.json").write_text(json.dumps(to_dict(entry)))
sizes = {f: (out / f).stat().st_size for f in art.files}
print({**t, "files": sizes, "quantized_linears": len(tensors), "hidden": int(llm.cfg.hidden_size),
       "params": sum(p.numel() for p in llm.parameters()) + sum(q.q.numel() for q in tensors.values()),
       "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2})
"""

RUN = """
import json, resource, sys, time
from pathlib import Path
import torch
from omni_export.bundle.manifest import ComponentEntry, RuntimeSettings
from omni_export.configs import from_dict
from omni_export.runtime_py.backends import open_session
sys.path.insert(0, sys.argv[3])
from llm_decode import prefill_then_decode

out, threads = Path(sys.argv[1]), int(sys.argv[2])
entry = from_dict(ComponentEntry, json.loads((out / "entry.json").read_text()))
t0 = time.perf_counter()
sess = open_session(entry, out, RuntimeSettings(threads=threads), backend="onnxruntime")  # the graphs as they are, on this host
load_s = time.perf_counter() - t0
rss_loaded = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024**2
torch.manual_seed(0)
ids = torch.randint(0, 1000, (1, 64))
embeds = sess.run("embed", [ids])[0]
prefill, decode, tokens = prefill_then_decode(sess, embeds, 32, max_len=entry.kv_cache.max_len)
print({"session_load_s": load_s, "rss_after_session_gib": rss_loaded, "prefill_64_tok_s": prefill, "decode_tok_s": decode,
       "threads": threads, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2})
"""


TARGETS = {"onnxruntime": ("desktop-cpu", 32), "tensorrt": ("jetson-agx-orin", 64), "coreml": ("iphone-15-pro", 32)}  # profile, int4 block
NOT_RUN = {"coreml": "Core ML predicts only on macOS: the package is converted and validated here, not run"}


def measure(checkpoint: Path, out: Path, context: int, threads: int, target: str = "onnxruntime") -> dict:
    profile, group = TARGETS[target]
    e_wall, e = phase(EXPORT, str(checkpoint), str(out), str(context), target, profile, str(group))
    if target in NOT_RUN:
        return {"export_process_s": e_wall, **{f"export.{k}": v for k, v in e.items()}, "run": NOT_RUN[target]}
    r_wall, r = phase(RUN, str(out), str(threads), str(Path(__file__).resolve().parent))
    return {"export_process_s": e_wall, **{f"export.{k}": v for k, v in e.items()}, "run_process_s": r_wall, **{f"run.{k}": v for k, v in r.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target", choices=sorted(TARGETS), default="onnxruntime")
    a = ap.parse_args()
    r = measure(a.checkpoint, a.out, a.context, a.threads, a.target)
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{a.target}: full-size LLM ({a.checkpoint.name})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in r.items():
        if k == "export.files":
            for f, n in v.items():
                t.add_row(f"file {f}", f"{n / 1e9:,.3f} GB")
            continue
        t.add_row(k, f"{v:,.2f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v))
    Console().print(t)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
