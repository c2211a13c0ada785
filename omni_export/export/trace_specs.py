"""What gets traced for each component class: its methods, example inputs, dynamic shapes and
named inputs/outputs with symbolic dims. A registry keyed by module class, so a new component
registers its own methods and tracing has no branches per component."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.export import Dim

from omni_export.export.components.codec import CodecDecoder
from omni_export.export.components.flow import FlowDecoder
from omni_export.export.components.hifigan import HiFiGAN
from omni_export.export.components.internvit import VisionEncoder
from omni_export.export.components.qwen import QwenForCausalLM, QwenModel
from omni_export.export.components.speech_lm import SpeechLM
from omni_export.export.components.vita_tts import VitaTTSAr, VitaTTSNar
from omni_export.export.components.whale import WhaleAudioEncoder
from omni_export.export.components.whisper import WhisperAudioEncoder
from omni_export.registry import ClassRegistry
from omni_export.runtime_py.audio import KaldiFbank, WhisperLogMel


@dataclass(frozen=True)
class Limits:
    """Upper bounds the traced graphs accept (and the runtime enforces)."""

    max_context: int = 1024
    # Prefill is traced up to this many tokens and longer prompts are prefilled chunk by chunk:
    # memory planning sizes a method for its largest shapes, and a full-context prefill would plan
    # attention scores and logits for the whole context (3.3 GB for the small demo at 4096).
    prefill_chunk: int = 256
    max_tiles: int = 13
    max_audio_s: int = 30
    max_speech_tokens: int = 1024
    max_text_chunk: int = 64


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # str = symbolic dim


@dataclass(frozen=True)
class MethodSpec:
    name: str
    module: nn.Module  # its forward is the method
    example_inputs: tuple[torch.Tensor, ...]
    dynamic_shapes: tuple | None
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    def manifest(self) -> dict[str, list[dict]]:
        """The method's I/O as the manifest records it."""
        as_dict = lambda t: {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}  # noqa: E731
        return {"inputs": [as_dict(t) for t in self.inputs], "outputs": [as_dict(t) for t in self.outputs]}


class Call(nn.Module):
    """Exposes one method of a component as ``forward`` (what torch.export traces). Every method
    of a component is wrapped the same way, so weights and KV buffers keep one name across methods
    and a multi-method program stores each once and shares the cache."""

    def __init__(self, module: nn.Module, method: str = "forward") -> None:
        super().__init__()
        self.module, self.method = module, method

    def forward(self, *args: torch.Tensor):  # type: ignore[no-untyped-def]
        return getattr(self.module, self.method)(*args)


class ResetCache(Call):
    """Zeroes every KV cache of the component. Shipping zeroed caches inside the file would cost a
    full cache image per method; a reset method costs nothing and also starts new conversations."""

    def forward(self) -> torch.Tensor:  # type: ignore[override]
        n = 0
        for m in self.module.modules():
            if isinstance(m, QwenModel) and m.cache_len:
                for i in range(m.cfg.num_hidden_layers):
                    getattr(m, f"k_cache_{i}").zero_()
                    getattr(m, f"v_cache_{i}").zero_()
                n += 1
        return torch.full((1,), n, dtype=torch.int64)


class LLMStep(Call):
    """Prefill and decode of a Qwen LM: embeddings at positions -> (logits, hidden)."""

    def forward(self, embeds: torch.Tensor, input_pos: torch.Tensor):  # type: ignore[no-untyped-def]
        hidden = self.module.model(embeds, input_pos)
        return self.module.logits(hidden), hidden


SPECS: ClassRegistry[Callable[[nn.Module, Limits], list[MethodSpec]]] = ClassRegistry("trace spec")
register = SPECS.register


def method_specs(module: nn.Module, limits: Limits) -> list[MethodSpec]:
    return SPECS.lookup(module)(module, limits)


F32, I64 = "float32", "int64"
_dims: dict[tuple[str, int, int], Dim] = {}


def dim(name: str, lo: int, hi: int) -> Dim:
    # One Dim object per (name, range) so specs that share a name share a symbol.
    key = (name, lo, hi)
    if key not in _dims:
        _dims[key] = Dim(name, min=lo, max=hi)
    return _dims[key]


def _dtype(m: nn.Module) -> torch.dtype:
    return next(m.parameters()).dtype


@register(WhisperLogMel)
def _logmel(m: WhisperLogMel, lim: Limits) -> list[MethodSpec]:
    n = dim("samples", 1600, lim.max_audio_s * m.sample_rate)
    return [MethodSpec("forward", Call(m), (torch.randn(16000) * 0.1,), ({0: n},),
                       (Tensor("wav", F32, ("samples",)),), (Tensor("features", F32, (1, m.n_mels, "frames")),))]  # fmt: skip


@register(KaldiFbank)
def _fbank(m: KaldiFbank, lim: Limits) -> list[MethodSpec]:
    n = dim("samples", 1600, lim.max_audio_s * m.sample_rate)
    return [MethodSpec("forward", Call(m), (torch.randn(16000) * 0.1,), ({0: n},),
                       (Tensor("wav", F32, ("samples",)),), (Tensor("features", F32, (1, "frames", m.n_mels)),))]  # fmt: skip


@register(VisionEncoder)
def _vision(m: VisionEncoder, lim: Limits) -> list[MethodSpec]:
    s = m.cfg.image_size
    tiles = dim("tiles", 1, lim.max_tiles)
    h = m.projector[-1].out_features
    return [MethodSpec("forward", Call(m), (torch.randn(2, 3, s, s, dtype=_dtype(m)),), ({0: tiles},),
                       (Tensor("pixels", F32, ("tiles", 3, s, s)),), (Tensor("tokens", F32, (f"tiles*{m.tokens_per_tile()}", h)),))]  # fmt: skip


@register(WhisperAudioEncoder)
def _whisper(m: WhisperAudioEncoder, lim: Limits) -> list[MethodSpec]:
    cfg = m.encoder.cfg
    quads = dim("frames_div4", 2, cfg.max_source_positions // 2)
    h = m.adapter.fc2.out_features
    return [MethodSpec("forward", Call(m), (torch.randn(1, cfg.num_mel_bins, 200, dtype=_dtype(m)),), ({2: 4 * quads},),
                       (Tensor("features", F32, (1, cfg.num_mel_bins, "frames")),), (Tensor("tokens", F32, (1, "frames/4", h)),))]  # fmt: skip


WHALE_MAX_FRAMES = 3000  # 30 s at 100 Hz; the runtime encodes longer audio in windows of this size


@register(WhaleAudioEncoder)
def _whale(m: WhaleAudioEncoder, lim: Limits) -> list[MethodSpec]:
    cfg = m.encoder.cfg
    frames = dim("frames", 16, min(lim.max_audio_s * 100, WHALE_MAX_FRAMES))
    h = m.adpter.project.out_features
    return [MethodSpec("forward", Call(m), (torch.randn(1, 200, cfg.input_dim, dtype=_dtype(m)),), ({1: frames},),
                       (Tensor("features", F32, (1, "frames", cfg.input_dim)),), (Tensor("tokens", F32, (1, "frames/8", h)),))]  # fmt: skip


def _lm_steps(step: Call, hidden_in: int, outs: Callable[[str | int], tuple[Tensor, ...]], lim: Limits, dtype) -> list[MethodSpec]:
    t = dim("tokens", 2, min(lim.prefill_chunk, lim.max_context))
    return [
        MethodSpec("reset_cache", ResetCache(step.module), (), None, (), (Tensor("stacks", I64, (1,)),)),
        MethodSpec("prefill", step, (torch.randn(1, 8, hidden_in, dtype=dtype), torch.arange(8)), ({1: t}, {0: t}),
                   (Tensor("embeds", F32, (1, "tokens", hidden_in)), Tensor("input_pos", I64, ("tokens",))), outs("tokens")),
        MethodSpec("decode", step, (torch.randn(1, 1, hidden_in, dtype=dtype), torch.tensor([8])), None,
                   (Tensor("embeds", F32, (1, 1, hidden_in)), Tensor("input_pos", I64, (1,))), outs(1)),
    ]  # fmt: skip


@register(QwenForCausalLM)
def _llm(m: QwenForCausalLM, lim: Limits) -> list[MethodSpec]:
    c = m.cfg
    ids = dim("ids", 1, lim.max_context)
    outs = lambda n: (Tensor("logits", F32, (1, n, c.vocab_size)), Tensor("hidden", F32, (1, n, c.hidden_size)))  # noqa: E731
    return [
        MethodSpec("embed", Call(m, "embed"), (torch.tensor([[1, 2, 3]]),), ({1: ids},),
                   (Tensor("ids", I64, (1, "ids")),), (Tensor("embeds", F32, (1, "ids", c.hidden_size)),)),
        *_lm_steps(LLMStep(m), c.hidden_size, outs, lim, _dtype(m)),
    ]  # fmt: skip


@register(SpeechLM)
def _speech_lm(m: SpeechLM, lim: Limits) -> list[MethodSpec]:
    c = m.cfg
    h = c.llm.hidden_size
    ids = dim("ids", 1, lim.max_context)
    text = dim("text", 1, lim.max_text_chunk)
    outs = lambda n: (Tensor("logits", F32, (1, n, c.out_vocab)),)  # noqa: E731
    return [
        MethodSpec("embed_text", Call(m, "embed_text"), (torch.randn(1, 5, c.text_dim, dtype=_dtype(m)),), ({1: text},),
                   (Tensor("text_states", F32, (1, "text", c.text_dim)),), (Tensor("embeds", F32, (1, "text", h)),)),
        MethodSpec("embed_speech", Call(m, "embed_speech"), (torch.tensor([[1, 2]]),), ({1: ids},),
                   (Tensor("ids", I64, (1, "ids")),), (Tensor("embeds", F32, (1, "ids", h)),)),
        MethodSpec("embed_special", Call(m, "llm_embedding"), (torch.tensor([[0]]),), None,
                   (Tensor("which", I64, (1, 1)),), (Tensor("embeds", F32, (1, 1, h)),)),
        *_lm_steps(Call(m), h, outs, lim, _dtype(m)),
    ]  # fmt: skip


@register(FlowDecoder)
def _flow(m: FlowDecoder, lim: Limits) -> list[MethodSpec]:
    c = m.cfg
    toks = dim("speech_tokens", 2, lim.max_speech_tokens)
    frames = dim("mel_frames", 2, lim.max_speech_tokens * c.token_mel_ratio)
    dt = _dtype(m)
    mel = lambda: torch.randn(1, c.mel_bins, 50, dtype=dt)  # noqa: E731
    mel_t = lambda n: Tensor(n, F32, (1, c.mel_bins, "mel_frames"))  # noqa: E731
    return [
        MethodSpec("encode", Call(m, "encode"), (torch.randint(0, c.vocab, (1, 25)),), ({1: toks},),
                   (Tensor("tokens", I64, (1, "speech_tokens")),), (Tensor("mu", F32, (1, c.mel_bins, "2*speech_tokens")),)),
        MethodSpec("speaker", Call(m, "speaker"), (torch.randn(1, c.spk_dim, dtype=dt),), None,
                   (Tensor("embedding", F32, (1, c.spk_dim)),), (Tensor("spks", F32, (1, c.mel_bins)),)),
        MethodSpec("step", Call(m, "step"), (mel(), mel(), torch.rand(1, dtype=dt), torch.tensor(0.1, dtype=dt), torch.randn(1, c.mel_bins, dtype=dt), mel()),
                   ({2: frames}, {2: frames}, None, None, None, {2: frames}),
                   (mel_t("x"), mel_t("mu"), Tensor("t", F32, (1,)), Tensor("dt", F32, ()), Tensor("spks", F32, (1, c.mel_bins)), mel_t("cond")),
                   (mel_t("x_next"),)),
    ]  # fmt: skip


@register(HiFiGAN)
def _hifigan(m: HiFiGAN, lim: Limits) -> list[MethodSpec]:
    c = m.cfg
    frames = dim("mel_frames", 2, lim.max_speech_tokens * 2)
    return [MethodSpec("forward", Call(m), (torch.randn(1, c.mel_bins, 50, dtype=_dtype(m)),), ({2: frames},),
                       (Tensor("mel", F32, (1, c.mel_bins, "mel_frames")),), (Tensor("wav", F32, (1, f"mel_frames*{c.hop}")),))]  # fmt: skip


@register(VitaTTSNar)
def _tts_nar(m: VitaTTSNar, lim: Limits) -> list[MethodSpec]:
    c = m.cfg
    t = dim("text", 2, lim.max_context)
    return [MethodSpec("forward", Call(m), (torch.randn(1, 8, c.input_dim, dtype=_dtype(m)),), ({1: t},),
                       (Tensor("text_embeds", F32, (1, "text", c.input_dim)),), (Tensor("context", F32, (1, "text", c.hidden_size)),))]  # fmt: skip


@register(VitaTTSAr)
def _tts_ar(m: VitaTTSAr, lim: Limits) -> list[MethodSpec]:
    c = m.cfg
    ids = dim("ids", 1, lim.max_context)
    outs = lambda n: (Tensor("logits", F32, (1, n, c.codebook_size + 3)),)  # noqa: E731
    return [
        MethodSpec("embed_codes", Call(m, "embed_codes"), (torch.tensor([[1, 2]]),), ({1: ids},),
                   (Tensor("ids", I64, (1, "ids")),), (Tensor("embeds", F32, (1, "ids", c.hidden_size)),)),
        *_lm_steps(Call(m), c.hidden_size, outs, lim, _dtype(m)),
    ]  # fmt: skip


@register(CodecDecoder)
def _codec(m: CodecDecoder, lim: Limits) -> list[MethodSpec]:
    c = m.cfg
    codes = dim("codes", 2, lim.max_speech_tokens)
    return [MethodSpec("forward", Call(m), (torch.randint(0, c.codebook_size, (1, 40)), torch.randint(0, c.global_vocab, (1, c.n_global))),
                       ({1: codes}, None),
                       (Tensor("codes", I64, (1, "codes")), Tensor("global_codes", I64, (1, c.n_global))),
                       (Tensor("wav", F32, (1, f"codes*{c.hop}")),))]  # fmt: skip
