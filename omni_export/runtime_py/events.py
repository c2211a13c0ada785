"""What a streaming turn yields: text as it is decoded, audio as it is synthesized, and one Stats
at the end. Times are seconds on ``time.perf_counter``'s clock, so a caller can line them up
with its own."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class TextDelta:
    text: str  # the newly decodable text (may be empty while a multi-byte character is incomplete)
    token_id: int
    t: float


@dataclass(frozen=True)
class AudioChunk:
    pcm: np.ndarray  # float32 mono at sample_rate
    sample_rate: int
    index: int
    t: float

    @property
    def seconds(self) -> float:
        return len(self.pcm) / self.sample_rate


@dataclass(frozen=True)
class Stats:
    """One turn, measured from the end of the user's turn (``end_of_turn``)."""

    turn: int
    prompt_tokens: int  # tokens prefilled this turn (only the new ones: earlier turns stay cached)
    position: int  # tokens in the KV cache after the turn
    new_tokens: int
    text: str
    ttft_ms: float | None  # end of turn -> first text token
    ttfa_ms: float | None  # end of turn -> first audio chunk out
    decode_tok_s: float | None
    audio_s: float
    speech_compute_s: float
    interrupted: bool
    context_reset: bool  # the history was dropped to fit this turn (context policy "reset")
    stage_ms: dict[str, float] = field(default_factory=dict)  # per component.method, summed this turn

    @property
    def rtf(self) -> float | None:
        """Speech real-time factor: synthesis compute / audio produced (< 1 keeps up)."""
        return self.speech_compute_s / self.audio_s if self.audio_s else None

    def to_dict(self) -> dict:
        return {**asdict(self), "rtf": self.rtf}


Event = TextDelta | AudioChunk | Stats
