"""Token sampling and the flow-matching time schedule, shared by every backend."""

from __future__ import annotations

import math

import torch


def sample(logits: torch.Tensor, top_k: int, generator: torch.Generator | None, allowed: int | None = None,
           banned: tuple[int, ...] = ()) -> int:  # fmt: skip
    """Greedy when top_k <= 1, else top-k sampling; ``allowed`` keeps only the first N ids and
    ``banned`` ids are never chosen."""
    logits = logits.reshape(-1).float()
    if allowed is not None:
        logits = logits[:allowed]
    if banned:
        logits = logits.clone()
        logits[list(banned)] = float("-inf")
    if top_k <= 1:
        return int(torch.argmax(logits))
    vals, idx = torch.topk(logits, min(top_k, logits.numel()))
    choice = torch.multinomial(torch.softmax(vals, -1), 1, generator=generator)
    return int(idx[choice])


def repetition_penalty(logits: torch.Tensor, history: list[int], window: int, penalty: float) -> torch.Tensor:
    """VITA-1.5's TTS penalty (decoder.py ``infer``): the logit of every distinct id among the last
    ``window`` of ``history`` divided by ``penalty`` (a division, whatever the logit's sign, as
    released); ``window`` <= 0: off. Always a copy."""
    out = logits.clone()
    for tok in set(history[-window:]) if window > 0 else ():
        out[..., tok] = out[..., tok] / penalty
    return out


def cosine_timesteps(n: int) -> list[float]:
    """t = 1 - cos(pi/2 * s): CosyVoice's schedule, dense near t = 0 where the flow moves most."""
    return [1.0 - math.cos(0.5 * math.pi * i / n) for i in range(n + 1)]


def frame_noise(generator: torch.Generator, channels: int, hop: int, frames: int) -> torch.Tensor:
    """[1, channels, frames, hop] standard normal, drawn one frame at a time so a frame's noise is
    the same however frames are grouped into calls (a vocoder's source noise, streamed)."""
    if frames == 0:
        return torch.zeros(1, channels, 0, hop)
    return torch.stack([torch.randn(channels, hop, generator=generator) for _ in range(frames)], dim=1)[None]
