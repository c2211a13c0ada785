"""The streaming conversation: the reference for how an app drives a bundle.

A turn is built while the user speaks: ``push_audio`` takes microphone-sized chunks (the
feature front end and the audio encoder run as soon as a whole encoder window has arrived, so
only the last window is left for the end of the turn; Whisper and Whale attend across their
whole window, so a window is the smallest piece that encodes exactly as offline), an energy VAD
says when the user stopped, ``add_image`` encodes frames as they come. ``respond_stream`` then
prefills only the turn's new tokens after the cached conversation, decodes, and feeds each
text token to the speech decoder, yielding TextDelta / AudioChunk events as they are ready and
a Stats at the end. ``interrupt`` (barge-in) stops before the next event; the KV cache then
holds exactly the tokens yielded so far, and the next turn closes the cut reply and goes on.

Everything it needs comes from the manifest; the same code drives a bundle's artifacts and a
checkpoint's eager modules."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omni_export.errors import (
    AudioInputError,
    ConfigError,
    ContextOverflowError,
    InputError,
    VideoInputError,
)
from omni_export.bundle.manifest import ComponentEntry
from omni_export.runtime_py.audio import StreamResampler, check_samples, pad_to_multiple, read_audio
from omni_export.runtime_py.backends.base import Session
from omni_export.runtime_py.events import AudioChunk, Event, Stats, TextDelta
from omni_export.runtime_py.image import preprocess_image
from omni_export.runtime_py.video import read_frames, video_config
from omni_export.runtime_py.kv_cache import KVStack
from omni_export.runtime_py.prompt import (
    merge_placeholders,
    turn_ids,
)
from omni_export.runtime_py.sampler import sample
from omni_export.runtime_py.speech import SPEECH
from omni_export.runtime_py.timing import Recorder, TimedSession, symbolic_axes
from omni_export.runtime_py.vad import EnergyVAD, VADConfig

CONTEXT_POLICIES = ("error", "reset")
FRAMES_PER_S = 100  # both front ends (Whisper log-mel, Kaldi fbank) shift by 10 ms
MIN_TAIL_S = 0.1  # a last window shorter than this adds nothing an encoder can use


@dataclass
class Reply:
    text: str
    token_ids: list[int]
    audio: np.ndarray
    sample_rate: int
    prompt_tokens: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    stats: Stats | None = None


@dataclass
class _Turn:
    """What the user has given so far this turn."""

    unencoded: list[np.ndarray] = field(default_factory=list)  # audio not yet through the encoder

    @property
    def pending(self) -> int:
        return sum(len(x) for x in self.unencoded)

    audio_tokens: list[torch.Tensor] = field(default_factory=list)
    visual: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # (label, tokens) per image or frame
    text: str = ""
    end_t: float | None = None
    start_t: float = field(default_factory=time.perf_counter)
    resampler: StreamResampler | None = None  # microphone audio at another rate, resampled as a stream


class Pipeline:
    def __init__(self, sessions: dict[str, Session], components: dict[str, ComponentEntry], config: dict[str, Any],
                 tokenizer: Any, assets: dict[str, np.ndarray], context_policy: str = "error",
                 vad: VADConfig | None = None, audio_window_frames: int | None = None,
                 asset_files: dict[str, Path] | None = None) -> None:  # fmt: skip
        if context_policy not in CONTEXT_POLICIES:
            raise ConfigError(f"context policy {context_policy!r} is not one of {CONTEXT_POLICIES}")
        self.recorder = Recorder()
        self.raw_sessions = sessions
        self.sessions = {n: TimedSession(s, n, self.recorder, symbolic_axes(components[n].methods) if n in components else {}) for n, s in sessions.items()}
        self.components, self.config = components, config
        self.tokenizer, self.assets = tokenizer, assets
        self.asset_files = dict(asset_files or {})
        self.voice: np.ndarray | None = None  # a cloned voice's speaker embedding (set_voice); None: the default voice
        self.voice_prompt = None  # its prompt speech (tokens, mel) where the model has a speech tokenizer
        self.context_policy = context_policy
        self.vad_config = vad or VADConfig()
        self.window = audio_window_frames or config.get("max_audio_frames") or 3000
        self._stacks: dict[str, KVStack] = {}
        self.llm = self.stack("llm")
        self.turns = 0
        self.reset()

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_bundle(cls, path: str | Path, backend: str | None = None, **kwargs: Any) -> Pipeline:
        """Open a bundle; it must pass verify (a bundle that does not match its manifest is refused).
        ``backend``: run every component there instead of on the manifest's backend; ``parity``:
        on each component's parity backend (a TensorRT bundle's exact graphs on ONNX Runtime)."""
        from tokenizers import Tokenizer

        from omni_export.bundle import verify_bundle
        from omni_export.bundle.manifest import BundleError, read_manifest
        from omni_export.runtime_py.backends import open_session

        path = Path(path)
        problems = verify_bundle(path)
        if problems:
            raise BundleError(f"{path} fails verify ({len(problems)} problem(s)): " + "; ".join(problems[:5]))
        m = read_manifest(path)
        pick = (lambda c: c.parity_backend or None) if backend == "parity" else (lambda c: backend)  # noqa: E731
        sessions = {name: open_session(c, path, m.profile.runtime, backend=pick(c)) for name, c in m.components.items()}

        def read(rel: str, load):  # type: ignore[no-untyped-def]
            try:
                return load(str(path / rel))
            except Exception as exc:  # numpy and tokenizers raise their own types for a damaged file
                raise BundleError(f"cannot read {rel} from {path}: {str(exc)[:160]}. The file is damaged; rebuild the bundle.") from None

        assets = {k: read(rel, lambda f: np.load(f, allow_pickle=False)) for k, rel in m.model.get("assets", {}).items()}
        tokenizer = read("tokenizer/tokenizer.json", Tokenizer.from_file)
        files = {k: path / rel for k, rel in m.model.get("asset_files", {}).items()}
        return cls(sessions, m.components, m.model, tokenizer, assets, asset_files=files, **kwargs)

    def stack(self, component: str) -> KVStack:
        if component not in self._stacks:
            kv = self.components[component].kv_cache
            self._stacks[component] = KVStack(component, self.sessions[component], self.config["prefill_chunk"],
                                              self.config["max_context"], kv.methods if kv else ("prefill", "decode"))  # fmt: skip
        return self._stacks[component]

    # -- conversation state ---------------------------------------------------------------------
    @property
    def position(self) -> int:
        """Tokens of the conversation in the LLM's KV cache."""
        return self.llm.position

    def set_voice(self, reference: str | Path | np.ndarray | None) -> None:
        """Speak in the voice of ``reference`` (a recording: a file, or 16 kHz mono samples), as
        CosyVoice2's zero-shot front end prepares it: its speaker embedding, and where the model
        ships CosyVoice2's speech tokenizer also its prompt speech (tokens and mel) for the flow;
        None: the default voice."""
        if reference is None:
            self.voice, self.voice_prompt = None, None
            return
        speech = self.config.get("speech", {})
        if speech.get("kind") != "cosyvoice2":
            raise InputError(f"this model's speech decoder ({speech.get('kind', 'none')}) takes no reference voice; "
                             "voice cloning needs a CosyVoice2-style decoder with a speaker encoder (InteractiveOmni)")  # fmt: skip
        if "speaker_encoder" not in self.asset_files:
            raise InputError("this model has no speaker encoder (the checkpoint had no campplus.onnx beside its weights), so it "
                             "cannot clone a voice; add the release's campplus.onnx to the checkpoint (and rebuild a bundle from it)")  # fmt: skip
        from omni_export.runtime_py.voice import SAMPLE_RATE, SpeakerEncoder, SpeechTokenizer, voice_prompt

        enc = SpeakerEncoder(self.asset_files["speaker_encoder"], speech["speaker_dim"])
        wav = check_samples(reference, "the reference voice") if isinstance(reference, np.ndarray) else read_audio(reference, SAMPLE_RATE)
        embedding = enc.embed(wav)
        prompt = None
        if "speech_tokenizer" in self.asset_files:  # CosyVoice2's zero-shot flow input: the prompt's tokens and mel
            prompt = voice_prompt(SpeechTokenizer(self.asset_files["speech_tokenizer"], speech["speech_vocab"]), wav,
                                  speech["token_mel_ratio"])  # fmt: skip
        self.voice, self.voice_prompt = embedding, prompt

    def reset(self) -> None:
        """A new conversation: empty KV cache, nothing pending."""
        self.llm.reset()
        self.turns = 0
        self._turn = _Turn()
        self._vad = EnergyVAD(self.config["audio_sample_rate"], self.vad_config)
        self._interrupted = False

    def interrupt(self) -> None:
        """Barge-in: the running ``respond_stream`` yields no further text or audio."""
        self._interrupted = True

    # -- the user's turn ------------------------------------------------------------------------
    def push_audio(self, samples: np.ndarray, sample_rate: int | None = None) -> bool:
        """Add a chunk of microphone audio (mono float32; resampled when ``sample_rate`` differs).
        Encodes every encoder window that is complete. Returns True once the VAD hears the end of
        the turn (the caller may keep pushing; ``end_turn`` or ``respond_stream`` ends it)."""
        sr = self.config["audio_sample_rate"]
        wav = check_samples(samples, "audio chunk")
        turn = self._turn
        if (sample_rate or sr) != sr:
            # one resampler per turn and rate, its filter state carried from chunk to chunk
            if turn.resampler is None or turn.resampler.sr != sample_rate:
                self._flush_resampler()
                turn.resampler = StreamResampler(sample_rate, sr, "audio chunk")  # type: ignore[arg-type]
            wav = turn.resampler.push(wav)
        turn.unencoded.append(wav)
        window = self.window * sr // FRAMES_PER_S
        while turn.pending >= window:
            self._encode_pending(window)
        return self._vad.push(wav) if wav.size else False

    def _flush_resampler(self) -> None:
        turn = self._turn
        if turn.resampler is not None:
            turn.unencoded.append(turn.resampler.flush())
            turn.resampler = None

    def _encode_pending(self, n: int) -> None:
        turn = self._turn
        pending = np.concatenate(turn.unencoded)
        turn.unencoded = [pending[n:]] if len(pending) > n else []
        turn.audio_tokens.append(self.encode_audio(pending[:n]))

    def add_image(self, image: str | Path | Any, max_tiles: int | None = None) -> int:
        """Encode an image (a path or a PIL image) for this turn. Returns the tokens it adds."""
        tokens = self.encode_image(image, max_tiles)
        self._turn.visual.append(("", tokens))
        return tokens.shape[0]

    def add_video(self, video: str | Path) -> int:
        """Encode a clip for this turn: the frames the family's rule picks (``video`` runtime
        config), one tile each, labelled or joined as its release prompts them. Returns the
        tokens it adds."""
        raw = self.config.get("video")
        if raw is None:
            raise VideoInputError("this model takes no video: its runtime config has no video section (a bundle built "
                                  "before video input needs rebuilding with omni-export --target ...)")  # fmt: skip
        cfg = video_config(raw)
        frames = [self.encode_image(f, max_tiles=1) for f in read_frames(video, cfg)]
        if cfg.joined:
            self._turn.visual.append(("", torch.cat(frames)))
        else:
            self._turn.visual.extend((cfg.frame_label.format(i=i), t) for i, t in enumerate(frames, 1))
        return sum(t.shape[0] for t in frames)

    def add_text(self, text: str) -> None:
        self._turn.text += text

    def end_turn(self, t: float | None = None) -> float:
        """The user has finished (explicitly, or the VAD said so): encode what audio is left. The
        latency figures are measured from here."""
        turn = self._turn
        if turn.end_t is None:
            turn.end_t = self.recorder.mark("audio_end", t)
            self._flush_resampler()
            sr = self.config["audio_sample_rate"]
            if turn.pending and (turn.pending >= MIN_TAIL_S * sr or not turn.audio_tokens):
                self._encode_pending(turn.pending)
        return turn.end_t

    # -- encoders -------------------------------------------------------------------------------
    def encode_audio(self, wav: np.ndarray) -> torch.Tensor:
        """16 kHz mono, at most one encoder window -> LLM-width audio tokens [N, H]."""
        feats = self.sessions["audio_frontend"].run("forward", [torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))])[0]
        axis = self._axis("audio_encoder", "forward", "features", "frames")
        if feats.shape[axis] < 1:
            raise AudioInputError(f"audio of {len(wav)} samples is too short to give one feature frame; give at least 0.1 s")
        multiple = self.config.get("audio_frames_multiple", 1)
        pad_to = self.config.get("audio_pad_samples")
        if pad_to and len(wav) < pad_to:
            # The release's encoder sees every clip padded with silence to a fixed window; the
            # tokens past the clip's own frames are dropped, as padding-aware releases do.
            real = feats.shape[axis]
            padded = np.zeros(pad_to, dtype=np.float32)
            padded[: len(wav)] = wav
            feats = pad_to_multiple(self.sessions["audio_frontend"].run("forward", [torch.from_numpy(padded)])[0], axis, multiple)
            tokens = self.sessions["audio_encoder"].run("forward", [feats.contiguous()])[0][0]
            return tokens[: -(-real * tokens.shape[0] // feats.shape[axis])]  # the clip's own share, rounded up
        feats = pad_to_multiple(feats, axis, multiple)  # whole strides only
        return self.sessions["audio_encoder"].run("forward", [feats.contiguous()])[0][0]

    def encode_image(self, image: str | Path | Any, max_tiles: int | None = None) -> torch.Tensor:
        cfg = self.config["image"]
        tiles = torch.from_numpy(preprocess_image(image, cfg["tile_size"], max_tiles or cfg["max_tiles"]))
        step = cfg.get("tiles_per_call") or len(tiles)  # the encoder is traced (and planned) for this many
        return torch.cat([self.sessions["vision_encoder"].run("forward", [tiles[i : i + step]])[0] for i in range(0, len(tiles), step)])

    def _axis(self, component: str, method: str, name: str, dim: str) -> int:
        shape = next(t.shape for t in self.components[component].methods[method].inputs if t.name == name)
        return shape.index(dim)

    # -- the answer -----------------------------------------------------------------------------
    def _prompt_ids(self, fresh: bool) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
        turn, p = self._turn, self.config["prompt"]
        image = torch.cat([t for _, t in turn.visual]) if turn.visual else None
        audio = torch.cat(turn.audio_tokens) if turn.audio_tokens else None
        runs = [(label, t.shape[0]) for label, t in turn.visual]
        ids = turn_ids(self.tokenizer, p, fresh, runs, 0 if audio is None else audio.shape[0], turn.text)
        return ids, image, audio

    @torch.inference_mode()
    def respond_stream(self, max_new_tokens: int = 64, top_k: int = 1, seed: int = 0, speech: bool = True) -> Iterator[Event]:
        """End the turn (if not yet), answer it, and yield events as they happen."""
        turn = self._turn
        if not (turn.audio_tokens or turn.visual or turn.text or turn.pending):
            raise InputError("nothing to answer: push audio, add an image, a video or text first")
        self.end_turn()
        cfg, llm = self.config, self.llm
        ids, image, audio = self._prompt_ids(fresh=self.position == 0)
        reset = False
        if self.position + len(ids) + max_new_tokens > llm.max_len:
            fresh_ids = ids if self.position == 0 else self._prompt_ids(fresh=True)[0]
            if len(fresh_ids) + max_new_tokens > llm.max_len:
                raise ContextOverflowError(
                    f"this turn needs {len(fresh_ids)} prompt tokens + {max_new_tokens} new tokens, more than the "
                    f"KV cache's {llm.max_len}; shorten the audio, use fewer image tiles or lower max_new_tokens."
                )
            if self.context_policy == "error":
                raise ContextOverflowError(
                    f"the conversation holds {self.position} tokens; this turn needs {len(ids)} + {max_new_tokens} more, "
                    f"beyond the KV cache's {llm.max_len}. Call reset() to start a new conversation (nothing was "
                    "changed), or open the pipeline with context_policy='reset' to drop the history automatically."
                )
            llm.reset()
            ids, reset = fresh_ids, True
        self._interrupted = False
        ids_t = torch.tensor([ids])
        embeds = self.sessions["llm"].run("embed", [ids_t])[0]
        for feats, token_id in ((image, cfg["image_token_id"]), (audio, cfg["audio_token_id"])):
            if feats is not None:
                embeds = merge_placeholders(embeds, ids_t, feats, token_id)
        logits = llm.feed(embeds)[0]
        stream = SPEECH.get(cfg["speech"]["kind"])(self, seed) if speech else None
        gen = torch.Generator().manual_seed(seed)
        out_ids: list[int] = []
        text, first_text, first_audio, audio_n, chunk_i = "", None, None, 0, 0

        def play(pieces: Iterator[np.ndarray]) -> Iterator[AudioChunk]:
            nonlocal first_audio, audio_n, chunk_i
            for pcm in pieces:
                if self._interrupted:  # barge-in: the piece in hand is never played
                    return
                ev = AudioChunk(pcm, cfg["output_sample_rate"], chunk_i, time.perf_counter())
                first_audio, audio_n, chunk_i = first_audio or ev.t, audio_n + len(pcm), chunk_i + 1
                yield ev

        for _ in range(max_new_tokens):
            if self._interrupted:
                break
            tok = sample(logits[0, -1], top_k, gen)
            if tok in cfg["eos_ids"]:
                break
            out_ids.append(tok)
            # Fed before it is shown: whatever the caller does next, the cache holds every token it saw.
            logits, hidden = llm.feed(self.sessions["llm"].run("embed", [torch.tensor([[tok]])])[0])[:2]
            new_text, delta = self.tokenizer.decode(out_ids, skip_special_tokens=True), ""
            if not new_text.endswith("\ufffd"):  # hold back a multi-byte character until it is whole
                delta, text = new_text[len(text) :], new_text
            ev = TextDelta(delta, tok, time.perf_counter())
            first_text = first_text or ev.t
            yield ev
            if stream is not None and not self._interrupted:
                yield from play(stream.push(tok, hidden))
        if stream is not None and not self._interrupted and out_ids:
            yield from play(stream.finish())
        if first_audio is not None:
            self.recorder.mark("first_audio", first_audio)
        yield self._stats(turn, ids, out_ids, text, first_text, first_audio, audio_n, reset, stream)
        self.turns += 1
        self._turn = _Turn()
        self._vad.reset()

    def _stats(self, turn: _Turn, ids: list[int], out_ids: list[int], text: str, first_text: float | None,
               first_audio: float | None, audio_n: int, reset: bool, stream: Any) -> Stats:  # fmt: skip
        spans = self.recorder.since(turn.start_t)
        stage: dict[str, float] = {}
        for s in spans:
            stage[s.stage] = stage.get(s.stage, 0.0) + s.ms
        decode = [s for s in spans if s.component == "llm" and s.method == "decode"]
        decode_s = sum(s.t1 - s.t0 for s in decode)
        speech_parts = stream.components if stream is not None else ()
        t_end = turn.end_t or 0.0
        return Stats(
            turn=self.turns, prompt_tokens=len(ids), position=self.position, new_tokens=len(out_ids), text=text,
            ttft_ms=None if first_text is None else (first_text - t_end) * 1000,
            ttfa_ms=None if first_audio is None else (first_audio - t_end) * 1000,
            decode_tok_s=len(decode) / decode_s if decode_s else None,
            audio_s=audio_n / self.config["output_sample_rate"],
            speech_compute_s=sum(s.t1 - s.t0 for s in spans if s.component in speech_parts and s.t0 >= t_end),
            interrupted=self._interrupted, context_reset=reset, stage_ms=stage,
        )  # fmt: skip

    # -- one-shot convenience -------------------------------------------------------------------
    def respond(self, audio: str | Path | np.ndarray | None = None, image: str | Path | None = None, text: str | None = None,
                max_new_tokens: int = 32, top_k: int = 1, seed: int = 0, speech: bool = True,
                video: str | Path | None = None) -> Reply:  # fmt: skip
        """A new conversation of one turn, collected: the streaming path, all at once."""
        if audio is None and image is None and video is None and not text:
            raise InputError("nothing to answer: give audio, an image, a video or text")
        self.reset()
        if audio is not None:
            sr = self.config["audio_sample_rate"]
            self.push_audio(read_audio(audio, sr) if isinstance(audio, (str, Path)) else audio, sr)
        if image is not None:
            self.add_image(image)
        if video is not None:
            self.add_video(video)
        if text:
            self.add_text(text)
        return collect(self.respond_stream(max_new_tokens, top_k, seed, speech), self.config["output_sample_rate"])


def collect(events: Iterator[Event], sample_rate: int) -> Reply:
    ids: list[int] = []
    pcm: list[np.ndarray] = []
    stats = None
    for ev in events:
        if isinstance(ev, TextDelta):
            ids.append(ev.token_id)
        elif isinstance(ev, AudioChunk):
            pcm.append(ev.pcm)
        else:
            stats = ev
    audio = np.concatenate(pcm).astype(np.float32) if pcm else np.zeros(0, dtype=np.float32)
    return Reply(stats.text, ids, audio, sample_rate, stats.prompt_tokens, dict(stats.stage_ms), stats)
