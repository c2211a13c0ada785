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


def _ppl(path, recipe=None):
    ck = load_checkpoint(path, dtype=torch.float32, components=["llm"])
    llm = ck.components["llm"]
    if recipe is not None:
        result, _ = quantize_checkpoint(ck, recipe)
        apply_dequantized(llm, result, "llm.")
    return perplexity(llm, token_stream(ck.tokenizer, "heldout"), max_tokens=4096)


def test_training_learns_the_heldout_text(tiny_dirs, trained):
    untrained, fp32 = _ppl(tiny_dirs["interactiveomni"]), _ppl(trained)
    assert fp32 < 0.2 * untrained, (fp32, untrained)
    assert trained_checkpoint(tiny_dirs["interactiveomni"], seconds=15) == trained  # cached, not retrained


def test_quantization_damage_shows_in_perplexity(trained):
    fp32 = _ppl(trained)
    only_llm = lambda cfg: QuantRecipe("x", (QuantRule(r"^llm\.", cfg), QuantRule(".", None)))  # noqa: E731
    int8 = _ppl(trained, only_llm(QuantConfig(bits=8)))
    int4 = _ppl(trained, only_llm(QuantConfig(bits=4, group_size=32)))
    assert abs(int8 / fp32 - 1) < 0.03, (int8, fp32)
    assert int4 > int8 and int4 > fp32, (int4, int8, fp32)
