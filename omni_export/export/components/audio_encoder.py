"""What every audio encoder component knows the same way, whatever its features: its golden call
is one second of a voiced test signal, it calibrates on real speech (espeak-ng) through its own
front end, and it gives the LLM's calibration one spoken question's tokens. A subclass says how
16 kHz samples become its features (``features``)."""

from __future__ import annotations

import torch

from omni_export.export.components.base import Component, Role


class AudioEncoderComponent(Component):
    role = Role.ENCODER

    def features(self, wav: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def golden_script(self, ctx, ref):  # type: ignore[no-untyped-def]
        from omni_export.export.golden import voiced_signal

        return [("forward", (self.features(voiced_signal(1.0)).float(),))]

    def calibration(self, sources):  # type: ignore[no-untyped-def]
        from omni_export.quantize.calibrate import Calibration, speech

        feats = [self.features(torch.from_numpy(wav)) for wav in speech()]
        return Calibration(calls=[lambda f=f: self(f) for f in feats])  # type: ignore[operator]

    def calibration_tokens(self) -> torch.Tensor:
        from omni_export.quantize.calibrate import speech

        return self(self.features(torch.from_numpy(speech()[0])))  # type: ignore[operator]
