"""A real byte-level BPE tokenizer, trained on the spot on text that ships with Python itself
(pydoc's topic help, several hundred KB of English), in the Qwen file layout and with Qwen2's
text handling (both families' LLMs are Qwen): NFC normalization, then Qwen2's split pattern (a
digit is always its own piece, unlike GPT-2's split), then the byte-level alphabet. Real
checkpoints bring their own tokenizer.json, which is used as it is."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

SIZES = {"tiny": 512, "small": 8000, "full": 16000}
# Qwen2's pre-tokenization pattern, as its tokenizer.json and transformers' Qwen2Tokenizer give it.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def corpus() -> list[str]:
    """Paragraphs of pydoc's help topics: real English prose and code, no download needed."""
    from pydoc_data.topics import topics

    paras = []
    for text in topics.values():
        paras.extend(p.strip() for p in text.split("\n\n") if p.strip())
    return paras


def train(vocab_size: int, special_tokens: Sequence[str]):  # -> tokenizers.Tokenizer
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def save(tok, out: Path, special_tokens: Sequence[str], model_max_length: int) -> None:
    """tokenizer.json + vocab.json/merges.txt + tokenizer_config.json, as Qwen repos ship them."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))
    added = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True}
        for t in special_tokens
    }  # fmt: skip
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in special_tokens if t not in ("<|endoftext|>", "<|im_end|>")],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": (
            "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
