"""The speech LM in CosyVoice2's Qwen2LM names (llm_embedding, speech_embedding, llm_decoder, the
Qwen2 under llm.model.model.), the release's text embedding and head accepted and unused."""

import json
import shutil

import torch
from safetensors.torch import save_file

from omni_export.export.checkpoint import load_checkpoint
from omni_export.export.synthetic import written_layout


def _released_layer(i: int, d: int = 896, kv: int = 128, ffn: int = 4864) -> dict[str, tuple[int, ...]]:
    p = f"llm.model.model.layers.{i}."
    t = {p + "self_attn.q_proj.weight": (d, d), p + "self_attn.q_proj.bias": (d,),
         p + "self_attn.k_proj.weight": (kv, d), p + "self_attn.k_proj.bias": (kv,),
         p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.v_proj.bias": (kv,),
         p + "self_attn.o_proj.weight": (d, d),
         p + "mlp.gate_proj.weight": (ffn, d), p + "mlp.up_proj.weight": (ffn, d), p + "mlp.down_proj.weight": (d, ffn),
         p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}  # fmt: skip
    return t


def test_the_speech_lm_carries_cosyvoice2s_qwen2lm_names():
    written = written_layout("interactiveomni", "speech_lm", strip="voicelm.llm.")
    released = {"llm_embedding.weight": (2, 896), "speech_embedding.weight": (6564, 896), "llm_decoder.weight": (6564, 896),
                "llm_decoder.bias": (6564,), "llm.model.model.norm.weight": (896,)}  # fmt: skip
    for i in range(24):  # Qwen2.5-0.5B
        released.update(_released_layer(i))
    # InteractiveOmni's own: the LLM's states projected to the speech LM's width (its code is not public)
    assert {k: v for k, v in written.items() if k not in released} == {"text_projector.weight": (896, 2560), "text_projector.bias": (896,)}
    assert {k: v for k, v in written.items() if k in released} == released


def test_the_releases_text_embedding_and_head_load_as_nothing(tiny, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(tiny["interactiveomni"].root, root)
    d = tiny["interactiveomni"].config.voicelm.speech_lm.llm.hidden_size
    extra = {"voicelm.llm.llm.model.model.embed_tokens.weight": torch.zeros(100, d), "voicelm.llm.llm.model.lm_head.weight": torch.zeros(100, d)}
    save_file(extra, root / "model-extra.safetensors")
    index = json.loads((root / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(extra, "model-extra.safetensors"))
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = load_checkpoint(root)
    got = ckpt.components["speech_lm"].state_dict()
    want = tiny["interactiveomni"].components["speech_lm"].state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
