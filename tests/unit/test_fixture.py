"""The trained fixture: a short training run makes held-out perplexity meaningful, and
quantization damage shows in it (int8 barely, int4 round-to-nearest clearly)."""

import pytest
import torch

from omni_export.export.checkpoint import load_checkpoint
from omni_export.quantize.cache import quantize_checkpoint
from omni_export.quantize.engine import apply_dequantized
from omni_export.quantize.fixture import perplexity, token_stream, trained_checkpoint
from omni_export.quantize.recipe import QuantConfig, QuantRecipe, QuantRule


@pytest.fixture(scope="module")
def trained(tiny_dirs):
    return trained_checkpoint(tiny_dirs["interactiveomni"], seconds=15)


def _llm(path, recipe=None):
    ck = load_checkpoint(path, dtype=torch.float32, components=["llm"])
    llm = ck.components["llm"]
    if recipe is not None:
        result, _ = quantize_checkpoint(ck, recipe)
        apply_dequantized(llm, result, "llm.")
    return llm, token_stream(ck.tokenizer, "heldout")


def _ppl(path, recipe=None):
    llm, tokens = _llm(path, recipe)
    return perplexity(llm, tokens, max_tokens=4096)


def _kl(path, recipe):
    """Mean KL(fp32 || quantized) of next-token distributions over held-out windows."""
    from omni_export.runtime_py.parity import mean_kl

    (ref, tokens), (q, _) = _llm(path), _llm(path, recipe)
    windows = tokens[: 8 * 128].reshape(8, 128)
    with torch.no_grad():
        a = torch.cat([q(q.embed(w[None]), torch.arange(128))[0] for w in windows])
        b = torch.cat([ref(ref.embed(w[None]), torch.arange(128))[0] for w in windows])
    return mean_kl(a.numpy(), b.numpy())


def test_training_learns_the_heldout_text(tiny_dirs, trained):
    untrained, fp32 = _ppl(tiny_dirs["interactiveomni"]), _ppl(trained)
    assert fp32 < 0.2 * untrained, (fp32, untrained)
    assert trained_checkpoint(tiny_dirs["interactiveomni"], seconds=15) == trained  # cached, not retrained


def test_quantization_damage_shows(trained):
    """int8 leaves perplexity where it was; int4 moves the distributions further than int8 does.
    (On a model trained for seconds, int4's perplexity change is within the noise of the
    training run itself, so the damage is measured as KL against the float model.)"""
    only_llm = lambda cfg: QuantRecipe("x", (QuantRule(r"^llm\.", cfg), QuantRule(".", None)))  # noqa: E731
    int8_r, int4_r = only_llm(QuantConfig(bits=8)), only_llm(QuantConfig(bits=4, group_size=32))
    fp32, int8 = _ppl(trained), _ppl(trained, int8_r)
    assert abs(int8 / fp32 - 1) < 0.03, (int8, fp32)
    kl8, kl4 = _kl(trained, int8_r), _kl(trained, int4_r)
    assert kl4 > 10 * kl8 > 0, (kl4, kl8)
