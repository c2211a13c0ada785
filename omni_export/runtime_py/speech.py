"""Streaming speech decoders, by the manifest's ``speech.kind``. The pipeline pushes each text
token (id and the LLM's hidden state) as it is decoded and plays whatever PCM comes back; the
non-streaming path is the same object pushed everything at once, so both produce the same audio.

- ``cosyvoice2`` (InteractiveOmni): the speech-token LM reads text states in chunks of
  ``text_chunk`` and answers each with ``speech_chunk`` speech tokens (bistream); the flow is
  chunk-causal, so every complete chunk of ``flow_chunk_tokens`` speech tokens gives final mel;
  the vocoder runs over new mel with left context and a held-back lookahead, and consecutive
  pieces are cross-faded over their overlap so the seams carry no clicks.
- ``vita_codec`` (VITA-1.5): text is cut into segments (first one short, for a quick first
  sound; later at punctuation or a length); each segment runs NAR -> AR codec tokens -> codec
  decoder, with short raised-cosine edges so segments join without clicks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from omni_export.registry import Registry
from omni_export.runtime_py.sampler import cosine_timesteps, sample

if TYPE_CHECKING:
    from omni_export.runtime_py.pipeline import Pipeline

SPEECH_TOP_K = 25  # CosyVoice samples speech tokens from the top 25


class SpeechStream(ABC):
    components: ClassVar[tuple[str, ...]]

    def __init__(self, p: Pipeline, seed: int) -> None:
        self.p, self.c = p, p.config["speech"]
        self.gen = torch.Generator().manual_seed(seed)

    @abstractmethod
    def push(self, token_id: int, state: torch.Tensor) -> Iterator[np.ndarray]:
        """One more text token; yields the PCM pieces that became final. A generator, so a
        caller that stops iterating (barge-in) also stops the work."""

    @abstractmethod
    def finish(self) -> Iterator[np.ndarray]:
        """The text has ended: synthesize the rest, piece by piece."""


SPEECH: Registry[type[SpeechStream]] = Registry("speech decoder")


def raised_cosine(n: int) -> np.ndarray:
    return (0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)).astype(np.float32)


class CosyVoice2Stream(SpeechStream):
    components = ("speech_lm", "flow", "vocoder")
    CONTEXT_FRAMES = 8  # mel frames of left context the vocoder sees again
    LOOKAHEAD_FRAMES = 6  # mel frames held back until their right context exists

    def __init__(self, p: Pipeline, seed: int) -> None:
        super().__init__(p, seed)
        self.slm = p.stack("speech_lm")
        self.slm.reset()
        self.flow, self.vocoder = p.sessions["flow"], p.sessions["vocoder"]
        self.hop = self.c["vocoder_hop"]
        self.xfade = self.hop
        self.states: list[torch.Tensor] = []
        self.n_text = 0
        self.tokens: list[int] = []
        self.mel = torch.zeros(1, self.c["mel_bins"], 0)
        self.noise = torch.zeros(1, self.c["mel_bins"], 0)
        self.spks: torch.Tensor | None = None
        self.voc_frames = 0  # mel frames whose audio is out (or held in the tail)
        self.tail = np.zeros(0, dtype=np.float32)
        self.logits = self._feed(self._special(self.c["sos_row"]))

    def _feed(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.slm.feed(embeds)[0][0, -1]

    def _special(self, row: int) -> torch.Tensor:
        return self.slm.session.run("embed_special", [torch.tensor([[row]])])[0]

    def _speech(self, allowed: int) -> int:
        tok = sample(self.logits, SPEECH_TOP_K, self.gen, allowed=allowed)
        if tok < self.c["speech_vocab"]:
            self.tokens.append(tok)
            self.logits = self._feed(self.slm.session.run("embed_speech", [torch.tensor([[tok]])])[0])
        return tok

    def _text(self) -> None:
        chunk = torch.cat(self.states, dim=1)
        self.states = []
        self.logits = self._feed(self.slm.session.run("embed_text", [chunk.contiguous()])[0])

    def push(self, token_id: int, state: torch.Tensor) -> Iterator[np.ndarray]:
        self.states.append(state)
        self.n_text += 1
        if len(self.states) < self.c["text_chunk"]:
            return
        self._text()
        for _ in range(self.c["speech_chunk"]):
            self._speech(self.c["speech_vocab"])
        yield from self._flush(final=False)

    def finish(self) -> Iterator[np.ndarray]:
        if self.states:
            self._text()
        self.logits = self._feed(self._special(self.c["task_row"]))
        limit = self.c["max_speech_per_text"] * max(self.n_text, 1)
        while len(self.tokens) < limit and self.slm.free > 0:
            if self._speech(self.c["speech_vocab"] + 1) == self.c["eos"]:
                break
            if len(self.tokens) % self.c["flow_chunk_tokens"] == 0:  # a flow chunk is complete: play it
                yield from self._flush(final=False)
        yield from self._flush(final=True)

    # -- tokens -> mel -> PCM ---------------------------------------------------------------------
    def _flush(self, final: bool) -> Iterator[np.ndarray]:
        chunk = self.c["flow_chunk_tokens"]
        ready = len(self.tokens) if final else len(self.tokens) // chunk * chunk
        if final and ready < 2:  # the flow needs two tokens (one mel chunk pair) to produce sound
            ready = self.mel.shape[-1] // self.c["token_mel_ratio"]
        if ready * self.c["token_mel_ratio"] > self.mel.shape[-1]:
            self._mel(ready)
        yield from self._vocode(final)

    def _mel(self, ready: int) -> None:
        """Mel for the first ``ready`` tokens; the flow is chunk-causal, so frames already made stay
        as they were and only the new ones are kept."""
        mu = self.flow.run("encode", [torch.tensor([self.tokens[:ready]])])[0]
        frames = mu.shape[-1]
        if self.spks is None:
            self.spks = self.flow.run("speaker", [torch.from_numpy(self.p.assets["default_speaker_embedding"]).float()[None]])[0]
        extra = frames - self.noise.shape[-1]
        if extra > 0:  # noise is drawn once per frame, in order, so a frame's noise never changes
            self.noise = torch.cat([self.noise, torch.randn(1, mu.shape[1], extra, generator=self.gen)], dim=-1)
        x, cond = self.noise[..., :frames].clone(), torch.zeros_like(mu)
        ts = cosine_timesteps(self.c["n_timesteps"])
        for t0, t1 in zip(ts[:-1], ts[1:], strict=True):
            x = self.flow.run("step", [x, mu, torch.tensor([t0]), torch.tensor(t1 - t0), self.spks, cond])[0]
        self.mel = torch.cat([self.mel, x[..., self.mel.shape[-1] :]], dim=-1)

    def _vocode(self, final: bool) -> list[np.ndarray]:
        total = self.mel.shape[-1]
        end = total if final else total - self.LOOKAHEAD_FRAMES
        if end <= self.voc_frames or (final and total < 2):
            if not final or not self.tail.size:
                return []
            tail, self.tail = self.tail, np.zeros(0, dtype=np.float32)
            return [tail]
        start = max(0, self.voc_frames - self.CONTEXT_FRAMES)
        # The vocoder sees the held-back frames as right context; only audio up to ``end`` is final.
        wav = self.vocoder.run("forward", [self.mel[..., start:].contiguous()])[0][0].float().numpy()
        head = self.voc_frames * self.hop - len(self.tail) - start * self.hop  # first sample not yet out
        piece = wav[head : (end - start) * self.hop].copy()
        if self.tail.size:
            n = len(self.tail)
            fade = raised_cosine(n)
            piece[:n] = self.tail * (1 - fade) + piece[:n] * fade
        self.voc_frames = end
        if final:
            self.tail = np.zeros(0, dtype=np.float32)
            return [piece]
        keep = min(self.xfade, len(piece))
        self.tail = piece[len(piece) - keep :].copy()
        return [piece[: len(piece) - keep]] if len(piece) > keep else []


class VitaCodecStream(SpeechStream):
    components = ("tts_nar", "tts_ar", "codec_decoder")
    FIRST_SEGMENT = 6  # tokens: a short first segment starts the speech early
    SEGMENT = 24
    PUNCTUATION = frozenset(".,!?;:\n。，！？；：")
    EDGE_MS = 5.0

    def __init__(self, p: Pipeline, seed: int) -> None:
        super().__init__(p, seed)
        self.ar = p.stack("tts_ar")
        self.ids: list[int] = []
        self.segments = 0

    def push(self, token_id: int, state: torch.Tensor) -> Iterator[np.ndarray]:
        self.ids.append(token_id)
        n = len(self.ids)
        at_break = self.p.tokenizer.decode([token_id]).strip()[-1:] in self.PUNCTUATION
        if n >= (self.FIRST_SEGMENT if self.segments == 0 else self.SEGMENT) or (at_break and n >= 4):
            yield from self._segment()

    def finish(self) -> Iterator[np.ndarray]:
        if self.ids:
            yield from self._segment()

    def _segment(self) -> Iterator[np.ndarray]:
        ids, self.ids = torch.tensor([self.ids]), []
        self.segments += 1
        pcm = self._synthesize(ids)
        if pcm.size == 0:
            return
        edge = min(int(self.p.config["output_sample_rate"] * self.EDGE_MS / 1000), len(pcm) // 2)
        if edge:
            ramp = raised_cosine(edge)
            pcm[:edge] *= ramp
            pcm[len(pcm) - edge :] *= ramp[::-1]
        yield pcm

    def _synthesize(self, text_ids: torch.Tensor) -> np.ndarray:
        """NAR stack over the LLM's input embeddings of the text, AR codec tokens (top-k) to
        end-of-speech, codec decoder with the default global tokens."""
        c, ar = self.c, self.ar
        text_embeds = self.p.sessions["llm"].run("embed", [text_ids])[0]
        if text_embeds.shape[1] < 2:  # the NAR stack is traced for two or more positions
            text_embeds = torch.cat([text_embeds, text_embeds], dim=1)
        context = self.p.sessions["tts_nar"].run("forward", [text_embeds])[0]
        ar.reset()
        prefix = torch.cat([context, ar.session.run("embed_codes", [torch.tensor([[c["bos"]]])])[0]], dim=1)
        logits = ar.feed(prefix)[0][0, -1]
        codes: list[int] = []
        limit = min(c["max_codec_per_text"] * text_ids.shape[1], ar.free)
        while len(codes) < limit:
            logits = logits.clone()
            logits[c["codebook_size"] : c["eos"]] = float("-inf")  # pad and bos are never emitted
            tok = sample(logits, c["top_k"], self.gen, allowed=c["eos"] + 1)
            if tok == c["eos"]:
                break
            codes.append(tok)
            logits = ar.feed(ar.session.run("embed_codes", [torch.tensor([[tok]])])[0])[0][0, -1]
        if len(codes) < 2:
            return np.zeros(0, dtype=np.float32)
        global_codes = torch.from_numpy(self.p.assets["default_global_codes"]).long()[None]
        return self.p.sessions["codec_decoder"].run("forward", [torch.tensor([codes]), global_codes])[0][0].float().numpy()


SPEECH.register("cosyvoice2", CosyVoice2Stream)
SPEECH.register("vita_codec", VitaCodecStream)
