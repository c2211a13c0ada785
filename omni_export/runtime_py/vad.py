"""End of turn from the microphone: a simple energy voice-activity detector.

Speech is a 20 ms frame whose RMS is ``margin_db`` above the noise floor (tracked as the running
minimum of quiet frames) and above an absolute floor; the turn ends after ``hangover_ms`` of
non-speech following at least ``min_speech_ms`` of speech. Enough for a push-to-talk-free demo;
an app would swap in a neural VAD behind the same ``push`` call."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class VADConfig:
    frame_ms: float = 20.0
    margin_db: float = 12.0
    floor_dbfs: float = -50.0
    hangover_ms: float = 600.0
    min_speech_ms: float = 200.0


class EnergyVAD:
    def __init__(self, sample_rate: int, config: VADConfig | None = None) -> None:
        self.cfg = config or VADConfig()
        self.frame = max(1, int(sample_rate * self.cfg.frame_ms / 1000))
        self.reset()

    def reset(self) -> None:
        self._rest = np.zeros(0, dtype=np.float32)
        self._noise_db = None
        self.speech_frames = 0
        self.silent_run = 0
        self.ended = False

    def _frames_for(self, ms: float) -> int:
        return max(1, round(ms / self.cfg.frame_ms))

    def push(self, samples: np.ndarray) -> bool:
        """Feed samples; True once the turn has ended (and from then on)."""
        x = np.concatenate([self._rest, np.asarray(samples, dtype=np.float32)])
        n = len(x) // self.frame
        self._rest = x[n * self.frame :]
        for frame in x[: n * self.frame].reshape(n, self.frame):
            db = 10 * np.log10(float(np.mean(frame.astype(np.float64) ** 2)) + 1e-12)
            if self._noise_db is None or db < self._noise_db:
                self._noise_db = db
            speech = db > max(self.cfg.floor_dbfs, self._noise_db + self.cfg.margin_db)
            if speech:
                self.speech_frames += 1
                self.silent_run = 0
            else:
                self.silent_run += 1
                self._noise_db += 0.05  # let the floor rise slowly if the room gets louder
            if self.speech_frames >= self._frames_for(self.cfg.min_speech_ms) and self.silent_run >= self._frames_for(self.cfg.hangover_ms):
                self.ended = True
        return self.ended
