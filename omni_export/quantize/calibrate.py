"""Calibration data, fed per component through the real preprocessing: pydoc's English text
through the checkpoint's tokenizer and chat template, a photo that ships with matplotlib through
the InternVL tiling, and espeak-ng speech through the audio front end. Components whose inputs
come from another model (speech decoders, vocoders) are calibrated on their golden scripts.

Text is split by topic: every tenth pydoc topic is held out for perplexity and never calibrated on."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from omni_export.errors import OmniExportError
from omni_export.runtime_py.audio import read_audio

HELD_OUT_EVERY = 10
SPOKEN = (
    "Please describe what you can see in this photograph.",
    "What is the weather like today, and should I take an umbrella?",
    "Tell me a short story about a cat who learns to read.",
)


class CalibrationError(OmniExportError):
    """Calibration data could not be produced (a missing tool or file)."""


def text_split(split: str) -> list[str]:
    """Paragraphs of pydoc's topics, ``train`` or ``heldout`` by topic (stable across runs)."""
    from pydoc_data.topics import topics

    out = []
    for i, key in enumerate(sorted(topics)):
        if (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == (split == "heldout"):
            out.extend(p.strip() for p in topics[key].split("\n\n") if len(p.strip()) > 80)
    return out


def photo_path() -> Path:
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not path.is_file():
        raise CalibrationError(f"calibration photo {path} is missing; reinstall matplotlib ({path.name} ships with it)")
    return path


@cache
def speech(sample_rate: int = 16000) -> tuple[np.ndarray, ...]:
    """Spoken sentences from espeak-ng, resampled to ``sample_rate``."""
    out = []
    with tempfile.TemporaryDirectory() as d:
        for i, sentence in enumerate(SPOKEN):
            out.append(read_audio(say(sentence, Path(d) / f"{i}.wav"), sample_rate))
    return tuple(out)


def say(sentence: str, wav: Path) -> Path:
    """Real speech for calibration, tests and demos: espeak-ng speaks ``sentence`` into ``wav``."""
    if shutil.which("espeak-ng") is None:
        raise CalibrationError("speech input needs espeak-ng: apt-get install espeak-ng (or quantize with method = rtn)")
    subprocess.run(["espeak-ng", "-w", str(wav), sentence], check=True, capture_output=True)
    return wav


@dataclass
class Calibration:
    """``calls`` run the eager component (while hooks watch its linears) and return its outputs;
    ``sequences`` are the embeddings entering an LLM's decoder stack, quantized layer by layer."""

    calls: list[Callable[[], Any]] = field(default_factory=list)
    sequences: list[torch.Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class Sources:
    """What a calibration builder may use besides its own module."""

    components: dict[str, nn.Module]
    tokenizer: Any
    samples: int = 8
    max_tokens: int = 256


def calibration_for(module: nn.Module, sources: Sources) -> Calibration:
    """The component says what it calibrates on (``Component.calibration``)."""
    from omni_export.export.components.base import component

    return component(module).calibration(sources)


def golden_calibration(module: nn.Module, sources: Sources) -> Calibration:
    """Components fed by another model: their golden script (generated inputs) is the calibration."""
    from omni_export.export.golden import Context, eager_session
    from omni_export.export.trace_specs import Limits

    limits = Limits(max_context=sources.max_tokens * 2)
    sess, _ = eager_session(module, limits)
    script = module.golden_script(Context(sources.tokenizer, limits), sess)  # type: ignore[attr-defined]

    def run_all() -> list[torch.Tensor]:
        sess.reset()
        outs = [y for method, args in script for y in sess.run(method, args)]
        sess.reset()
        return outs

    return Calibration(calls=[run_all])
