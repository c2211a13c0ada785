"""A scripted conversation (TOML): what ``omni-export run --turns`` plays and ``profile`` measures.

    chunk_ms = 160            # microphone chunk size
    [[turn]]
    audio = "q1.wav"          # paths are relative to the script
    image = "photo.jpg"
    text = ""
    max_new_tokens = 32
    barge_in_after_chunks = 2 # optional: interrupt after the 2nd audio chunk out
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from omni_export.configs import from_dict
from omni_export.errors import ConfigError, InputError
from omni_export.runtime_py.audio import read_audio
from omni_export.runtime_py.events import AudioChunk, Event, Stats


@dataclass(frozen=True)
class TurnSpec:
    audio: str | None = None
    image: str | None = None
    image_max_tiles: int | None = None
    video: str | None = None
    text: str | None = None
    max_new_tokens: int = 32
    barge_in_after_chunks: int | None = None
    end_of_turn: str = "vad"  # vad: the VAD ends the turn (or the audio's end); eof: the audio's end


@dataclass(frozen=True)
class Script:
    turn: tuple[TurnSpec, ...] = field(default_factory=tuple)
    chunk_ms: float = 160.0
    seed: int = 0
    top_k: int = 1
    speech: bool = True
    voice: str | None = None  # a reference recording: the reply speaks in that voice (voice cloning)

    def resolve(self, base: Path) -> Script:
        """Paths made absolute against ``base`` and checked, before any work."""
        voice = None
        if self.voice:
            voice = str((base / self.voice).resolve())
            if not Path(voice).is_file():
                raise InputError(f"voice file {voice} does not exist")
        turns = []
        for i, t in enumerate(self.turn, 1):
            if not (t.audio or t.image or t.video or t.text):
                raise ConfigError(f"turn {i} has no audio, image, video or text")
            if t.end_of_turn not in ("vad", "eof"):
                raise ConfigError(f"turn {i}: end_of_turn must be 'vad' or 'eof', got {t.end_of_turn!r}")
            paths = {k: str((base / v).resolve()) for k in ("audio", "image", "video") if (v := getattr(t, k))}
            for k, v in paths.items():
                if not Path(v).is_file():
                    raise InputError(f"turn {i}: {k} file {v} does not exist")
            turns.append(replace(t, **paths))
        if not turns:
            raise ConfigError("the script has no [[turn]]")
        return replace(self, turn=tuple(turns), voice=voice)


def load_script(path: str | Path) -> Script:
    import tomllib

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read the turn script {path}: {exc}") from None
    return from_dict(Script, data, where=str(path)).resolve(path.parent)


def script_toml(script: Script, base: Path) -> str:
    """Write a script back out with paths relative to ``base`` (so it travels with its files)."""
    import tomli_w

    def rel(v: str | None) -> str | None:
        return None if v is None else Path(v).resolve().relative_to(base.resolve()).as_posix()

    turns = [{k: v for k, v in {**t.__dict__, "audio": rel(t.audio), "image": rel(t.image), "video": rel(t.video)}.items() if v is not None} for t in script.turn]
    head = {"chunk_ms": script.chunk_ms, "seed": script.seed, "top_k": script.top_k, "speech": script.speech}
    return tomli_w.dumps({**head, **({"voice": rel(script.voice)} if script.voice else {}), "turn": turns})


def play(pipeline, script: Script, on_event: Callable[[int, Event], None] | None = None) -> Iterator[Stats]:  # type: ignore[no-untyped-def]
    """Run the script's turns on one conversation: audio pushed in real-time-sized chunks (end of
    turn by VAD or at the audio's end), images added, the answer streamed. Yields each turn's Stats."""
    sr = pipeline.config["audio_sample_rate"]
    if script.voice:
        pipeline.set_voice(script.voice)
    for i, t in enumerate(script.turn):
        if t.image:
            pipeline.add_image(t.image, t.image_max_tiles)
        if t.video:
            pipeline.add_video(t.video)
        if t.audio:
            wav = read_audio(t.audio, sr)
            step = max(1, int(sr * script.chunk_ms / 1000))
            for k in range(0, len(wav), step):
                if pipeline.push_audio(wav[k : k + step], sr) and t.end_of_turn == "vad":
                    break
        if t.text:
            pipeline.add_text(t.text)
        chunks = 0
        for ev in pipeline.respond_stream(t.max_new_tokens, script.top_k, script.seed + i, script.speech):
            if on_event is not None:
                on_event(i, ev)
            if isinstance(ev, AudioChunk):
                chunks += 1
                if t.barge_in_after_chunks is not None and chunks >= t.barge_in_after_chunks:
                    pipeline.interrupt()
            elif isinstance(ev, Stats):
                yield ev


def silence(seconds: float, sample_rate: int) -> np.ndarray:
    return np.zeros(int(seconds * sample_rate), dtype=np.float32)
