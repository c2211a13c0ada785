import json

import pytest
import torch
from safetensors import safe_open

from omni_export.errors import OmniExportError
from omni_export.export.synthetic import write_synthetic


def test_interactiveomni_layout(tiny_dirs):
    root = tiny_dirs["interactiveomni"]
    names = {p.name for p in root.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
            "merges.txt", "model.safetensors.index.json"} <= names
    cfg = json.loads((root / "config.json").read_text())
    assert cfg["model_type"] == "interactiveomni"
    assert cfg["llm_config"]["model_type"] == "qwen3" and cfg["audio_config"]["model_type"] == "whisper"
    index = json.loads((root / "model.safetensors.index.json").read_text())
    prefixes = {k.split(".")[0] for k in index["weight_map"]}
    assert prefixes == {"vision_model", "mlp1", "audio_model", "audio_projector", "language_model", "voicelm"}
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((root / s).is_file() for s in shards)
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no partial dirs left


def test_vita_layout(tiny_dirs):
    root = tiny_dirs["vita15"]
    cfg = json.loads((root / "config.json").read_text())
    assert cfg["model_type"] == "vita-Qwen2" and cfg["mm_projector_type"] == "mlp2x_gelu"
    for sub in ("decoder", "codec"):
        assert (root / "vita_tts_ckpt" / sub / "final.pt").is_file()
        assert (root / "vita_tts_ckpt" / sub / "model.json").is_file()
    with safe_open(str(root / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("model.vision_tower.vision_tower.") for k in keys)
    assert any(k.startswith("model.audio_encoder.adpter.") for k in keys)
    assert "lm_head.weight" in keys


def test_seed_determines_weights(tmp_path):
    a = write_synthetic("vita15", "tiny", tmp_path / "a", seed=7)
    b = write_synthetic("vita15", "tiny", tmp_path / "b", seed=7)
    c = write_synthetic("vita15", "tiny", tmp_path / "c", seed=8)
    read = lambda p: safe_open(str(p / "model.safetensors"), "pt").get_tensor("model.layers.0.mlp.up_proj.weight")  # noqa: E731
    assert torch.equal(read(a), read(b)) and not torch.equal(read(a), read(c))


def test_refuses_to_overwrite(tiny_dirs):
    with pytest.raises(OmniExportError, match="already exists"):
        write_synthetic("vita15", "tiny", tiny_dirs["vita15"])


def test_unknown_size_and_family(tmp_path):
    with pytest.raises(OmniExportError, match="sizes"):
        write_synthetic("vita15", "huge", tmp_path / "x")
    with pytest.raises(OmniExportError, match="unknown model family 'gpt'.*interactiveomni"):
        write_synthetic("gpt", "tiny", tmp_path / "y")


def test_tokenizer_is_real_bpe_and_loads_in_transformers(tiny_dirs, tiny):
    from transformers import AutoTokenizer

    root = tiny_dirs["interactiveomni"]
    tok = tiny["interactiveomni"].tokenizer
    text = "Return the sum of a list of numbers."
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) < len(text) / 2  # merges learned, not byte-level fallback
    assert tok.decode(ids) == text
    hf = AutoTokenizer.from_pretrained(str(root))
    assert hf(text, add_special_tokens=False)["input_ids"] == ids
    prompt = "<img><IMG_CONTEXT><IMG_CONTEXT></img>"
    assert tok.encode(prompt, add_special_tokens=False).ids == [tiny["interactiveomni"].special_ids[t] for t in
                                                                ("<img>", "<IMG_CONTEXT>", "<IMG_CONTEXT>", "</img>")]


def test_the_synthetic_tokenizer_splits_text_as_qwen2_does(tiny_dirs):
    """The tokenizer.json the writer ships gives the ids transformers' Qwen2Tokenizer gives from
    the same vocab.json and merges.txt (its own NFC normalizer and split pattern): digits one by
    one, contractions, decomposed accents, newlines and runs of spaces."""
    import json

    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    from omni_export.export.checkpoint import load_tokenizer

    for root in tiny_dirs.values():
        ours = load_tokenizer(root)
        vocab = json.loads((root / "vocab.json").read_text())
        merges = [tuple(line.split(" ")) for line in (root / "merges.txt").read_text().splitlines()[1:] if line.strip()]
        qwen = Qwen2Tokenizer(vocab=vocab, merges=merges)
        texts = ["In 2024 it cost $1,299.50 (about 12345 yen).", "We'll see; they've GONE!\n\n  def f(x):\n\treturn x**2",
                 "Cafe\u0301 na\u00efve r\u00e9sum\u00e9", "3.14159 and 10:45pm, room 101B", "   leading spaces    and trailing   "]  # fmt: skip
        for text in texts:
            assert ours.encode(text, add_special_tokens=False).ids == qwen.encode(text, add_special_tokens=False), text
        gpt2_style = [ours.id_to_token(i) for i in ours.encode("12345", add_special_tokens=False).ids]
        assert gpt2_style == list("12345")  # a digit is always its own piece
