import numpy as np
import pytest
import torch

from omni_export.errors import ContextOverflowError, InputError
from omni_export.export.reference import respond


def test_text_only_turn_is_deterministic(tiny):
    a = respond(tiny["vita15"], text="Say hello.", max_new_tokens=5, speech=False)
    b = respond(tiny["vita15"], text="Say hello.", max_new_tokens=5, speech=False)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 5 and a.audio.size == 0


def test_reference_decode_equals_full_recompute(tiny):
    """Greedy tokens from the cached decode loop equal argmax of a cache-free forward over the
    whole sequence: the KV cache changes nothing but speed."""
    ckpt = tiny["interactiveomni"]
    reply = respond(ckpt, text="Name three colours.", max_new_tokens=6, speech=False)
    prompt = ckpt.family.prompt(ckpt, 0, 0, "Name three colours.")
    llm = ckpt.components["llm"]
    ids = torch.tensor([prompt + reply.token_ids])
    llm.model.cache_len = 0  # no cache: plain causal attention over the sequence
    with torch.no_grad():
        logits = llm(llm.embed(ids), torch.arange(ids.shape[1]))
    n = len(prompt)
    assert logits[0, n - 1 : -1].argmax(-1).tolist() == reply.token_ids


def test_nothing_to_answer(tiny):
    with pytest.raises(InputError, match="nothing to answer"):
        respond(tiny["vita15"])


def test_context_overflow_is_a_clear_error(tiny):
    with pytest.raises(ContextOverflowError, match="exceeds the context of 64"):
        respond(tiny["vita15"], audio=np.zeros(16000 * 3, dtype=np.float32) + 0.01, max_new_tokens=8, max_context=64)


def test_cache_refuses_positions_past_its_end(tiny):
    llm = tiny["vita15"].components["llm"]
    llm.model.setup_cache(8)
    with pytest.raises(ContextOverflowError, match="KV cache of 8 tokens"):
        llm(llm.embed(torch.tensor([[1, 2]])), torch.tensor([7, 8]))
