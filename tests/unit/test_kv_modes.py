"""The KV cache as a swappable part: every mode gives the reference's logits, the swap is undone
after export, and the one helper finds exactly the cached stacks."""

import pytest
import torch

from omni_export.export.components.kv import (
    KV_MODES,
    BufferCache,
    IOCache,
    MaskedAttention,
    SliceCache,
    kv_layers,
    kv_stacks,
    use_kv,
)
from omni_export.export.golden import eager_io_session, eager_methods
from omni_export.export.trace_specs import Limits

LIMITS = Limits(max_context=64)


def _steps(run, embeds):
    """prefill 7 tokens, then 3 decodes at the following positions: the logits of each call's
    last position (all a prefill returns)."""
    outs = [run("prefill", [embeds[:, :7], torch.arange(7)])[0]]
    for i in range(7, 10):
        outs.append(run("decode", [embeds[:, i : i + 1], torch.tensor([i])])[0])
    return torch.cat(outs, 1)


@pytest.fixture(scope="module")
def llm(tiny):
    return tiny["interactiveomni"].components["llm"]


def test_every_mode_gives_the_reference_logits(llm):
    embeds = torch.randn(1, 10, llm.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    ref, _ = eager_methods(llm, LIMITS)
    ref.reset()
    expected = _steps(ref.run, embeds)
    # State mode (Core ML): slice updates into the same buffers.
    with torch.no_grad(), use_kv(llm, "state"):
        assert all(isinstance(a.kv, SliceCache) for a in kv_layers(llm))
        state_out = _steps(lambda method, x: [llm.logits(llm.model(*x))[:, -1:]], embeds)
    assert expected.shape[1] == 4
    torch.testing.assert_close(state_out, expected, atol=1e-5, rtol=1e-5)
    # io mode (TensorRT) and its fused form (ONNX Runtime's GroupQueryAttention op, here its
    # eager body): the cache goes in and out as tensors.
    import omni_export.targets  # noqa: F401  (registers the onnxruntime mode)

    for mode in ("io", "onnxruntime"):
        io = eager_io_session(llm, LIMITS, mode)
        cache = io.new_cache()
        assert all(c.shape[2] == (0 if mode == "io" else LIMITS.max_context) and not c.any() for c in cache)

        def run(method, inputs):
            nonlocal cache
            out, cache = io.run_cached(method, inputs, cache)
            return out

        torch.testing.assert_close(_steps(run, embeds), expected, atol=1e-5, rtol=1e-5)
        # io grows by each call's positions; static-io keeps max_context and is written in place
        assert all(c.shape[2] == (10 if mode == "io" else LIMITS.max_context) for c in cache)
        assert len(cache) == 2 * llm.cfg.num_hidden_layers


def test_the_swap_is_undone_and_the_model_has_no_backend_flag(llm):
    eager_methods(llm, LIMITS)
    with use_kv(llm, "io") as slots:
        assert all(isinstance(a.kv, IOCache) and a.kv.slots is slots for a in kv_layers(llm))
    assert all(isinstance(a.kv, BufferCache) and type(a.attend) is MaskedAttention for a in kv_layers(llm))
    assert not any("kv_impl" in vars(m) for m in llm.modules())
    import omni_export.targets  # noqa: F401  (targets register their own modes)

    assert set(KV_MODES) >= {"reference", "state", "io", "executorch", "onnxruntime"}


def test_kv_stacks_finds_the_cached_stacks_only(tiny):
    vita = tiny["vita15"].components
    # VITA's NAR stack attends bidirectionally and never caches; the AR stack does.
    assert kv_stacks(vita["tts_nar"], allocated=False) == []
    assert len(kv_stacks(vita["tts_ar"], allocated=False)) == 1
    assert kv_stacks(tiny["interactiveomni"].components["vision_encoder"], allocated=False) == []


def test_prefill_returns_the_last_position_s_logits_and_every_position_s_hidden_state(llm):
    """What a sampler reads and what the speech decoder reads, nothing more: the exported step's
    logits are the full forward's last row."""
    from omni_export.export.trace_specs import method_specs

    spec = next(s for s in method_specs(llm, LIMITS) if s.name == "prefill")
    assert [t.shape for t in spec.outputs] == [(1, 1, llm.cfg.vocab_size), (1, "tokens", llm.cfg.hidden_size)]
    embeds = torch.randn(1, 7, llm.cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    ref, _ = eager_methods(llm, LIMITS)
    ref.reset()
    logits, hidden = ref.run("prefill", [embeds, torch.arange(7)])
    assert logits.shape == (1, 1, llm.cfg.vocab_size) and hidden.shape == (1, 7, llm.cfg.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(logits, llm.logits(hidden)[:, -1:], atol=1e-5, rtol=1e-5)


def test_executorch_traces_prefill_and_decode_as_one_program_that_decodes_at_one_token(llm):
    """ExecuTorch lowers one ``step`` program for both cached methods (lowering once, not per
    method). Traced from 8 tokens with a lower bound torch raises to 2, the very graph must still
    decode at 1 token: prefill 7, then 3 single-token calls, equal to the eager reference."""
    from omni_export.export.trace import trace_component
    from omni_export.targets.executorch import ET_KV

    embeds = torch.randn(1, 10, llm.cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    ref, _ = eager_methods(llm, LIMITS)
    ref.reset()
    expected = _steps(ref.run, embeds)
    traced = trace_component("llm", llm, LIMITS, ET_KV.name)
    assert set(traced.programs) == {"embed", "reset_cache", "step"}
    assert traced.aliases["prefill"] == traced.aliases["decode"] == "step" and set(traced.specs) >= {"prefill", "decode"}
    step = traced.programs["step"].module()
    caches = [b for n, b in step.named_buffers() if n.endswith("_cache")]
    assert len(caches) == 2 * llm.cfg.num_hidden_layers
    for cache in caches:  # as the runtime's reset_cache does before the first turn
        cache.zero_()
    with torch.no_grad():
        got = _steps(lambda method, x: step(*x), embeds)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
