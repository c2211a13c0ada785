"""Pieces both families use: strict top-level key checks, chat prompts, sampling."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from omni_export.errors import ConfigError

SYSTEM_PROMPT = "You are a helpful assistant that answers in speech."


def check_keys(d: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(allowed)}")


def require(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ConfigError(f"{where}: required key {key!r} is missing")
    return d[key]


def chat_prompt(user: str, system: str = SYSTEM_PROMPT) -> str:
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def sample(logits: torch.Tensor, top_k: int, generator: torch.Generator | None, allowed: int | None = None) -> int:
    """Greedy when top_k <= 1, else top-k sampling; ``allowed`` keeps only the first N ids."""
    logits = logits.reshape(-1).float()
    if allowed is not None:
        logits = logits[:allowed]
    if top_k <= 1:
        return int(torch.argmax(logits))
    vals, idx = torch.topk(logits, min(top_k, logits.numel()))
    choice = torch.multinomial(torch.softmax(vals, -1), 1, generator=generator)
    return int(idx[choice])
