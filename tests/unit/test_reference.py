"""The eager reference, driven through the same Pipeline a bundle uses."""

import numpy as np
import pytest
import torch

from omni_export.api import eager_pipeline
from omni_export.errors import ContextOverflowError, InputError


@pytest.fixture(scope="module")
def pipelines(tiny):
    return {f: eager_pipeline(ck, max_context=256) for f, ck in tiny.items()}


def test_text_only_turn_is_deterministic(pipelines):
    a = pipelines["vita15"].respond(text="Say hello.", max_new_tokens=5, speech=False)
    b = pipelines["vita15"].respond(text="Say hello.", max_new_tokens=5, speech=False)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 5 and a.audio.size == 0


def test_cached_decode_equals_full_recompute(tiny, pipelines):
    """Greedy tokens from the cached decode loop equal argmax of a cache-free forward over the
    whole sequence: the KV cache changes nothing but speed."""
    reply = pipelines["interactiveomni"].respond(text="Name three colours.", max_new_tokens=6, speech=False)
    p = pipelines["interactiveomni"]
    prompt = p.tokenizer.encode(
        __import__("omni_export.runtime_py.prompt", fromlist=["chat_prompt"]).chat_prompt("Name three colours."),
        add_special_tokens=False,
    ).ids
    llm = tiny["interactiveomni"].components["llm"]
    ids = torch.tensor([prompt + reply.token_ids])
    saved = llm.model.cache_len
    llm.model.cache_len = 0  # no cache: plain causal attention over the sequence
    try:
        with torch.no_grad():
            logits = llm(llm.embed(ids), torch.arange(ids.shape[1]))
    finally:
        llm.model.cache_len = saved
    n = len(prompt)
    assert logits[0, n - 1 : -1].argmax(-1).tolist() == reply.token_ids


def test_prompt_longer_than_a_prefill_chunk(tiny):
    """Prefill runs in chunks of the traced size; a long prompt crosses several."""
    p = eager_pipeline(tiny["vita15"], max_context=512)
    reply = p.respond(audio=np.zeros(16000 * 20, dtype=np.float32) + 0.01, max_new_tokens=3, speech=False)
    assert reply.prompt_tokens > p.config["prefill_chunk"] and len(reply.token_ids) == 3


def test_audio_rates(pipelines):
    wav = np.random.default_rng(0).standard_normal(16000 * 2).astype(np.float32) * 0.1  # 2 s
    io, vita = pipelines["interactiveomni"], pipelines["vita15"]
    assert io.encode_audio(wav).shape == (50, io.config["llm"]["hidden_size"])  # 25 Hz
    assert abs(vita.encode_audio(wav).shape[0] - 25) <= 1  # 12.5 Hz


def test_nothing_to_answer(pipelines):
    with pytest.raises(InputError, match="nothing to answer"):
        pipelines["vita15"].respond()


def test_context_overflow_is_a_clear_error(tiny):
    p = eager_pipeline(tiny["vita15"], max_context=64)
    with pytest.raises(ContextOverflowError, match="more than the KV cache.s 64"):
        p.respond(audio=np.zeros(16000 * 3, dtype=np.float32) + 0.01, max_new_tokens=8)


def test_cache_refuses_positions_past_its_end(tiny):
    llm = tiny["vita15"].components["llm"]
    llm.model.setup_cache(8)
    with pytest.raises(ContextOverflowError, match="KV cache of 8 tokens"):
        llm(llm.embed(torch.tensor([[1, 2]])), torch.tensor([7, 8]))
