"""Loading checkpoints back, and every way a checkpoint can be broken failing with a message that
names the problem."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from omni_export.errors import CheckpointError, ConfigError, UnknownModelTypeError
from omni_export.export.checkpoint import load_checkpoint


def _shard(root):
    index = json.loads((root / "model.safetensors.index.json").read_text())
    name = sorted(set(index["weight_map"].values()))[0]
    return root / name, index


def test_both_families_load_every_component(tiny):
    assert list(tiny["interactiveomni"].components) == ["audio_frontend", "vision_encoder", "audio_encoder", "llm", "speech_lm", "flow", "vocoder"]
    assert list(tiny["vita15"].components) == ["audio_frontend", "vision_encoder", "audio_encoder", "llm", "tts_nar", "tts_ar", "codec_decoder"]
    for ckpt in tiny.values():
        for module in ckpt.components.values():
            assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in module.parameters())
    assert not list(tiny["vita15"].components["audio_frontend"].parameters())  # weightless


def test_loaded_weights_equal_the_files(tiny_dirs, tiny):
    root = tiny_dirs["interactiveomni"]
    shard, index = _shard(root)
    stored = load_file(shard)
    llm = tiny["interactiveomni"].components["llm"].state_dict()
    checked = 0
    for name, tensor in stored.items():
        if name.startswith("language_model."):
            assert torch.equal(llm[name[len("language_model."):]], tensor.float())
            checked += 1
    vision = tiny["interactiveomni"].components["vision_encoder"].state_dict()
    for name, tensor in stored.items():
        if name.startswith("vision_model."):
            assert torch.equal(vision["encoder." + name[len("vision_model."):]], tensor.float())
            checked += 1
    assert checked > 0


def test_keeps_stored_dtype_without_copying(tiny_dirs):
    ckpt = load_checkpoint(tiny_dirs["interactiveomni"], components=["llm"])
    assert list(ckpt.components) == ["llm"]
    assert ckpt.components["llm"].model.embed_tokens.weight.dtype == torch.bfloat16


def test_truncated_shard(copy):
    root = copy("interactiveomni")
    shard, _ = _shard(root)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        load_checkpoint(root)


def test_renamed_tensor_is_missing_and_unexpected(copy):
    root = copy("interactiveomni")
    shard, index = _shard(root)
    tensors = load_file(shard)
    old = next(k for k in tensors if k.startswith("language_model.model.layers.0.self_attn.q_proj"))
    tensors[old.replace("q_proj", "q_projection")] = tensors.pop(old)
    save_file(tensors, shard)
    index["weight_map"][old.replace("q_proj", "q_projection")] = index["weight_map"].pop(old)
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(root)
    assert f"missing tensor {old!r}" in str(exc.value)
    assert old.replace("q_proj", "q_projection") in str(exc.value) and "unexpected" in str(exc.value)


@pytest.mark.parametrize("change,match", [("shape", "has shape"), ("dtype", "has dtype")])
def test_wrong_shape_or_dtype_names_the_tensor(copy, change, match):
    root = copy("vita15")
    tensors = load_file(root / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    t = tensors[key]
    tensors[key] = t[:, :-1].contiguous() if change == "shape" else t.to(torch.int32)
    save_file(tensors, root / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{key}.*{match}|{match}.*{key}|'{key}' {match}"):
        load_checkpoint(root)


def test_index_listing_a_tensor_the_shard_lacks(copy):
    root = copy("interactiveomni")
    shard, index = _shard(root)
    index["weight_map"]["language_model.ghost.weight"] = shard.name
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="ghost"):
        load_checkpoint(root)


def test_missing_shard_file(copy):
    root = copy("interactiveomni")
    shard, _ = _shard(root)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name} is missing"):
        load_checkpoint(root)


def test_unknown_model_type_lists_supported(copy):
    root = copy("vita15")
    cfg = json.loads((root / "config.json").read_text())
    cfg["model_type"] = "llava"
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnknownModelTypeError, match="'llava'.*interactiveomni.*vita-Qwen2|'llava'.*vita-Qwen2"):
        load_checkpoint(root)


def test_unknown_key_in_our_config_is_rejected(copy):
    root = copy("interactiveomni")
    cfg = json.loads((root / "config.json").read_text())
    cfg["voicelm_config"]["flow"]["n_timestep"] = 5  # typo of n_timesteps
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="n_timestep"):
        load_checkpoint(root)


def test_corrupt_config_json(copy):
    root = copy("interactiveomni")
    (root / "config.json").write_text('{"model_type": "interactiveomni", ')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(root)


class Payload:
    """Anything that is not a plain tensor dict; unpickling it would run code in an unrestricted loader."""


def test_pt_file_needing_unpickling_is_refused(copy):
    root = copy("vita15")
    path = root / "vita_tts_ckpt/codec/final.pt"
    state = torch.load(path, weights_only=True)
    state["payload"] = Payload()
    path.write_bytes(pickle.dumps(state))
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(root)


def test_missing_tokenizer(copy):
    root = copy("vita15")
    (root / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        load_checkpoint(root)


def test_tokenizer_lacking_a_family_special_token(copy):
    root = copy("interactiveomni")
    tok = json.loads((root / "tokenizer.json").read_text())
    for added in tok["added_tokens"]:
        if added["content"] == "<IMG_CONTEXT>":
            added["content"] = "<IMG_CTX>"
    (root / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(CheckpointError, match="<IMG_CONTEXT>"):
        load_checkpoint(root)
