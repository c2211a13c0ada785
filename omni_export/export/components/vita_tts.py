"""VITA-1.5's speech decoder (``LLM2TTSCodecAR``), split into its two exported halves.

``tts_nar``: the LLM's input embeddings of a text segment, read as frames of the TTS width (the
release reshapes each token's 3584-wide embedding into four 896-wide frames, no projection),
through ``layers_pre_nn`` (half as many Llama layers as the AR stack, every frame seeing every
other, no norm after). ``tts_ar``: the prefix ``[embedding(bos), NAR output]`` runs through
``layers`` with no mask (it attends both ways), then ``sos`` starts autoregressive codec tokens
through the cache, ``norm`` and ``out_fnn`` (1024 codes + bos/sos/eos/pad) until ``eos``.

Module tree, names and ids follow the release (VITA-1.5 ``vita/model/vita_tts/decoder/
decoder.py`` and ``llm2tts.py``; sizes from ``vita_tts_ckpt/decoder/model.json``, Freeze-Omni's
file, which VITA-1.5's TTS is): Llama layers without bias and without grouped heads, RoPE base
10 000, RMSNorm eps 1e-6. ``layers_prefix`` (present when ``kv_cache_prefix_finetune`` is set)
is a path VITA-1.5's inference never takes (``prefix=None``): the loader skips it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from omni_export.errors import ConfigError
from omni_export.export.components.base import Component, Role
from omni_export.export.components.qwen import QwenConfig, QwenModel
from omni_export.export.trace_specs import F32, I64, Call, DecoderStep, MethodSpec, Tensor, dim, dtype_of, lm_steps

# model.json's third element: the release's key -> our field
_RELEASED_KEYS = {
    "transformer_attention_dim": "hidden_size", "transformer_attention_heads": "num_heads",
    "transformer_linear_units": "intermediate_size", "transformer_num_blocks": "num_blocks",
    "kv_cache_prefix_finetune": "kv_cache_prefix_finetune",
}  # fmt: skip


@dataclass(frozen=True)
class VitaTTSConfig:
    hidden_size: int = 896
    num_heads: int = 14
    intermediate_size: int = 4864
    num_blocks: int = 4  # AR layers; the NAR has half as many
    codebook_size: int = 1024
    kv_cache_prefix_finetune: bool = False
    rope_theta: float = 10000.0
    # ours, not the release's: a runtime bound on codec tokens per text token, and the demos' top-k
    max_codec_per_text: int = 12
    top_k: int = 2
    # the release's repetition penalty (llm2tts.py's defaults: off, 1.1 when a window is given):
    # logits of the ids among the last ``penalty_window`` generated (sos first) divided by ``penalty``
    penalty_window: int = -1
    penalty: float = 1.1

    def __post_init__(self) -> None:
        if self.num_blocks < 2 or self.hidden_size % self.num_heads:
            raise ConfigError(f"TTS: {self.num_blocks} blocks (needs 2 or more: the NAR has half) and width "
                              f"{self.hidden_size} over {self.num_heads} heads do not make a decoder")  # fmt: skip

    # the release's ids (decoder.py): bos = V, sos = V + 1, eos = V + 2, pad = V + 3
    @property
    def bos(self) -> int:
        return self.codebook_size

    @property
    def sos(self) -> int:
        return self.codebook_size + 1

    @property
    def eos(self) -> int:
        return self.codebook_size + 2

    @property
    def pad(self) -> int:
        return self.codebook_size + 3

    @property
    def vocab(self) -> int:
        return self.codebook_size + 4

    @classmethod
    def from_released(cls, data: Any, where: str) -> VitaTTSConfig:
        """model.json as released: ``[idim, odim, {transformer_*: ..., ...}]`` (training keys beside
        the ones read here are not ours)."""
        if not (isinstance(data, list) and len(data) == 3 and isinstance(data[2], dict)):
            raise ConfigError(f"{where}: expected the release's [idim, odim, {{...}}] list")
        idim, odim, args = data
        kw: dict[str, Any] = {ours: args[k] for k, ours in _RELEASED_KEYS.items() if k in args}
        kw.update({k: args[k] for k in ("rope_theta", "max_codec_per_text", "top_k", "penalty_window", "penalty") if k in args})
        cfg = cls(codebook_size=int(odim), **kw)
        if idim != cfg.hidden_size:
            raise ConfigError(f"{where}: idim {idim} must equal transformer_attention_dim {cfg.hidden_size} "
                              "(the embeddings go straight into the layers)")  # fmt: skip
        return cfg

    def to_released(self) -> list[Any]:
        args: dict[str, Any] = {k: getattr(self, ours) for k, ours in _RELEASED_KEYS.items()}
        args.update(encoder_output_dim=self.hidden_size, rope_theta=self.rope_theta,
                    max_codec_per_text=self.max_codec_per_text, top_k=self.top_k, penalty_window=self.penalty_window,
                    penalty=self.penalty)  # fmt: skip
        return [self.hidden_size, self.codebook_size, args]

    def stack(self, layers: int) -> QwenConfig:
        return QwenConfig(
            vocab_size=0, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=layers, num_attention_heads=self.num_heads, num_key_value_heads=self.num_heads,
            head_dim=self.hidden_size // self.num_heads, rope_theta=self.rope_theta, max_position_embeddings=2048,
        )  # fmt: skip

    def frames_per_token(self, llm_width: int) -> int:
        if llm_width % self.hidden_size:
            raise ConfigError(f"the LLM's embeddings ({llm_width} wide) do not split into frames of the TTS width {self.hidden_size}")
        return llm_width // self.hidden_size


class VitaTTSNar(Component, nn.Module):
    """Text frames -> ``layers_pre_nn`` (``tts_nar``), every frame seeing every other."""

    role = Role.DECODER

    def __init__(self, cfg: VitaTTSConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.pre_nn = QwenModel(cfg.stack(cfg.num_blocks // 2), with_embeddings=False, cached=False, final_norm=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """[1, F, width]: a segment's LLM input embeddings read as frames -> [1, F, width]."""
        f = frames.shape[1]
        full = torch.ones(f, f, dtype=torch.bool, device=frames.device)
        return self.pre_nn(frames, torch.arange(f, device=frames.device), attn_mask=full)

    def export_methods(self, limits):  # type: ignore[no-untyped-def]
        c = self.cfg
        # a speech segment's text (never the whole context) at up to 8 frames per token
        f = dim("frames", 2, 8 * limits.max_text_chunk)
        return [MethodSpec("forward", Call(self), (torch.randn(1, 8, c.hidden_size, dtype=dtype_of(self)),), ({1: f},),
                           (Tensor("frames", F32, (1, "frames", c.hidden_size)),), (Tensor("context", F32, (1, "frames", c.hidden_size)),))]  # fmt: skip

    def golden_script(self, ctx, ref):  # type: ignore[no-untyped-def]
        g = torch.Generator().manual_seed(ctx.seed)
        return [("forward", (torch.randn(1, 12, self.cfg.hidden_size, generator=g) * 0.02,))]


class VitaTTSAr(Component, nn.Module):
    """Codec tokens through ``layers`` with a KV cache (``tts_ar``); the prefix call attends both
    ways, as the release runs it unmasked."""

    role = Role.DECODER

    def __init__(self, cfg: VitaTTSConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.ar = QwenModel(cfg.stack(cfg.num_blocks), with_embeddings=False, whole_call=True)
        self.codec_embedding = nn.Embedding(cfg.vocab, cfg.hidden_size)
        self.codec_head = nn.Linear(cfg.hidden_size, cfg.vocab)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.codec_embedding(codes)

    def hidden(self, inputs_embeds: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.ar(inputs_embeds, input_pos)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.codec_head(hidden)

    def forward(self, inputs_embeds: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """AR step(s) through the cache -> codec logits [1, T, codebook + 4]."""
        return self.logits(self.hidden(inputs_embeds, input_pos))

    def export_methods(self, limits):  # type: ignore[no-untyped-def]
        c = self.cfg
        ids = dim("ids", 1, limits.max_context)
        outs = lambda n: (Tensor("logits", F32, (1, 1, c.vocab)),)  # noqa: E731
        return [
            MethodSpec("embed_codes", Call(self, "embed_codes"), (torch.tensor([[1, 2]]),), ({1: ids},),
                       (Tensor("ids", I64, (1, "ids")),), (Tensor("embeds", F32, (1, "ids", c.hidden_size)),)),
            *lm_steps(DecoderStep(self), c.hidden_size, outs, limits, dtype_of(self)),
        ]  # fmt: skip

    def golden_script(self, ctx, ref):  # type: ignore[no-untyped-def]
        """The release's order: prefix [bos, NAR-sized context] in one call, sos, then 16
        teacher-forced codec steps."""
        from omni_export.export.golden import teacher_forced

        g = torch.Generator().manual_seed(ctx.seed)
        c = self.cfg
        context = torch.randn(1, 12, c.hidden_size, generator=g)
        bos = ref.run("embed_codes", (torch.tensor([[c.bos]]),))[0]
        prefix = torch.cat([bos, context], 1)
        steps = min(16, ctx.limits.max_context - prefix.shape[1] - 1)
        embed = lambda t: ref.run("embed_codes", (torch.tensor([[t]]),))[0]  # noqa: E731
        script = teacher_forced(ref, prefix, embed, c.codebook_size, steps, start=c.sos)
        return [("embed_codes", (torch.tensor([[c.bos]]),)), *script]
