"""Quantization on the demo model, measured side by side in one run:

- the trained fixture's held-out perplexity at fp32 / int8 / int4-RTN / int4-AWQ / int4-GPTQ,
  with top-1 agreement and KL against the fp16 model on the same held-out windows;
- bundle and LLM artifact size, and LLM decode tokens/s through the .pte, at fp32 / int8 / int4,
  as ratios to fp32 (decode rounds interleaved across the three bundles).

The demo checkpoint's LLM is trained (api.DEMO_TRAIN_S); OMNI_BENCH_TRAIN_S trains a copy longer."""

import copy
import json
import os
import time

import numpy as np
import pytest
import torch
from llm_decode import decode_tok_s, golden_prefill

from omni_export.bundle import read_manifest
from omni_export.export.checkpoint import load_checkpoint
from omni_export.quantize.cache import quantize_checkpoint
from omni_export.quantize.engine import apply_dequantized
from omni_export.quantize.fixture import (
    SEQ,
    perplexity,
    token_stream,
    trained_checkpoint,
)
from omni_export.quantize.recipe import QuantConfig, QuantRecipe, QuantRule
from omni_export.runtime_py.backends import open_session
from omni_export.runtime_py.parity import DECISIVE_P, decisive, mean_kl, top1_agreement

VARIANTS = {
    "fp32": None,
    "int8": QuantConfig(bits=8),
    "int4-rtn": QuantConfig(bits=4, group_size=32),
    "int4-awq": QuantConfig(bits=4, group_size=32, method="awq"),
    "int4-gptq": QuantConfig(bits=4, group_size=32, method="gptq"),
}


@pytest.fixture(scope="session")
def trained_demo(demo_checkpoint):
    """The demo checkpoint's LLM is already trained (api.DEMO_TRAIN_S); OMNI_BENCH_TRAIN_S asks
    for a longer-trained copy."""
    extra = os.environ.get("OMNI_BENCH_TRAIN_S")
    return trained_checkpoint(demo_checkpoint, float(extra)) if extra else demo_checkpoint


def test_trained_fixture_perplexity(trained_demo):
    base = load_checkpoint(trained_demo, dtype=torch.float32, components=["llm"])
    heldout = token_stream(base.tokenizer, "heldout")
    windows = heldout[: 16 * (SEQ + 1)].reshape(16, SEQ + 1)
    ref16 = copy.deepcopy(base.components["llm"]).half()
    with torch.no_grad():
        ref = [ref16(ref16.embed(w[None, :-1]), torch.arange(SEQ)).float().numpy() for w in windows]
    rows = {}
    for name, cfg in VARIANTS.items():
        ck = load_checkpoint(trained_demo, dtype=torch.float32, components=["llm"])
        llm = ck.components["llm"]
        seconds = 0.0
        if cfg is not None:
            t = time.perf_counter()
            result, _ = quantize_checkpoint(ck, QuantRecipe(name, (QuantRule(r"^llm\.", cfg), QuantRule(".", None))), use_cache=False)
            seconds = time.perf_counter() - t
            apply_dequantized(llm, result, "llm.")
        with torch.no_grad():
            got = [llm(llm.embed(w[None, :-1]), torch.arange(SEQ)).numpy() for w in windows]
        a, r = np.concatenate(got).reshape(-1, got[0].shape[-1]), np.concatenate(ref).reshape(-1, ref[0].shape[-1])
        rows[name] = {"ppl": perplexity(llm, heldout), "top1_vs_fp16": top1_agreement(a, r, min_p=DECISIVE_P),
                      "top1_strict": top1_agreement(a, r, tie_nats=0.0), "decisive": int(decisive(r).sum()), "positions": len(r),
                      "kl_vs_fp16": mean_kl(a, r), "quantize_s": seconds}  # fmt: skip
    fp32 = rows["fp32"]["ppl"]
    print(f"\ntrained fixture: {trained_demo.name}; held-out perplexity (pydoc topics, every 10th topic)")
    print(f"top-1: over the {rows['fp32']['decisive']} of {rows['fp32']['positions']} positions where fp16 is decisive; strict: every position")
    print(f"{'variant':10s} {'ppl':>9s} {'delta':>8s} {'top-1':>7s} {'strict':>7s} {'KL vs fp16':>11s} {'quantize s':>11s}")
    for name, r in rows.items():
        print(f"{name:10s} {r['ppl']:9.3f} {100 * (r['ppl'] / fp32 - 1):+7.2f}% {100 * r['top1_vs_fp16']:6.1f}% {100 * r['top1_strict']:6.1f}% "
              f"{r['kl_vs_fp16']:11.5f} {r['quantize_s']:11.1f}")
    print(json.dumps(rows))
    assert rows["int8"]["ppl"] < rows["int4-rtn"]["ppl"]


def test_bundle_size_and_decode_speed_ratios(demo_bundle):
    presets = ("fp32", "int8", "int4")
    bundles = {p: demo_bundle(p) for p in presets}
    sessions, inputs = {}, {}
    for p, root in bundles.items():
        m = read_manifest(root)
        comp = m.components["llm"]
        sessions[p] = open_session(comp, root, m.profile.runtime)
        inputs[p] = golden_prefill(root, comp)
    n, rounds = 48, 3
    best = dict.fromkeys(presets, 0.0)
    for _ in range(rounds):  # interleaved, so host noise hits every precision alike
        for p in presets:
            best[p] = max(best[p], decode_tok_s(sessions[p], *inputs[p], n))
    sizes = {p: sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) for p, root in bundles.items()}
    llm = {p: (root / read_manifest(root).components["llm"].files[0]).stat().st_size for p, root in bundles.items()}
    print(f"\n{'preset':7s} {'bundle MB':>10s} {'ratio':>6s} {'llm.pte MB':>11s} {'ratio':>6s} {'decode tok/s':>13s} {'ratio':>6s}")
    for p in presets:
        print(f"{p:7s} {sizes[p] / 1e6:10.1f} {sizes[p] / sizes['fp32']:6.3f} {llm[p] / 1e6:11.1f} {llm[p] / llm['fp32']:6.3f} "
              f"{best[p]:13.1f} {best[p] / best['fp32']:6.2f}")
    print(json.dumps({"bundle_bytes": sizes, "llm_pte_bytes": llm, "decode_tok_s": best}))
    assert llm["int4"] < llm["int8"] < llm["fp32"]
