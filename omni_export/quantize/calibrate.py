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
from omni_export.export.components.internvit import VisionEncoder
from omni_export.export.components.qwen import QwenForCausalLM
from omni_export.export.components.whale import WhaleAudioEncoder
from omni_export.export.components.whisper import WhisperAudioEncoder
from omni_export.export.families.common import encode
from omni_export.registry import ClassRegistry
from omni_export.runtime_py.audio import (
    KaldiFbank,
    WhisperLogMel,
    pad_to_multiple,
    read_audio,
)
from omni_export.runtime_py.image import preprocess_image
from omni_export.runtime_py.prompt import chat_prompt

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


Builder = Callable[[nn.Module, Sources], Calibration]
BUILDERS: ClassRegistry[Builder] = ClassRegistry("calibration builder")


def calibration_for(module: nn.Module, sources: Sources) -> Calibration:
    if BUILDERS.find(module) is not None:
        return BUILDERS.lookup(module)(module, sources)
    return _golden(module, sources)


def _golden(module: nn.Module, sources: Sources) -> Calibration:
    """Components fed by another model: their golden script (generated inputs) is the calibration."""
    from omni_export.export.golden import SCRIPTS, Context, eager_session
    from omni_export.export.trace_specs import Limits

    limits = Limits(max_context=sources.max_tokens * 2)
    sess, _ = eager_session(module, limits)
    script = SCRIPTS.lookup(module)(module, Context(sources.tokenizer, limits), sess)

    def run_all() -> list[torch.Tensor]:
        sess.reset()
        outs = [y for method, args in script for y in sess.run(method, args)]
        sess.reset()
        return outs

    return Calibration(calls=[run_all])


def _tiles(module: VisionEncoder) -> torch.Tensor:
    return torch.from_numpy(preprocess_image(photo_path(), tile=module.cfg.image_size, max_num=4))


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype  # a bf16 checkpoint is calibrated as stored


@BUILDERS.register(VisionEncoder)
def _vision(module: VisionEncoder, sources: Sources) -> Calibration:
    tiles = _tiles(module).to(_dtype(module))
    return Calibration(calls=[lambda t=t: module(t[None]) for t in tiles])


def _features(module: nn.Module, wav: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(wav).float()
    if isinstance(module, WhisperAudioEncoder):
        mel = WhisperLogMel(module.encoder.cfg.num_mel_bins)(x)
        return pad_to_multiple(mel, -1, WhisperAudioEncoder.FRAME_MULTIPLE)
    return KaldiFbank(module.encoder.cfg.input_dim)(x)


@BUILDERS.register(WhisperAudioEncoder, WhaleAudioEncoder)
def _audio(module: nn.Module, sources: Sources) -> Calibration:
    feats = [_features(module, wav).to(_dtype(module)) for wav in speech()]
    return Calibration(calls=[lambda f=f: module(f) for f in feats])


@BUILDERS.register(QwenForCausalLM)
def _llm(module: QwenForCausalLM, sources: Sources) -> Calibration:
    """Chat-formatted paragraphs, plus one turn that carries a photo's and a spoken question's
    features from this checkpoint's own (float) encoders, as the model sees them in use."""
    paragraphs = text_split("train")
    step = max(1, len(paragraphs) // sources.samples)
    seqs = []
    with torch.no_grad():
        for para in paragraphs[::step][: sources.samples]:
            ids = encode(sources.tokenizer, chat_prompt(para))[: sources.max_tokens]
            seqs.append(module.embed(torch.tensor([ids])).float())
        parts = [module.embed(torch.tensor([encode(sources.tokenizer, chat_prompt("Look and listen:"))])).float()]
        vision = sources.components.get("vision_encoder")
        if isinstance(vision, VisionEncoder):
            parts.append(vision(_tiles(vision)[:1].to(_dtype(vision))).reshape(1, -1, module.cfg.hidden_size).float())
        audio = sources.components.get("audio_encoder")
        if isinstance(audio, (WhisperAudioEncoder, WhaleAudioEncoder)):
            feats = _features(audio, speech()[0]).to(_dtype(audio))
            parts.append(audio(feats).reshape(1, -1, module.cfg.hidden_size).float())
        if len(parts) > 1:
            seqs.append(torch.cat(parts, 1)[:, : sources.max_tokens].float())
    return Calibration(sequences=seqs)
