"""The audio front ends as components: the runtime's own feature extractors (runtime_py/audio.py,
which a device needs without the compile stack), exported as ``audio_frontend``."""

from __future__ import annotations

import torch

from omni_export.export.components.base import Component, Role
from omni_export.export.trace_specs import F32, Limits, MethodSpec, Tensor, dim
from omni_export.runtime_py.audio import KaldiFbank, WhisperLogMel


class _Frontend(Component):
    role = Role.FRONTEND
    sample_rate: int
    n_mels: int
    features_shape: tuple[int | str, ...]

    def export_methods(self, limits: Limits) -> list[MethodSpec]:
        from omni_export.export.trace_specs import Call

        n = dim("samples", 1600, limits.max_audio_s * self.sample_rate)
        return [MethodSpec("forward", Call(self), (torch.randn(16000) * 0.1,), ({0: n},),  # type: ignore[arg-type]
                           (Tensor("wav", F32, ("samples",)),), (Tensor("features", F32, self.features_shape),))]  # fmt: skip

    def golden_script(self, ctx, ref):  # type: ignore[no-untyped-def]
        from omni_export.export.golden import voiced_signal

        return [("forward", (voiced_signal(1.0),))]


class WhisperFrontend(_Frontend, WhisperLogMel):
    """Whisper log-mel: [1, n_mels, frames]."""

    @property
    def features_shape(self) -> tuple[int | str, ...]:  # type: ignore[override]
        return (1, self.n_mels, "frames")


class FbankFrontend(_Frontend, KaldiFbank):
    """Kaldi fbank (VITA's Whale): [1, frames, n_mels]."""

    @property
    def features_shape(self) -> tuple[int | str, ...]:  # type: ignore[override]
        return (1, "frames", self.n_mels)
