"""Greedy decode speed through an LLM session's own methods (embed, prefill, decode), shared by
the benchmarks that compare backends and precisions."""

import time

import torch

from omni_export.bundle.golden import read_golden


def golden_prefill(bundle, comp: dict) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    """The golden prefill's (embeds, input_pos) of the bundle's LLM component."""
    prefill = next(c for c in read_golden(bundle / comp["golden"]) if c.method == "prefill")
    return torch.from_numpy(prefill.inputs["embeds"]), torch.from_numpy(prefill.inputs["input_pos"])


def decode_tok_s(sess, embeds: torch.Tensor, pos: torch.Tensor, n_tokens: int) -> float:  # type: ignore[no-untyped-def]
    """Reset, prefill ``embeds``, then time ``n_tokens`` greedy decode steps (embed + decode)."""
    sess.reset()
    logits = sess.run("prefill", [embeds, pos])[0]
    start = int(pos[-1]) + 1
    t = time.perf_counter()
    for i in range(n_tokens):
        tok = int(logits[0, -1].argmax())
        logits = sess.run("decode", [sess.run("embed", [torch.tensor([[tok]])])[0], torch.tensor([start + i])])[0]
    return n_tokens / (time.perf_counter() - t)
