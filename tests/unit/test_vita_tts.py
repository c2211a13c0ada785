"""VITA-1.5's TTS decoder: the released tensor names and shapes, model.json as released, and the
prefix [bos, NAR output] attending both ways through the cached AR stack."""

import shutil

import pytest
import torch

from omni_export.errors import ConfigError
from omni_export.export.checkpoint import load_checkpoint
from omni_export.export.components.vita_tts import VitaTTSAr, VitaTTSConfig
from omni_export.runtime_py.sampler import repetition_penalty
from omni_export.export.families import FAMILIES
from omni_export.export.synthetic import _plan


def _released_tts_names() -> dict[str, tuple[int, ...]]:
    """VITA-1.5's vita_tts_ckpt/decoder/final.pt without its unused layers_prefix (decoder.py's
    LLM2TTSCodecAR with model.json's 896 width, 14 heads, 4864 units, 4 blocks, 1024 codes;
    transformers' LlamaDecoderLayer names, no bias), written out from the release."""
    d, ffn, v = 896, 4864, 1024 + 4
    t: dict[str, tuple[int, ...]] = {"embedding.weight": (v, d), "norm.weight": (d,), "out_fnn.weight": (v, d), "out_fnn.bias": (v,)}

    def layer(p):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[f"{p}.self_attn.{proj}.weight"] = (d, d)
        t[f"{p}.mlp.gate_proj.weight"] = t[f"{p}.mlp.up_proj.weight"] = (ffn, d)
        t[f"{p}.mlp.down_proj.weight"] = (d, ffn)
        t[f"{p}.input_layernorm.weight"] = t[f"{p}.post_attention_layernorm.weight"] = (d,)

    for i in range(4):
        layer(f"layers.{i}")
    for i in range(2):
        layer(f"layers_pre_nn.{i}")
    return t


def test_synthetic_writer_and_loader_use_the_released_tts_names():
    family = FAMILIES.get("vita15")
    specs = [s for s in family.specs(family.preset("full")) if s.name in ("tts_nar", "tts_ar")]
    written = {p.name: tuple(p.shape) for s in specs for p in _plan(s, torch.float32)}
    released = _released_tts_names()
    assert sorted(set(written) ^ set(released)) == []
    assert written == released


def test_the_released_file_loads_with_its_prefix_layers_and_model_wrapper(tiny_dirs, tmp_path):
    """The release's final.pt may wrap the state dict as {"model": ...} and holds layers_prefix
    (kv_cache_prefix_finetune): both load, and the prefix layers are not read."""
    root = tmp_path / "v"
    shutil.copytree(tiny_dirs["vita15"], root)
    pt = root / "vita_tts_ckpt" / "decoder" / "final.pt"
    state = torch.load(pt, weights_only=True)
    want = {k: v.clone() for k, v in load_checkpoint(root, components={"tts_ar"}).components["tts_ar"].state_dict().items()}
    extra = {f"layers_prefix.0.{k.removeprefix('layers.0.')}": v for k, v in state.items() if k.startswith("layers.0.")}
    torch.save({"model": {**state, **extra}}, pt)
    got = load_checkpoint(root, components={"tts_ar", "tts_nar"}).components["tts_ar"].state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_model_json_is_read_as_released():
    cfg = VitaTTSConfig.from_released([896, 1024, {"transformer_attention_dim": 896, "transformer_attention_heads": 14,
                                                   "transformer_linear_units": 4864, "transformer_num_blocks": 4,
                                                   "kv_cache_prefix_finetune": 1, "encoder_criterion": "ce",
                                                   "transformer_dropout_rate": 0.1}], "model.json")  # fmt: skip
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_blocks, cfg.codebook_size) == (896, 14, 4, 1024)
    assert (cfg.bos, cfg.sos, cfg.eos, cfg.pad, cfg.vocab) == (1024, 1025, 1026, 1027, 1028)
    assert cfg.frames_per_token(3584) == 4
    with pytest.raises(ConfigError, match="idim 512 must equal"):
        VitaTTSConfig.from_released([512, 1024, {"transformer_attention_dim": 896}], "model.json")
    with pytest.raises(ConfigError, match="do not split into frames"):
        cfg.frames_per_token(1000)


def test_the_prefix_attends_both_ways_and_later_steps_see_all_of_it():
    """The release runs [bos, NAR output] through its layers with no mask, then one token at a
    time through the cache: the cached stack's prefill equals the stack run unmasked over the
    prefix, and a step after it equals the stack over prefix + step with the step seeing all."""
    torch.manual_seed(0)
    cfg = VitaTTSConfig(hidden_size=32, num_heads=2, intermediate_size=64, num_blocks=2)
    m = VitaTTSAr(cfg).eval()
    m.ar.setup_cache(64)
    x = torch.randn(1, 7, 32)
    step = torch.randn(1, 1, 32)
    with torch.no_grad():
        cached = m.ar(x, torch.arange(7))
        after = m.ar(step, torch.tensor([7]))
        m.ar.cache_len = 0  # the same weights, uncached: masks given outright
        full = m.ar(x, torch.arange(7), attn_mask=torch.ones(7, 7, dtype=torch.bool))
        causal = m.ar(x, torch.arange(7), attn_mask=torch.ones(7, 7, dtype=torch.bool).tril())
        both = torch.cat([x, step], 1)
        mask = torch.ones(8, 8, dtype=torch.bool)
        mask[:7, 7] = False  # the prefix never sees the step
        whole = m.ar(both, torch.arange(8), attn_mask=mask)
    assert torch.allclose(cached, full, atol=1e-5) and not torch.allclose(cached, causal, atol=1e-3)
    assert torch.allclose(after, whole[:, 7:], atol=1e-5)


def test_repetition_penalty_is_the_releases():
    """decoder.py's infer: every distinct id of the last window (sos included) has its logit
    divided by the penalty, negative logits too; the window's default (-1) is off."""
    logits = torch.tensor([2.0, -1.0, 0.5, 4.0, 1.0])
    history = [4, 0, 1, 0, 3]
    got = repetition_penalty(logits, history, 3, 1.25)
    assert torch.equal(got, torch.tensor([2.0 / 1.25, -1.0 / 1.25, 0.5, 4.0 / 1.25, 1.0]))  # the window: 1, 0, 3
    assert torch.equal(repetition_penalty(logits, history, 4, 2.0), torch.tensor([1.0, -0.5, 0.5, 2.0, 1.0]))
    assert torch.equal(repetition_penalty(logits, history, -1, 2.0), logits)
    cfg = VitaTTSConfig.from_released(VitaTTSConfig(penalty_window=20).to_released(), "model.json")
    assert (cfg.penalty_window, cfg.penalty) == (20, 1.1) and VitaTTSConfig().penalty_window == -1
