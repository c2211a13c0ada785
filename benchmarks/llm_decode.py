"""Greedy decode speed through an LLM session's own methods (embed, prefill, decode), shared by
the benchmarks that compare backends and precisions. The cache goes through KVStack, so
stateful (ExecuTorch) and explicit-cache (ONNX Runtime) sessions are driven the same way."""

import time

import torch

from omni_export.bundle.golden import read_golden
from omni_export.runtime_py.kv_cache import KVStack


def golden_prefill(bundle, comp) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    """The golden prefill's (embeds, input_pos) of the bundle's LLM component (a ComponentEntry)."""
    prefill = next(c for c in read_golden(bundle / comp.golden) if c.method == "prefill")
    return torch.from_numpy(prefill.inputs["embeds"]), torch.from_numpy(prefill.inputs["input_pos"])


def prefill_then_decode(sess, embeds: torch.Tensor, n_tokens: int, max_len: int = 4096) -> tuple[float, float, list[int]]:  # type: ignore[no-untyped-def]
    """Reset, prefill ``embeds`` [1, T, H] in one call, then ``n_tokens`` greedy steps (embed +
    decode). Returns (prefill tok/s, decode tok/s, the tokens)."""
    stack = KVStack("llm", sess, embeds.shape[1], max_len)
    stack.reset()
    t = time.perf_counter()
    logits = stack.feed(embeds)[0]
    prefill_s = time.perf_counter() - t
    tokens = []
    t = time.perf_counter()
    for _ in range(n_tokens):
        tok = int(logits[0, -1].argmax())
        tokens.append(tok)
        logits = stack.feed(sess.run("embed", [torch.tensor([[tok]])])[0])[0]
    return embeds.shape[1] / prefill_s, n_tokens / (time.perf_counter() - t), tokens


def decode_tok_s(sess, embeds: torch.Tensor, pos: torch.Tensor, n_tokens: int) -> float:  # type: ignore[no-untyped-def]
    """Reset, prefill ``embeds`` (at positions 0..T-1), then time ``n_tokens`` greedy decode steps."""
    assert int(pos[0]) == 0
    return prefill_then_decode(sess, embeds, n_tokens)[1]
