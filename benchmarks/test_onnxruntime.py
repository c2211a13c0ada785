"""The demo's LLM at int4, side by side in one run: the project's ONNX Runtime bundle
(desktop-cpu; as its profile configures the sessions, and with spinning intra-op threads as an
app running the LLM alone would), its ExecuTorch bundle (android), and onnxruntime-genai's model
builder on the same weights (int4, block 32, accuracy level 4). 2 threads each, a 64-token prompt, 128 greedy tokens;
rounds interleaved so host noise hits every runtime alike; best of the rounds reported.

Aim: the project's graph at least as fast as the builder's on the same kernels (MatMulNBits).

Run: .venv/bin/python -m pytest benchmarks/test_onnxruntime.py -s -p no:cacheprovider"""

import json
import os
from pathlib import Path

import torch

from omni_export import api
from omni_export.bundle import read_manifest
from omni_export.bundle.manifest import RuntimeSettings
from omni_export.runtime_py.backends import open_session

from llm_decode import prefill_then_decode
from peers import hf_llm, ort_genai_build, ort_genai_speed

PROMPT, NEW, ROUNDS, THREADS = 64, 128, 3, 2
OUT = Path(__file__).resolve().parent.parent / "docs" / "onnxruntime"


def _prompt(tokenizer_dir: Path) -> list[int]:
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    return tok.encode(topics["if"], add_special_tokens=False).ids[:PROMPT]


def _session(bundle: Path, **options: str):  # type: ignore[no-untyped-def]
    m = read_manifest(bundle)
    c = m.components["llm"]
    settings = RuntimeSettings(THREADS, m.profile.runtime.compute_units, m.profile.runtime.providers, {**m.profile.runtime.options, **options})
    return open_session(c, bundle, settings), (bundle / c.files[0]).parent, c


def _dir_bytes(paths) -> int:  # type: ignore[no-untyped-def]
    return sum(p.stat().st_size for p in paths)


def test_llm_speed_against_onnxruntime_genai(demo_checkpoint, demo_bundle):
    ort_bundle, et_bundle = demo_bundle("int4", "desktop-cpu"), demo_bundle("int4", "android")
    peer_dir, build_s = ort_genai_build(hf_llm(demo_checkpoint, api.cache_dir() / "bench-hf-llm"), api.cache_dir() / "bench-ort-genai-int4", THREADS)
    prompt = _prompt(demo_checkpoint)
    ids = torch.tensor([prompt])
    # The bundle as its profile configures it (pools that sleep when idle: right for a bundle's
    # several sessions on few cores), and as an app running the LLM alone would (spinning).
    sessions = {"omni-export onnxruntime": _session(ort_bundle),
                "omni-export onnxruntime, spin": _session(ort_bundle, **{"session.intra_op.allow_spinning": "1"}),
                "omni-export executorch": _session(et_bundle)}  # fmt: skip
    best: dict[str, dict[str, float]] = {}
    tokens: dict[str, list[int]] = {}
    for rnd in range(ROUNDS + 1):  # the first round warms every runtime and is not counted
        for name, (sess, _, _) in sessions.items():
            pre, dec, toks = prefill_then_decode(sess, sess.run("embed", [ids])[0], NEW)
            best.setdefault(name, {"prefill": 0.0, "decode": 0.0})
            tokens[name] = toks
            if rnd > 0:
                best[name] = {"prefill": max(best[name]["prefill"], pre), "decode": max(best[name]["decode"], dec)}
        pre, dec, toks = ort_genai_speed(peer_dir, prompt, NEW)
        tokens["onnxruntime-genai builder"] = toks
        if rnd > 0:
            b = best.setdefault("onnxruntime-genai builder", {"prefill": 0.0, "decode": 0.0})
            best["onnxruntime-genai builder"] = {"prefill": max(b["prefill"], pre), "decode": max(b["decode"], dec)}
    peer = best["onnxruntime-genai builder"]
    sizes = {"omni-export onnxruntime": _dir_bytes(ort_bundle / f for f in sessions["omni-export onnxruntime"][2].files),
             "omni-export onnxruntime, spin": _dir_bytes(ort_bundle / f for f in sessions["omni-export onnxruntime"][2].files),
             "omni-export executorch": _dir_bytes([et_bundle / sessions["omni-export executorch"][2].files[0]]),
             "onnxruntime-genai builder": _dir_bytes(p for p in peer_dir.iterdir() if p.suffix in (".onnx", ".data"))}  # fmt: skip
    rows = {n: {**v, "prefill_over_builder": v["prefill"] / peer["prefill"], "decode_over_builder": v["decode"] / peer["decode"],
                "llm_bytes": sizes[n]} for n, v in best.items()}  # fmt: skip
    agree = sum(a == b for a, b in zip(tokens["omni-export onnxruntime"], tokens["omni-export executorch"], strict=False))
    lines = [f"demo LLM int4 g32, {THREADS} threads, prompt {PROMPT}, {NEW} greedy tokens, best of {ROUNDS} interleaved rounds",
             f"{'runtime':28s} {'prefill tok/s':>14s} {'x builder':>10s} {'decode tok/s':>13s} {'x builder':>10s} {'LLM MB':>8s}"]  # fmt: skip
    for n, r in rows.items():
        lines.append(f"{n:28s} {r['prefill']:14.1f} {r['prefill_over_builder']:10.2f} {r['decode']:13.1f} {r['decode_over_builder']:10.2f} {r['llm_bytes'] / 1e6:8.1f}")
    lines.append(f"greedy tokens equal between the project's two bundles: {agree}/{len(tokens['omni-export onnxruntime'])}")
    print("\n" + "\n".join(lines))
    if os.environ.get("OMNI_BENCH_WRITE_DOCS"):
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "benchmark-llm.txt").write_text("\n".join(lines) + "\n")
        (OUT / "benchmark-llm.json").write_text(json.dumps({"rows": rows, "builder_build_s": build_s, "threads": THREADS,
                                                            "prompt": PROMPT, "new_tokens": NEW, "rounds": ROUNDS}, indent=1))  # fmt: skip
    assert all(r["decode"] > 0 for r in rows.values())
