"""Decode cost against onnxruntime-genai on the same weights (issue 13, item 4).

The Qwen3-0.6B-shaped LLM of benchmarks/export_cost.py: the LLM of a bundle the main job wrote
from its checkpoint (default: export_cost's android int4 bundle; --bundle another, such as a
host-cpu build), and onnxruntime-genai's model builder on the same
weights (int4, block 32, accuracy level 4; 8-bit nothing: its embedding shares the int4 head).
Each round runs each runtime in a fresh process of its own, one after the other, so that its
resident set is its own and host noise hits both alike: load, one warm prompt + decode, then the
timed one (a 64-token prompt in one call, then 128 greedy tokens), 2 threads each. Reported: the
median over the rounds of prefill and decode tok/s, the resident and proportional sets after load
and after the runs (anonymous and file-backed, and what grew per mapping), the peak, and for
ExecuTorch each method's memory plan and what the runtime allocates for them. Then (unless
--no-accuracy) each runtime's logits against the fp32 reference (transformers on WORK/hf): after
the prompt and after each of 16 reference tokens fed in turn, by the LLM gate's cosine and mean
KL, so a speed is read beside whether that artifact would pass the gate. --rounds 0: that alone.

    .venv/bin/python benchmarks/export_cost.py --work /tmp/q06 ... --only ours   # writes /tmp/q06/bundle
    .venv/bin/python benchmarks/decode_cost.py --work /tmp/q06 --bundle /tmp/q06/bundle-host --out docs/quantization/decode-cost-host
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402

from omni_export.phases import _status as _read  # noqa: E402  # one /proc/self/status field, in bytes

PROMPT, NEW, ROUNDS, THREADS = 64, 128, 3, 2
FORCED = 16  # reference tokens fed after the prompt for the accuracy rows
RUNTIMES = ("omni-export executorch", "onnxruntime-genai builder")


def _status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and VmHWM of this process, and its proportional set (Pss: a file
    page mapped three times counts once, as the kernel holds it), in bytes."""
    out = {k: _read(k) or 0 for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}
    with open("/proc/self/smaps_rollup") as f:
        out.update({line.split()[0][:-1]: int(line.split()[1]) * 1024 for line in f if line.startswith(("Pss:", "Pss_Anon:", "Pss_File:"))})
    return out


def _by_mapping() -> dict[str, int]:
    """Resident bytes per mapped file (anonymous memory under "[anon]"), from /proc/self/smaps."""
    out: dict[str, int] = {}
    name = "[anon]"
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                name = head[5] if len(head) > 5 and head[5].startswith("/") else "[anon]"
            elif head and head[0] == "Rss:":
                out[name] = out.get(name, 0) + int(head[1]) * 1024
    return out


def _grown(before: dict[str, int], after: dict[str, int], top: int = 6) -> dict[str, float]:
    """What grew between two _by_mapping() readings, largest first, in MB."""
    d = {k: v - before.get(k, 0) for k, v in after.items()}
    return {Path(k).name if k.startswith("/") else k: round(v / 1e6, 1) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top] if v > 1e6}


def _prompt(tokenizer_dir: Path) -> list[int]:
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).encode(topics["if"], add_special_tokens=False).ids
    assert len(ids) >= PROMPT, len(ids)
    return ids[:PROMPT]


def _open_llm(path: Path, m=None):  # type: ignore[no-untyped-def]
    """(the LLM's manifest entry, its session) of a bundle (``m``: its manifest, when read
    already), with the bundle profile's runtime settings at THREADS threads."""
    from omni_export.bundle import read_manifest
    from omni_export.bundle.manifest import RuntimeSettings
    from omni_export.runtime_py.backends import open_session

    m = m or read_manifest(path)
    entry, rt = m.components["llm"], m.profile.runtime
    return entry, open_session(entry, path, RuntimeSettings(THREADS, rt.compute_units, rt.providers, dict(rt.options)))


def child(kind: str, path: Path, prompt: list[int]) -> dict:
    """One runtime in this process: load, warm, timed. Returns speeds, tokens and memory."""
    if kind == RUNTIMES[0]:
        import torch

        from llm_decode import prefill_then_decode
        from omni_export.bundle import read_manifest
        from omni_export.runtime_py.backends import SESSIONS

        m = read_manifest(path)
        SESSIONS.get(m.components["llm"].backend).unavailable()  # the runtime's libraries load before the baseline
        base, maps = _status(), _by_mapping()
        entry, sess = _open_llm(path, m)  # loads every method
        loaded, grown = _status(), _grown(maps, _by_mapping())
        ids = torch.tensor([prompt])
        prefill_then_decode(sess, sess.run("embed", [ids])[0], NEW, entry.kv_cache.max_len)
        pre, dec, tokens = prefill_then_decode(sess, sess.run("embed", [ids])[0], NEW, entry.kv_cache.max_len)
        extra = {"plans_mb": {k: round(v / 1e6, 1) for k, v in (sess.planned_bytes_by_method() or {}).items() if v},
                 "plan_allocated_mb": round((sess.planned_bytes() or 0) / 1e6, 1),
                 "files_mb": round(sum(m.files[f].bytes for f in entry.files) / 1e6, 1),
                 "kv_cache": {"dtype": entry.kv_cache.dtype, "max_len": entry.kv_cache.max_len} if entry.kv_cache else None}  # fmt: skip
    else:
        import onnxruntime_genai as og  # its libraries load before the baseline

        from peers import _OG_MODELS, ort_genai_speed

        base, maps = _status(), _by_mapping()
        _OG_MODELS[path] = og.Model(str(path))
        loaded, grown = _status(), _grown(maps, _by_mapping())
        ort_genai_speed(path, prompt, NEW)
        pre, dec, tokens = ort_genai_speed(path, prompt, NEW)
        extra = {"files_mb": round(sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".onnx", ".data")) / 1e6, 1)}
    ran = _status()
    mb = lambda b: round(b / 1e6, 1)  # noqa: E731
    return {"prefill_tok_s": pre, "decode_tok_s": dec, "tokens": tokens, "rss_runtime_mb": mb(base["VmRSS"]),
            "load_mb": mb(loaded["VmRSS"] - base["VmRSS"]), "load_anon_mb": mb(loaded["RssAnon"] - base["RssAnon"]),
            "load_file_mb": mb(loaded["RssFile"] - base["RssFile"]), "load_pss_mb": mb(loaded["Pss"] - base["Pss"]),
            "load_pss_file_mb": mb(loaded["Pss_File"] - base["Pss_File"]), "pss_mb": mb(ran["Pss"]), "after_runs_mb": mb(ran["VmRSS"] - base["VmRSS"]),
            "rss_mb": mb(ran["VmRSS"]), "peak_mb": mb(ran["VmHWM"]), "load_by_mapping_mb": grown, **extra}  # fmt: skip


def child_logits(kind: str, path: Path, prompt: list[int], forced: list[int]) -> np.ndarray:
    """[1 + len(forced), vocab] fp32: the logits after the prompt, then after each forced token
    (teacher forcing: every runtime sees the reference's continuation, so the rows compare)."""
    rows = []
    if kind == RUNTIMES[0]:
        import torch

        from omni_export.runtime_py.kv_cache import KVStack

        entry, sess = _open_llm(path)
        stack = KVStack("llm", sess, len(prompt), entry.kv_cache.max_len)
        stack.reset()
        logits = stack.feed(sess.run("embed", [torch.tensor([prompt])])[0])[0]
        rows.append(logits[0, -1].float().numpy())
        for tok in forced:
            logits = stack.feed(sess.run("embed", [torch.tensor([[tok]])])[0])[0]
            rows.append(logits[0, -1].float().numpy())
    else:
        import onnxruntime_genai as og

        model = og.Model(str(path))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + len(forced) + 1, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(prompt)
        rows.append(np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1))
        for tok in forced:
            gen.append_tokens([tok])
            rows.append(np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1))
    return np.stack(rows)


def reference_logits(hf: Path, prompt: list[int], n: int) -> tuple[np.ndarray, list[int]]:
    """The float checkpoint in fp32 (transformers): its greedy continuation of ``n`` tokens and
    the logits at the prompt's last position and after each of those tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
        forced = out[0, len(prompt):].tolist()
        logits = model(out).logits[0, len(prompt) - 1:].float().numpy()
    return logits, forced


def accuracy(work: Path, paths: dict[str, Path], prompt: list[int], n: int = FORCED) -> dict:
    """Each runtime's logits against the fp32 reference by the LLM gate's own measures (cosine
    over all rows, mean KL), beside the int4 gate's thresholds: the decode figures above are
    only comparable between artifacts that would pass the same gate."""
    import tempfile

    from omni_export.bundle import read_manifest
    from omni_export.profiles import get_profile
    from omni_export.runtime_py.parity import cosine, mean_kl

    ref, forced = reference_logits(work / "hf", prompt, n)
    profile = get_profile(read_manifest(paths[RUNTIMES[0]]).profile.name)
    th = profile.threshold("int4")
    out: dict = {"rows": len(ref), "gate": {"profile": profile.name, "class": "int4", "cosine_min": th.cosine_min, "kl_max": th.kl_max}}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, path in paths.items():
            f = Path(tmp) / "logits.npy"
            p = subprocess.run([sys.executable, __file__, "--work", str(work), "--child", kind, "--path", str(path),
                                "--logits", str(f), "--forced", ",".join(map(str, forced))], capture_output=True, text=True)  # fmt: skip
            if p.returncode:
                raise SystemExit(f"{kind} failed:\n{p.stderr[-3000:]}")
            got = np.load(f)
            cos, kl = cosine(got, ref), mean_kl(got, ref)
            out[kind] = {"cosine": round(cos, 4), "kl": round(kl, 4), "passes": bool(cos >= th.cosine_min and kl <= th.kl_max)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True, help="export_cost.py's folder (checkpoint, hf, bundle)")
    ap.add_argument("--bundle", type=Path, default=None, help="default: WORK/bundle (or its .rejected)")
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.txt")
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--child", choices=RUNTIMES, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=True,
                    help="also compare both runtimes' logits with the fp32 reference (transformers on WORK/hf)")
    ap.add_argument("--logits", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--forced", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    prompt = _prompt(a.work / "checkpoint")
    if a.child and a.logits:
        np.save(a.logits, child_logits(a.child, a.path, prompt, [int(t) for t in a.forced.split(",") if t]))
        return
    if a.child:
        print(json.dumps(child(a.child, a.path, prompt)))
        return
    from peers import ort_genai_build

    bundle = a.bundle or a.work / "bundle"
    if not (bundle / "manifest.json").is_file():
        bundle = bundle.with_name(bundle.name + ".rejected")
    peer, build_s = ort_genai_build(a.work / "hf", a.work / "ort-genai-int4", THREADS)
    paths = {RUNTIMES[0]: bundle, RUNTIMES[1]: peer}
    if a.rounds == 0:  # the accuracy rows alone
        print(json.dumps(accuracy(a.work, paths, prompt), indent=1))
        return
    runs: dict[str, list[dict]] = {k: [] for k in RUNTIMES}
    from rich.progress import Progress

    with Progress(transient=True) as prog:
        task = prog.add_task("rounds", total=a.rounds * len(RUNTIMES))
        for _ in range(a.rounds):
            for kind in RUNTIMES:
                p = subprocess.run([sys.executable, __file__, "--work", str(a.work), "--child", kind, "--path", str(paths[kind])],
                                   capture_output=True, text=True)  # fmt: skip
                if p.returncode:
                    raise SystemExit(f"{kind} failed:\n{p.stderr[-3000:]}")
                runs[kind].append(json.loads(p.stdout.strip().splitlines()[-1]))
                prog.advance(task)
    res: dict = {}
    for kind, rs in runs.items():
        med = {k: round(statistics.median(r[k] for r in rs), 1) for k in rs[0] if isinstance(rs[0][k], (int, float))}
        res[kind] = {**rs[0], **med, "prefill_range": [round(min(r["prefill_tok_s"] for r in rs), 1), round(max(r["prefill_tok_s"] for r in rs), 1)],
                     "decode_range": [round(min(r["decode_tok_s"] for r in rs), 1), round(max(r["decode_tok_s"] for r in rs), 1)]}  # fmt: skip
        res[kind].pop("tokens")
    o, p_ = res[RUNTIMES[0]], res[RUNTIMES[1]]
    res["ratio (ours / onnxruntime-genai)"] = {k: round(o[k] / p_[k], 3) for k in ("prefill_tok_s", "decode_tok_s", "load_mb", "load_pss_mb", "rss_mb",
                                                                                 "pss_mb", "peak_mb", "files_mb")}  # fmt: skip
    toks = [r["tokens"] for r in runs[RUNTIMES[0]]] + [r["tokens"] for r in runs[RUNTIMES[1]]]
    res["greedy_tokens_equal"] = f"{sum(x == y for x, y in zip(toks[0], toks[-1], strict=False))}/{NEW}"
    res["setup"] = {"prompt": PROMPT, "new_tokens": NEW, "rounds": a.rounds, "threads": THREADS, "bundle": str(bundle),
                    "builder_build_s": round(build_s, 1)}  # fmt: skip
    if a.accuracy:
        res["accuracy (vs the fp32 reference)"] = accuracy(a.work, paths, prompt)
    from rich.table import Table

    from report import publish

    t = Table(title=f"Qwen3-0.6B-shaped LLM: prompt {PROMPT} in one call, {NEW} greedy tokens, {THREADS} threads, "
                    f"median of {a.rounds} rounds, a fresh process each")  # fmt: skip
    cols = ("", "prefill tok/s", "decode tok/s", "files MB", "load RSS MB (anon / file)", "load PSS MB", "process RSS / PSS MB", "peak MB")
    for c in cols:
        t.add_column(c, justify="left" if not c else "right")
    for kind in RUNTIMES:
        r = res[kind]
        t.add_row(kind, f"{r['prefill_tok_s']}", f"{r['decode_tok_s']}", f"{r['files_mb']}",
                  f"{r['load_mb']} ({r['load_anon_mb']} / {r['load_file_mb']})", f"{r['load_pss_mb']}", f"{r['rss_mb']} / {r['pss_mb']}",
                  f"{r['peak_mb']}")  # fmt: skip
    q = res["ratio (ours / onnxruntime-genai)"]
    t.add_row("ratio (ours / peer)", f"{q['prefill_tok_s']}x", f"{q['decode_tok_s']}x", f"{q['files_mb']}x", f"{q['load_mb']}x",
              f"{q['load_pss_mb']}x", f"{q['rss_mb']}x / {q['pss_mb']}x", f"{q['peak_mb']}x")  # fmt: skip
    acc = res.get("accuracy (vs the fp32 reference)")
    if acc:
        g = acc["gate"]
        t.caption = (f"logits against the fp32 reference (prompt + {acc['rows'] - 1} of its greedy tokens, teacher-forced); "
                     f"{g['profile']}'s {g['class']} gate: cosine >= {g['cosine_min']}, KL <= {g['kl_max']}: " +
                     "; ".join(f"{k}: cosine {acc[k]['cosine']}, KL {acc[k]['kl']} ({'passes' if acc[k]['passes'] else 'fails'})" for k in RUNTIMES))  # fmt: skip
    publish(t, res, a.out)


if __name__ == "__main__":
    main()
