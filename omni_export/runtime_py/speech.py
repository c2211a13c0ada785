"""Streaming speech decoders, by the manifest's ``speech.kind``. The pipeline pushes each text
token (id and the LLM's hidden state) as it is decoded and plays whatever PCM comes back; the
non-streaming path is the same object pushed everything at once, so both produce the same audio.

- ``cosyvoice2`` (InteractiveOmni): the speech-token LM reads text states in chunks of
  ``text_chunk`` and answers each with ``speech_chunk`` speech tokens (bistream); the flow is
  chunk-causal, so every complete chunk of ``flow_chunk_tokens`` speech tokens gives final mel,
  made by one call per chunk over windows of the past chunks (same cost for every chunk);
  the vocoder runs over new mel with left context and a held-back lookahead, its harmonic source
  carried across windows (phase and the context's source), and consecutive pieces are
  cross-faded over their overlap so the seams carry no clicks. A reply longer than the
  speech LM's context is spoken in segments, as CosyVoice's front end splits long text: a segment
  ends (its remaining speech made, then a fresh speech-LM context) after a sentence once it is
  half its budget, or when one more text chunk could overflow the cache; the flow and vocoder run
  on across segments.
- ``vita_codec`` (VITA-1.5): text is cut into segments (first one short, for a quick first
  sound; later at punctuation or a length); each segment runs NAR -> AR codec tokens -> codec
  decoder, with short raised-cosine edges so segments join without clicks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from omni_export.errors import ConfigError, ContextOverflowError
from omni_export.registry import Registry
from omni_export.runtime_py.sampler import cosine_timesteps, frame_noise, repetition_penalty, sample

if TYPE_CHECKING:
    from omni_export.runtime_py.pipeline import Pipeline

SPEECH_TOP_K = 25  # CosyVoice samples speech tokens from the top 25
PUNCTUATION = frozenset(".,!?;:\n。，！？；：")
SENTENCE_END = frozenset(".!?\n。！？")


def ends_with(p: Pipeline, token_id: int, marks: frozenset[str]) -> bool:
    return p.tokenizer.decode([token_id]).strip()[-1:] in marks


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
        self.window = self.c.get("vocoder_window")  # mel frames per vocoder call, as traced
        if self.window is not None and self.window <= self.CONTEXT_FRAMES + self.LOOKAHEAD_FRAMES:
            raise ConfigError(f"vocoder_window {self.window} must exceed the stream's {self.CONTEXT_FRAMES} context and "
                              f"{self.LOOKAHEAD_FRAMES} lookahead frames; rebuild the bundle with a longer window")  # fmt: skip
        self.states: list[torch.Tensor] = []
        self.n_text = 0  # text tokens of the current segment
        self.tokens: list[int] = []
        self.segment_start = 0  # index in ``tokens`` of the current segment's first speech token
        self.sentence_ended = False  # since the last text chunk
        c = self.c
        # Text tokens a segment may hold so that its worst case (every text token followed by the
        # most speech tokens the model may give it, plus the sos and task rows) fits the cache.
        self.segment_text = (self.slm.max_len - 2) // (1 + c["max_speech_per_text"]) // c["text_chunk"] * c["text_chunk"]
        if self.segment_text < c["text_chunk"]:
            raise ContextOverflowError(
                f"speech_lm: its KV cache ({self.slm.max_len} positions) cannot hold one text chunk ({c['text_chunk']} tokens) "
                f"and the up to {c['max_speech_per_text']} speech tokens per text token it may answer with; "
                "rebuild the bundle with a larger --context.")  # fmt: skip
        self.mel = torch.zeros(1, self.c["mel_bins"], 0)
        self.noise = torch.zeros(1, self.c["mel_bins"], 0)
        self.spks: torch.Tensor | None = None
        shapes = self.c["flow_caches"]
        if "flow_lookahead" not in c or set(shapes) != {"encode", "step"}:
            raise ConfigError("this bundle's flow predates CosyVoice2's released flow (no look-ahead tokens, other caches); "
                              "rebuild it with this omni-export")  # fmt: skip
        # The flow's sequence: a cloned voice's prompt tokens, then the reply's (CosyVoice2's
        # zero-shot input); the prompt's frames take its mel as condition and are not spoken.
        prompt = p.voice_prompt
        self.flow_seq: list[int] = list(prompt.tokens) if prompt is not None else []
        self.prompt_mel = prompt.mel[None].float() if prompt is not None else torch.zeros(1, c["mel_bins"], 0)
        self.flow_done = 0  # tokens of the flow's sequence whose mel is made
        self.enc_caches = [torch.zeros(s) for s in shapes["encode"].values()]
        self.timesteps = cosine_timesteps(self.c["n_timesteps"])
        self.step_caches = [[torch.zeros(s) for s in shapes["step"].values()] for _ in self.timesteps[1:]]  # one set per ODE step
        self.voc_frames = 0  # mel frames whose audio is out (or held in the tail)
        self.tail = np.zeros(0, dtype=np.float32)
        # The vocoder's harmonic source, carried across windows: its noise (drawn per frame, from
        # frame ``noise_from`` on), and the last window's start, source and per-frame phase.
        self.voc_gen = torch.Generator().manual_seed(seed + 1)
        self.noise_from = 0
        self.src_noise = torch.zeros(1, c["vocoder_harmonics"], 0, self.hop)
        self.src_start, self.src, self.src_phase = 0, torch.zeros(1, 0, self.hop), torch.zeros(1, c["vocoder_harmonics"], 0)
        self.logits = self._feed(self._special(self.c["sos_row"]))

    def _feed(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.slm.feed(embeds)[0][0, -1]

    def _special(self, row: int) -> torch.Tensor:
        return self.slm.session.run("embed_special", [torch.tensor([[row]])])[0]

    def _speech(self, allowed: int, banned: tuple[int, ...] = ()) -> int:
        tok = sample(self.logits, SPEECH_TOP_K, self.gen, allowed=allowed, banned=banned)
        if tok < self.c["speech_vocab"]:
            self.tokens.append(tok)
            self.flow_seq.append(tok)
            self.logits = self._feed(self.slm.session.run("embed_speech", [torch.tensor([[tok]])])[0])
        return tok

    def _text(self) -> None:
        chunk = torch.cat(self.states, dim=1)
        self.states = []
        self.logits = self._feed(self.slm.session.run("embed_text", [chunk.contiguous()])[0])

    def push(self, token_id: int, state: torch.Tensor) -> Iterator[np.ndarray]:
        c = self.c
        self.states.append(state)
        self.n_text += 1
        self.sentence_ended |= ends_with(self.p, token_id, SENTENCE_END)
        if len(self.states) < c["text_chunk"]:
            return
        self._text()
        # CosyVoice2's bistream: up to speech_chunk tokens per text chunk, then the fill token
        # ("more text") is forced; the model may also choose fill sooner. End-of-speech and the
        # unused id between them are never sampled while text is still coming.
        for _ in range(c["speech_chunk"]):
            if self._speech(c["fill"] + 1, banned=tuple(range(c["eos"], c["fill"]))) == c["fill"]:
                break
        yield from self._flush(final=False)
        full = self.n_text + c["text_chunk"] > self.segment_text
        if full or (self.sentence_ended and 2 * self.n_text >= self.segment_text):
            yield from self._rest_of_segment()
            self.slm.reset()
            self.logits = self._feed(self._special(c["sos_row"]))
            self.n_text, self.segment_start = 0, len(self.tokens)
        self.sentence_ended = False

    def finish(self) -> Iterator[np.ndarray]:
        yield from self._rest_of_segment()
        yield from self._flush(final=True)

    def _rest_of_segment(self) -> Iterator[np.ndarray]:
        """The text so far has ended: the speech LM says the rest of it, to end-of-speech."""
        if self.states:
            self._text()
        if not self.n_text:
            return
        self.logits = self._feed(self._special(self.c["task_row"]))
        limit = self.segment_start + self.c["max_speech_per_text"] * self.n_text
        while len(self.tokens) < limit and self.slm.free > 0:
            if self._speech(self.c["speech_vocab"] + 1) == self.c["eos"]:
                break
            if (len(self.flow_seq) - self.c["flow_lookahead"]) % self.c["flow_chunk_tokens"] == 0:  # a flow chunk and its look-ahead are in: play it
                yield from self._flush(final=False)

    # -- tokens -> mel -> PCM ---------------------------------------------------------------------
    def _flush(self, final: bool) -> Iterator[np.ndarray]:
        chunk, ahead = self.c["flow_chunk_tokens"], self.c["flow_lookahead"]
        n = len(self.flow_seq)
        self._mel(n if final else max(0, n - ahead) // chunk * chunk)
        yield from self._vocode(final)

    def _mel(self, ready: int) -> None:
        """Mel for the first ``ready`` tokens, a flow chunk at a time (each with the look-ahead
        tokens after it, where they exist): each chunk's call sees the windows the earlier
        chunks left, so frames already made never change."""
        chunk, ahead = self.c["flow_chunk_tokens"], self.c["flow_lookahead"]
        while self.flow_done < ready:
            if self.flow_done % chunk:
                raise RuntimeError("the flow's last chunk was short; no speech token may follow it")
            n = min(ready, self.flow_done + chunk) - self.flow_done
            tokens = self.flow_seq[self.flow_done : self.flow_done + chunk + ahead]
            self.mel = torch.cat([self.mel, self._flow_chunk(tokens, n)], dim=-1)
            self.flow_done += n

    def _flow_chunk(self, tokens: list[int], n: int) -> torch.Tensor:
        """Mel of the first ``n`` of ``tokens`` (the rest: their look-ahead)."""
        chunk, r, ahead = self.c["flow_chunk_tokens"], self.c["token_mel_ratio"], self.c["flow_lookahead"]
        offset, length = torch.tensor([self.flow_done]), torch.tensor([len(tokens)])
        padded = torch.tensor([tokens + [0] * (chunk + ahead - len(tokens))])  # the end of speech: padding, masked out
        mu, *self.enc_caches = self.flow.run("encode_chunk", [padded, offset, length, *self.enc_caches])
        if self.spks is None:
            voice = self.p.voice if self.p.voice is not None else self.p.assets["default_speaker_embedding"]
            self.spks = self.flow.run("speaker", [torch.from_numpy(voice).float()[None]])[0]
        # noise is drawn once per frame, in order, so a frame's noise never depends on chunking
        noise = torch.randn(1, mu.shape[1], r * n, generator=self.gen)
        self.noise = torch.cat([self.noise, noise], dim=-1)
        x, cond = torch.nn.functional.pad(noise, (0, r * (chunk - n))), torch.zeros_like(mu)
        start = r * self.flow_done
        given = self.prompt_mel[..., start : start + r * chunk]  # the prompt's frames in this chunk
        cond[..., : given.shape[-1]] = given
        for i, (t0, t1) in enumerate(zip(self.timesteps[:-1], self.timesteps[1:], strict=True)):
            x, *self.step_caches[i] = self.flow.run(
                "step_chunk", [x, mu, torch.tensor([t0]), torch.tensor(t1 - t0), self.spks, cond, *self.step_caches[i], offset, length])
        return x[..., max(0, self.prompt_mel.shape[-1] - start) : r * n]

    def _vocoder_window(self, start: int, stop: int) -> np.ndarray:
        """Audio of mel frames ``start:stop``. The harmonic source joins the last window's seamlessly:
        its phase is carried from the last window at the first frame whose audio is new (past
        the F0 predictor's edge), and the context frames take the last window's source as it was,
        as CosyVoice2 caches it."""
        mel = self.mel[..., start:stop].contiguous()
        h = self.c["vocoder_harmonics"]
        drawn = self.noise_from + self.src_noise.shape[2]
        more = frame_noise(self.voc_gen, h, self.hop, max(0, stop - drawn))
        self.src_noise = torch.cat([self.src_noise[:, :, start - self.noise_from :], more], dim=2)
        self.noise_from = start
        noise = self.src_noise[:, :, : stop - start]
        new_from = self.voc_frames - start  # first frame of this window whose audio is new
        if self.src.shape[1] and new_from > 0:
            phase0, anchor = self.src_phase[..., self.voc_frames - self.src_start], new_from
        else:
            phase0, anchor = torch.zeros(1, h), 0
        source, phase = self.vocoder.run("source", [mel, phase0, torch.tensor([anchor]), noise])
        if new_from > 0 and self.src.shape[1]:
            kept = self.src[:, start - self.src_start : self.voc_frames - self.src_start]
            source = torch.cat([kept, source[:, new_from:].float()], dim=1)
        self.src_start, self.src, self.src_phase = start, source.float(), phase.float()
        return self.vocoder.run("decode", [mel, source])[0][0].float().numpy()

    def _vocode(self, final: bool) -> list[np.ndarray]:
        total = self.mel.shape[-1]
        end = total if final else total - self.LOOKAHEAD_FRAMES
        if end <= self.voc_frames or (final and total < 2):
            if not final or not self.tail.size:
                return []
            tail, self.tail = self.tail, np.zeros(0, dtype=np.float32)
            return [tail]
        pieces = []
        while self.voc_frames < end:  # windows of at most the traced length
            start = max(0, self.voc_frames - self.CONTEXT_FRAMES)
            stop = total if self.window is None else min(total, start + self.window)
            # The vocoder sees held-back frames as right context; only audio up to ``upto`` is final.
            upto = end if stop == total else stop - self.LOOKAHEAD_FRAMES
            pieces += self._render(start, stop, upto, final and upto == end)
        return pieces

    def _render(self, start: int, stop: int, upto: int, last: bool) -> list[np.ndarray]:
        wav = self._vocoder_window(start, stop)
        head = self.voc_frames * self.hop - len(self.tail) - start * self.hop  # first sample not yet out
        piece = wav[head : (upto - start) * self.hop].copy()
        if self.tail.size:
            n = len(self.tail)
            fade = raised_cosine(n)
            piece[:n] = self.tail * (1 - fade) + piece[:n] * fade
        self.voc_frames = upto
        if last:
            self.tail = np.zeros(0, dtype=np.float32)
            return [piece]
        keep = min(self.xfade, len(piece))
        self.tail = piece[len(piece) - keep :].copy()
        return [piece[: len(piece) - keep]] if len(piece) > keep else []


class VitaCodecStream(SpeechStream):
    components = ("tts_nar", "tts_ar", "codec_decoder")
    FIRST_SEGMENT = 6  # tokens: a short first segment starts the speech early
    SEGMENT = 24
    EDGE_MS = 5.0

    def __init__(self, p: Pipeline, seed: int) -> None:
        super().__init__(p, seed)
        if self.SEGMENT > self.c.get("max_segment_text", self.SEGMENT):
            raise ConfigError(f"tts_nar is traced for {self.c['max_segment_text']} text tokens per call, fewer than a "
                              f"{self.SEGMENT}-token speech segment; rebuild the bundle with this version")  # fmt: skip
        missing = [k for k in ("sos", "frames_per_token") if k not in self.c]
        if missing:
            raise ConfigError(f"this bundle's speech config lacks {missing}: it was built before VITA-1.5's TTS followed the "
                              "release (sos, frames of the LLM's embeddings); rebuild it with omni-export --target ...")  # fmt: skip
        self.ar = p.stack("tts_ar")
        self.ids: list[int] = []
        self.segments = 0

    def push(self, token_id: int, state: torch.Tensor) -> Iterator[np.ndarray]:
        self.ids.append(token_id)
        n = len(self.ids)
        at_break = ends_with(self.p, token_id, PUNCTUATION)
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
        """As the release: the LLM's input embeddings of the text read as frames of the TTS width,
        the NAR stack, the prefix [bos, NAR output] in one call (it attends both ways), sos, codec
        tokens (top-k) to end-of-speech, the codec decoder with the default global tokens."""
        c, ar = self.c, self.ar
        text_embeds = self.p.sessions["llm"].run("embed", [text_ids])[0]
        frames = text_embeds.reshape(1, -1, text_embeds.shape[-1] // c["frames_per_token"])
        if frames.shape[1] < 2:  # the NAR stack is traced for two or more frames (one token, one frame per token)
            frames = torch.cat([frames, frames], dim=1)
        context = self.p.sessions["tts_nar"].run("forward", [frames])[0]
        ar.reset()
        prefix = torch.cat([ar.session.run("embed_codes", [torch.tensor([[c["bos"]]])])[0], context], dim=1)
        if prefix.shape[1] > ar.chunk:
            raise ConfigError(f"tts_ar: a {prefix.shape[1]}-position prefix must go in one call (it attends both ways), "
                              f"but prefill is traced for {ar.chunk}; rebuild the bundle with a larger prefill chunk")  # fmt: skip
        ar.feed(prefix)
        logits = ar.feed(ar.session.run("embed_codes", [torch.tensor([[c["sos"]]])])[0])[0][0, -1]
        codes: list[int] = []
        limit = min(c["max_codec_per_text"] * text_ids.shape[1], ar.free)
        while len(codes) < limit:
            logits = repetition_penalty(logits, [c["sos"], *codes], c.get("penalty_window", -1), c.get("penalty", 1.0))
            logits[c["bos"] : c["eos"]] = float("-inf")  # bos and sos are never codes (pad: past `allowed`)
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
