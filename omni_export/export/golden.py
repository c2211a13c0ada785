"""Golden calls per component class: realistic inputs (real tokens through the tokenizer, a
voiced signal, an image pattern), replayed on the fp32 eager module and on an fp16 copy.
Autoregressive stacks are teacher-forced: a prefill, then decode steps fed the reference's own
greedy continuation, so every backend sees identical inputs."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from omni_export.bundle.golden import GoldenCall
from omni_export.export.components.codec import CodecDecoder
from omni_export.export.components.flow import FlowDecoder
from omni_export.export.components.hifigan import HiFiGAN
from omni_export.export.components.internvit import VisionEncoder
from omni_export.export.components.qwen import QwenForCausalLM, QwenModel
from omni_export.export.components.speech_lm import SpeechLM
from omni_export.export.components.vita_tts import VitaTTSAr, VitaTTSNar
from omni_export.export.components.whale import WhaleAudioEncoder
from omni_export.export.components.whisper import WhisperAudioEncoder
from omni_export.export.families.common import encode
from omni_export.export.trace import prepare
from omni_export.export.trace_specs import Limits, method_specs
from omni_export.registry import ClassRegistry
from omni_export.runtime_py.audio import KaldiFbank, WhisperLogMel, pad_to_multiple
from omni_export.runtime_py.backends.eager import EagerSession
from omni_export.runtime_py.prompt import chat_prompt

DECODE_STEPS = 32
GOLDEN_TEXT = "Describe the picture and answer the spoken question in one short sentence."
Script = list[tuple[str, tuple[torch.Tensor, ...]]]


@dataclass
class Context:
    tokenizer: Any
    limits: Limits
    seed: int = 0


def eager_session(module: nn.Module, limits: Limits) -> tuple[EagerSession, dict[str, tuple[list[str], list[str]]]]:
    """The component's traced methods, run eagerly: the same wrappers torch.export saw."""
    session, specs = eager_methods(module, limits)
    return session, {s.name: ([t.name for t in s.inputs], [t.name for t in s.outputs]) for s in specs}


def eager_methods(module: nn.Module, limits: Limits) -> tuple[EagerSession, list]:  # list[MethodSpec]
    prepare(module, limits)
    specs = method_specs(module, limits)

    def reset() -> None:
        for m in module.modules():
            if isinstance(m, QwenModel) and m.cache_len:
                m.reset_cache()

    first = next(module.parameters(), None)
    dtype, device = (None, None) if first is None else (first.dtype, first.device)
    return EagerSession({s.name: s.module for s in specs}, reset, dtype, device), specs


def voiced_signal(seconds: float, sr: int = 16000) -> torch.Tensor:
    """A vowel-like test signal: 120 Hz harmonics under formant-shaped gains, with a slow glide."""
    t = torch.arange(int(seconds * sr)) / sr
    f0 = 120 + 20 * torch.sin(2 * math.pi * 0.5 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / sr
    formants = torch.tensor([700.0, 1200.0, 2600.0])
    wav = sum(
        torch.exp(-((k * 120 - formants) ** 2).min() / (2 * 200.0**2)) * torch.sin(k * phase) for k in range(1, 30)
    )
    return (0.3 * wav / wav.abs().max()).float()


def image_tiles(n: int, size: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    tiles = [torch.stack([torch.sin(3 * x + i), torch.cos(2 * y - i), x * y]) * 1.5 for i in range(n)]
    return torch.stack(tiles)


SCRIPTS: ClassRegistry[Callable[[nn.Module, Context, EagerSession], Script]] = ClassRegistry("golden script")
register = SCRIPTS.register


@register(WhisperLogMel, KaldiFbank)
def _frontend(m, ctx, ref) -> Script:
    return [("forward", (voiced_signal(1.0),))]


@register(VisionEncoder)
def _vision(m: VisionEncoder, ctx, ref) -> Script:
    return [("forward", (image_tiles(2, m.cfg.image_size),))]


@register(WhisperAudioEncoder)
def _whisper(m: WhisperAudioEncoder, ctx, ref) -> Script:
    mel = WhisperLogMel(m.encoder.cfg.num_mel_bins)(voiced_signal(1.0))
    return [("forward", (pad_to_multiple(mel, -1, WhisperAudioEncoder.FRAME_MULTIPLE),))]


@register(WhaleAudioEncoder)
def _whale(m: WhaleAudioEncoder, ctx, ref) -> Script:
    return [("forward", (KaldiFbank(m.encoder.cfg.input_dim)(voiced_signal(1.0)),))]


def _teacher_forced(ref: EagerSession, prefix: torch.Tensor, embed: Callable[[int], torch.Tensor], allowed: int, steps: int) -> Script:
    """prefill(prefix), then ``steps`` decodes of the reference's own greedy continuation."""
    n = prefix.shape[1]
    script: Script = [("prefill", (prefix, torch.arange(n)))]
    logits = ref.run("prefill", script[0][1])[0]
    for i in range(steps):
        tok = int(logits[0, -1, :allowed].argmax())
        inputs = (embed(tok), torch.tensor([n + i]))
        script.append(("decode", inputs))
        logits = ref.run("decode", inputs)[0]
    ref.reset()
    return script


@register(QwenForCausalLM)
def _llm(m: QwenForCausalLM, ctx, ref) -> Script:
    ids = torch.tensor([encode(ctx.tokenizer, chat_prompt(GOLDEN_TEXT))])
    steps = min(DECODE_STEPS, ctx.limits.max_context - ids.shape[1])
    script = _teacher_forced(ref, ref.run("embed", (ids,))[0], lambda t: ref.run("embed", (torch.tensor([[t]]),))[0],
                             m.cfg.vocab_size, steps)  # fmt: skip
    return [("embed", (ids,)), *script]


@register(SpeechLM)
def _speech_lm(m: SpeechLM, ctx, ref) -> Script:
    g = torch.Generator().manual_seed(ctx.seed)
    c = m.cfg
    text = torch.randn(1, c.text_chunk, c.text_dim, generator=g)
    speech = torch.randint(0, c.speech_vocab, (1, 4), generator=g)
    sos = ref.run("embed_special", (torch.tensor([[0]]),))[0]
    prefix = torch.cat([sos, ref.run("embed_text", (text,))[0], ref.run("embed_speech", (speech,))[0]], 1)
    steps = min(16, ctx.limits.max_context - prefix.shape[1])
    script = _teacher_forced(ref, prefix, lambda t: ref.run("embed_speech", (torch.tensor([[t]]),))[0], c.speech_vocab, steps)
    return [("embed_special", (torch.tensor([[0]]),)), ("embed_text", (text,)), ("embed_speech", (speech,)), *script]


@register(FlowDecoder)
def _flow(m: FlowDecoder, ctx, ref) -> Script:
    g = torch.Generator().manual_seed(ctx.seed)
    c = m.cfg
    tokens = torch.randint(0, c.vocab, (1, 2 * c.token_chunk), generator=g)
    mu = ref.run("encode", (tokens,))[0]
    spk_in = m.default_speaker_embedding.detach().float()[None]
    spks = ref.run("speaker", (spk_in,))[0]
    x = torch.randn(mu.shape, generator=g)
    return [("encode", (tokens,)), ("speaker", (spk_in,)),
            ("step", (x, mu, torch.tensor([0.3]), torch.tensor(0.1), spks, torch.zeros_like(mu)))]  # fmt: skip


@register(HiFiGAN)
def _hifigan(m: HiFiGAN, ctx, ref) -> Script:
    g = torch.Generator().manual_seed(ctx.seed)
    mel = torch.randn(1, m.cfg.mel_bins, 40, generator=g) * 2 - 4  # log-mel range
    return [("forward", (mel,))]


@register(VitaTTSNar)
def _tts_nar(m: VitaTTSNar, ctx, ref) -> Script:
    g = torch.Generator().manual_seed(ctx.seed)
    return [("forward", (torch.randn(1, 12, m.cfg.input_dim, generator=g) * 0.02,))]


@register(VitaTTSAr)
def _tts_ar(m: VitaTTSAr, ctx, ref) -> Script:
    g = torch.Generator().manual_seed(ctx.seed)
    c = m.cfg
    context = torch.randn(1, 12, c.hidden_size, generator=g)
    bos = ref.run("embed_codes", (torch.tensor([[c.bos]]),))[0]
    prefix = torch.cat([context, bos], 1)
    steps = min(16, ctx.limits.max_context - prefix.shape[1])
    script = _teacher_forced(ref, prefix, lambda t: ref.run("embed_codes", (torch.tensor([[t]]),))[0], c.codebook_size, steps)
    return [("embed_codes", (torch.tensor([[c.bos]]),)), *script]


@register(CodecDecoder)
def _codec(m: CodecDecoder, ctx, ref) -> Script:
    g = torch.Generator().manual_seed(ctx.seed)
    codes = torch.randint(0, m.cfg.codebook_size, (1, 40), generator=g)
    return [("forward", (codes, m.default_global_codes.detach()[None].clone()))]


def _to_np(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().numpy() if x.is_floating_point() else x.detach().numpy()


def _counted(sess: EagerSession, script: Script) -> tuple[list[list[torch.Tensor]], list[int]]:
    """Run a script, counting each call's floating-point operations against weights: linear
    layers (mm, addmm) and convolutions. Attention's batched matmuls (bmm, sdpa) are left out: the
    reference attends over its whole static KV cache where a device kernel reads only the filled
    prefix, so counting them would lift the floor above what a device must do."""
    from torch.utils.flop_counter import FlopCounterMode

    outs, flops = [], []
    for method, inputs in script:
        with FlopCounterMode(display=False) as counter:
            outs.append(sess.run(method, inputs))
        per_op = counter.get_flop_counts().get("Global", {})
        flops.append(int(sum(n for op, n in per_op.items() if not any(k in str(op) for k in ("bmm", "scaled_dot_product")))))
    return outs, flops


def flops_per_position(script: Script, flops: list[int], methods: dict[str, dict]) -> dict[str, float]:
    """method -> operations per position of its first input's symbolic dims (tokens, frames,
    tiles), averaged over the script's calls: what a compute roofline multiplies a call's
    positions by."""
    from omni_export.runtime_py.timing import positions, symbolic_axes

    axes = symbolic_axes({"methods": methods})
    per: dict[str, list[float]] = {}
    for (method, inputs), f in zip(script, flops, strict=True):
        per.setdefault(method, []).append(f / max(positions(axes.get(method, []), inputs[0]), 1))
    return {m: float(np.mean(v)) for m, v in per.items()}


def method_flops(module: nn.Module, ctx: Context) -> dict[str, float]:
    """flops_per_position for an eager component (a checkpoint run without a bundle)."""
    ref32, specs = eager_methods(module, ctx.limits)
    with torch.inference_mode():
        script = SCRIPTS.lookup(module)(module, ctx, ref32)
        ref32.reset()
        _, flops = _counted(ref32, script)
        ref32.reset()
    return flops_per_position(script, flops, {s.name: s.manifest() for s in specs})


def make_golden(module: nn.Module, ctx: Context) -> tuple[list[GoldenCall], dict[str, tuple[list[str], list[str]]], Script, list[int]]:
    """Golden calls for one fp32 eager component, with fp32 and fp16 reference outputs; also the
    script and each call's operation count (for the roofline)."""
    ref32, io = eager_session(module, ctx.limits)
    with torch.inference_mode():
        script = SCRIPTS.lookup(module)(module, ctx, ref32)
        half = copy.deepcopy(module).half()
        ref16, _ = eager_session(half, ctx.limits)
        outs = {}
        ref32.reset()
        outs["fp32"], flops = _counted(ref32, script)
        ref16.reset()  # the fp16 session casts inputs itself
        outs["fp16"] = [ref16.run(method, inputs) for method, inputs in script]
        ref32.reset()
    calls = []
    for i, (method, inputs) in enumerate(script):
        in_names, out_names = io[method]
        calls.append(GoldenCall(
            method,
            {n: _to_np(x) for n, x in zip(in_names, inputs, strict=True)},
            {p: {n: _to_np(y) for n, y in zip(out_names, outs[p][i], strict=True)} for p in outs},
        ))  # fmt: skip
    return calls, io, script, flops
