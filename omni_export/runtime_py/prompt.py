"""Chat prompts with multimodal placeholders, and merging encoder tokens into the embeddings."""

from __future__ import annotations

from typing import Any

import torch

SYSTEM_PROMPT = "You are a helpful assistant that answers in speech."


def chat_prompt(user: str, system: str = SYSTEM_PROMPT) -> str:
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def user_turn(prompt_cfg: dict, n_image: int, n_audio: int, text: str | None, image_token: str, audio_token: str) -> str:
    """The user message: each modality's placeholder repeated once per encoder token, wrapped in
    the family's markers (``prompt_cfg``: {"image": [prefix, suffix], "audio": [prefix, suffix]})."""
    out = ""
    if n_image:
        pre, post = prompt_cfg["image"]
        out += pre + image_token * n_image + post
    if n_audio:
        pre, post = prompt_cfg["audio"]
        out += pre + audio_token * n_audio + post
    return out + (text or "")


def merge_placeholders(embeds: torch.Tensor, ids: torch.Tensor, features: torch.Tensor, token_id: int) -> torch.Tensor:
    """Replace the embeddings at ``token_id`` positions with rows of ``features`` in order.

    embeds [1, T, H], ids [1, T], features [N, H]. Written with cumsum + gather + where instead of
    masked_scatter so the graph has no data-dependent shapes and traces with torch.export.
    """
    mask = ids == token_id
    order = (torch.cumsum(mask.to(torch.int64), dim=-1) - 1).clamp(min=0)
    order = order.clamp(max=max(features.shape[0] - 1, 0))
    gathered = features[order[0]].unsqueeze(0).to(embeds.dtype)
    return torch.where(mask[..., None], gathered, embeds)


def next_turn(user: str) -> str:
    """A later user turn: closes the assistant's previous reply (its end token was sampled, not
    fed, or the reply was cut short) and opens the next one."""
    return f"<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` (special tokens in it are parsed, none are added)."""
    return tokenizer.encode(text, add_special_tokens=False).ids
