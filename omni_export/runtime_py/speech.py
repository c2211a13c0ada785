"""Speech decoders, by the manifest's ``speech.kind``: each turns the generated text (ids and the
LLM's hidden states) into 24 kHz PCM through the bundle's sessions."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from omni_export.registry import Registry
from omni_export.runtime_py.sampler import cosine_timesteps, sample

if TYPE_CHECKING:
    from omni_export.runtime_py.pipeline import Pipeline

SpeechDecoder = Callable[["Pipeline", torch.Tensor, torch.Tensor, int], np.ndarray]
SPEECH: Registry[SpeechDecoder] = Registry("speech decoder")
SPEECH_TOP_K = 25  # CosyVoice samples speech tokens from the top 25


def _cosyvoice2(p: Pipeline, text_ids: torch.Tensor, text_states: torch.Tensor, seed: int) -> np.ndarray:
    """Speech-token LM fed N text states then M speech tokens in turn (bistream), then speech to
    end-of-speech; flow matching (Euler, CFG inside the step) to mel; vocoder to PCM."""
    c = p.config["speech"]
    slm, flow = p.sessions["speech_lm"], p.sessions["flow"]
    gen = torch.Generator().manual_seed(seed)
    slm.reset()
    pos = 0

    def feed(embeds: torch.Tensor) -> torch.Tensor:
        nonlocal pos
        logits = p.feed("speech_lm", embeds, pos)[0]
        pos += embeds.shape[1]
        return logits[0, -1]

    special = lambda row: slm.run("embed_special", [torch.tensor([[row]])])[0]  # noqa: E731
    speech_emb = lambda tok: slm.run("embed_speech", [torch.tensor([[tok]])])[0]  # noqa: E731
    limit = c["max_speech_per_text"] * max(text_states.shape[1], 1)
    tokens: list[int] = []
    logits = feed(special(c["sos_row"]))
    chunks = list(torch.split(text_states, c["text_chunk"], dim=1))
    for i, chunk in enumerate(chunks):
        logits = feed(slm.run("embed_text", [chunk.contiguous()])[0])
        if i == len(chunks) - 1:
            break
        for _ in range(c["speech_chunk"]):
            tokens.append(sample(logits, SPEECH_TOP_K, gen, allowed=c["speech_vocab"]))
            logits = feed(speech_emb(tokens[-1]))
    logits = feed(special(c["task_row"]))
    while len(tokens) < limit:
        tok = sample(logits, SPEECH_TOP_K, gen, allowed=c["speech_vocab"] + 1)
        if tok == c["eos"]:
            break
        tokens.append(tok)
        logits = feed(speech_emb(tok))
    if len(tokens) < 2:  # the flow needs two tokens (one mel chunk pair) to produce sound
        return np.zeros(0, dtype=np.float32)
    mu = flow.run("encode", [torch.tensor([tokens])])[0]
    spks = flow.run("speaker", [torch.from_numpy(p.assets["default_speaker_embedding"]).float()[None]])[0]
    x, cond = torch.randn(mu.shape, generator=gen), torch.zeros_like(mu)
    ts = cosine_timesteps(c["n_timesteps"])
    for t0, t1 in zip(ts[:-1], ts[1:], strict=True):
        x = flow.run("step", [x, mu, torch.tensor([t0]), torch.tensor(t1 - t0), spks, cond])[0]
    return p.sessions["vocoder"].run("forward", [x])[0][0].float().numpy()


def _vita_codec(p: Pipeline, text_ids: torch.Tensor, text_states: torch.Tensor, seed: int) -> np.ndarray:
    """NAR stack over the LLM's input embeddings of the text, AR codec tokens (top-k) to
    end-of-speech, codec decoder with the default global tokens."""
    c = p.config["speech"]
    ar = p.sessions["tts_ar"]
    gen = torch.Generator().manual_seed(seed)
    text_embeds = p.sessions["llm"].run("embed", [text_ids])[0]
    if text_embeds.shape[1] < 2:  # the NAR stack is traced for two or more positions
        text_embeds = torch.cat([text_embeds, text_embeds], dim=1)
    context = p.sessions["tts_nar"].run("forward", [text_embeds])[0]
    ar.reset()
    prefix = torch.cat([context, ar.run("embed_codes", [torch.tensor([[c["bos"]]])])[0]], dim=1)
    logits = p.feed("tts_ar", prefix, 0)[0][0, -1]
    pos, codes = prefix.shape[1], []
    limit = c["max_codec_per_text"] * max(text_ids.shape[1], 1)
    while len(codes) < limit:
        logits = logits.clone()
        logits[c["codebook_size"] : c["eos"]] = float("-inf")  # pad and bos are never emitted
        tok = sample(logits, c["top_k"], gen, allowed=c["eos"] + 1)
        if tok == c["eos"]:
            break
        codes.append(tok)
        logits = p.feed("tts_ar", ar.run("embed_codes", [torch.tensor([[tok]])])[0], pos)[0][0, -1]
        pos += 1
    if len(codes) < 2:
        return np.zeros(0, dtype=np.float32)
    global_codes = torch.from_numpy(p.assets["default_global_codes"]).long()[None]
    return p.sessions["codec_decoder"].run("forward", [torch.tensor([codes]), global_codes])[0][0].float().numpy()


SPEECH.register("cosyvoice2", _cosyvoice2)
SPEECH.register("vita_codec", _vita_codec)
