"""Chat prompts with multimodal placeholders, and merging encoder tokens into the embeddings."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

SYSTEM_PROMPT = "You are a helpful assistant that answers in speech."


def chat_prompt(user: str, system: str = SYSTEM_PROMPT) -> str:
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


Visual = int | Sequence[tuple[str, int]]


def user_turn(prompt_cfg: dict, visual: Visual, n_audio: int, text: str | None, image_token: str, audio_token: str) -> str:
    """The user message: each modality's placeholder repeated once per encoder token, wrapped in
    the family's markers (``prompt_cfg``: {"image": [prefix, suffix], "audio": [prefix, suffix]}).
    ``visual``: the image token runs as (label, tokens), one per image or video frame (the label,
    e.g. "Frame3: ", goes before its markers); a bare count is one unlabelled run."""
    out = ""
    pre, post = prompt_cfg["image"]
    for label, n in ([("", visual)] if isinstance(visual, int) else visual):
        if n:
            out += label + pre + image_token * n + post
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


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of user text, as text: a ``<|im_end|>`` or a placeholder typed by a user is the
    characters it spells, never the control token (special tokens only where the pipeline puts
    them)."""
    saved = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        return tokenizer.encode(text, add_special_tokens=False).ids
    finally:
        tokenizer.encode_special_tokens = saved


_USER = "\x00user text\x00"  # where the user's own text goes in a template
_REPLY = "\x00assistant reply\x00"  # where the previous reply ended (later turns)


@functools.lru_cache(maxsize=4)
def _compiled(template: str) -> Any:
    """A chat template compiled once per session, not per turn."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)


def render_template(template: str, system: str, user: str, fresh: bool) -> str:
    """A turn's text from the checkpoint's own chat template (Jinja, as in its
    tokenizer_config.json; rendered sandboxed, as transformers does): the first turn is the
    system and user messages with the generation prompt; a later one is what the template puts
    after the previous reply, through the next generation prompt."""
    messages = [{"role": "system", "content": system}]
    if not fresh:
        messages += [{"role": "user", "content": "\x00earlier\x00"}, {"role": "assistant", "content": _REPLY}]
    messages.append({"role": "user", "content": user})
    text = _compiled(template).render(messages=messages, add_generation_prompt=True)
    if fresh:
        return text
    if _REPLY not in text:
        raise ValueError("the chat template drops the assistant's reply from the conversation; cannot continue a conversation with it")
    return text.split(_REPLY, 1)[1]


def turn_ids(tokenizer: Any, prompt_cfg: dict, fresh: bool, visual: Visual, n_audio: int, text: str | None) -> list[int]:
    """A user turn's token ids: the chat template and the placeholders with their special tokens,
    the user's text encoded as text (``encode_text``). ``fresh``: the first turn (with the
    system prompt); otherwise the turn closes the previous reply first (``next_turn``). The
    checkpoint's own chat template (``prompt_cfg["chat_template"]``) when it ships one, else
    ChatML (Qwen's)."""
    user = user_turn(prompt_cfg, visual, n_audio, _USER, prompt_cfg["image_token"], prompt_cfg["audio_token"])
    own = prompt_cfg.get("chat_template")
    if own:
        template = render_template(own, prompt_cfg["system"], user, fresh)
    else:
        template = chat_prompt(user, prompt_cfg["system"]) if fresh else next_turn(user)
    head, tail = template.split(_USER)
    return encode(tokenizer, head) + (encode_text(tokenizer, text) if text else []) + encode(tokenizer, tail)
