"""The eager reference pipeline: preprocess -> encode -> LLM prefill + decode with the KV cache ->
speech. It is what every exported artifact is judged against, and what `omni-export run` drives
on a checkpoint directory."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from omni_export.errors import ContextOverflowError, InputError
from omni_export.export.checkpoint import Checkpoint
from omni_export.export.components.layers import merge_placeholders
from omni_export.export.families.common import sample
from omni_export.runtime_py.audio import read_audio
from omni_export.runtime_py.image import preprocess_image


@dataclass
class Reply:
    text: str
    token_ids: list[int]
    audio: np.ndarray
    sample_rate: int
    prompt_tokens: int
    timings_ms: dict[str, float] = field(default_factory=dict)


class _Timer:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[[], object]):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        out = fn()
        self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - t) * 1000
        return out


@torch.inference_mode()
def respond(
    ckpt: Checkpoint,
    audio: str | Path | np.ndarray | None = None,
    image: str | Path | None = None,
    text: str | None = None,
    max_new_tokens: int = 32,
    max_context: int | None = None,
    top_k: int = 1,
    seed: int = 0,
    speech: bool = True,
) -> Reply:
    """One turn. ``audio`` is a path or mono float samples at the family's input rate."""
    if audio is None and image is None and not text:
        raise InputError("nothing to answer: give audio, an image or text")
    family, comps, timer = ckpt.family, ckpt.components, _Timer()
    llm = comps["llm"]
    dtype = next(llm.parameters()).dtype
    rate = family.audio_sample_rate
    wav = read_audio(audio, rate) if isinstance(audio, (str, Path)) else audio
    audio_tok = image_tok = None
    if wav is not None:
        audio_tok = timer("audio_encoder", lambda: family.audio_tokens(ckpt, torch.from_numpy(np.asarray(wav, dtype=np.float32))))
    if image is not None:
        vis = comps["vision_encoder"]
        tiles = preprocess_image(image, vis.cfg.image_size, ckpt.config.max_dynamic_patch)
        image_tok = timer("vision_encoder", lambda: vis(torch.from_numpy(tiles).to(dtype)))
    n_img = 0 if image_tok is None else image_tok.shape[0]
    n_aud = 0 if audio_tok is None else audio_tok.shape[0]
    ids = family.prompt(ckpt, n_img, n_aud, text)
    limit = max_context or llm.cfg.max_position_embeddings
    if len(ids) + max_new_tokens > limit:
        raise ContextOverflowError(
            f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds the context of {limit}; "
            "shorten the audio, use fewer image tiles or lower --max-new-tokens."
        )
    llm.model.setup_cache(len(ids) + max_new_tokens, dtype=dtype)
    ids_t = torch.tensor([ids])
    embeds = llm.embed(ids_t)
    if image_tok is not None:
        embeds = merge_placeholders(embeds, ids_t, image_tok, ckpt.special_ids[family.image_token])
    if audio_tok is not None:
        embeds = merge_placeholders(embeds, ids_t, audio_tok, ckpt.special_ids[family.audio_token])
    hidden = timer("llm_prefill", lambda: llm.hidden(embeds, torch.arange(len(ids))))
    logits = llm.logits(hidden[:, -1])
    eos = {ckpt.special_ids[t] for t in family.eos_tokens}
    gen = torch.Generator().manual_seed(seed)
    out_ids: list[int] = []
    states: list[torch.Tensor] = []
    pos = len(ids)
    for _ in range(max_new_tokens):
        tok = sample(logits, top_k, gen)
        if tok in eos:
            break
        out_ids.append(tok)
        h = timer("llm_decode", lambda: llm.hidden(llm.embed(torch.tensor([[tok]])), torch.tensor([pos])))
        states.append(h)
        logits = llm.logits(h[:, -1])
        pos += 1
    text_out = ckpt.tokenizer.decode(out_ids, skip_special_tokens=True)
    wav_out = np.zeros(0, dtype=np.float32)
    if speech and out_ids:
        text_states = torch.cat(states, dim=1)
        wav_out = timer("speech", lambda: family.speak(ckpt, torch.tensor([out_ids]), text_states, seed))
    return Reply(text_out, out_ids, np.asarray(wav_out, dtype=np.float32), family.output_sample_rate, len(ids), timer.ms)
