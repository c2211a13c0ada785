"""VITA-1.5's speech decoder (LLM2TTSCodecAR): LLM text embeddings projected to the decoder width,
a bidirectional (non-autoregressive) Llama-layer stack, then an autoregressive Llama-layer stack
with a KV cache that emits codec tokens (1024 codes + pad/bos/eos)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from omni_export.export.components.base import Component, Role
from omni_export.export.components.qwen import QwenConfig, QwenModel
from omni_export.export.trace_specs import F32, I64, Call, DecoderStep, MethodSpec, Tensor, dim, dtype_of, lm_steps


@dataclass(frozen=True)
class VitaTTSConfig:
    input_dim: int
    hidden_size: int = 896
    num_heads: int = 14
    num_kv_heads: int = 2
    intermediate_size: int = 4864
    nar_layers: int = 4
    ar_layers: int = 8
    codebook_size: int = 1024
    rope_theta: float = 10000.0
    max_codec_per_text: int = 12
    top_k: int = 2

    @property
    def pad(self) -> int:
        return self.codebook_size

    @property
    def bos(self) -> int:
        return self.codebook_size + 1

    @property
    def eos(self) -> int:
        return self.codebook_size + 2

    def stack(self, layers: int) -> QwenConfig:
        return QwenConfig(
            vocab_size=0, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=layers, num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            head_dim=self.hidden_size // self.num_heads, rope_theta=self.rope_theta,
        )  # fmt: skip


class VitaTTSNar(Component, nn.Module):
    """Text embeddings -> input projection -> bidirectional stack (``tts_nar``)."""

    role = Role.DECODER

    def __init__(self, cfg: VitaTTSConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_proj = nn.Linear(cfg.input_dim, cfg.hidden_size)
        self.pre_nn = QwenModel(cfg.stack(cfg.nar_layers), with_embeddings=False, cached=False)

    def forward(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """[1, T, input_dim] -> [1, T, hidden]; every position sees every other."""
        x = self.input_proj(text_embeds)
        t = x.shape[1]
        full = torch.ones(t, t, dtype=torch.bool, device=x.device)
        return self.pre_nn(x, torch.arange(t, device=x.device), attn_mask=full)

    def export_methods(self, limits):  # type: ignore[no-untyped-def]
        c = self.cfg
        t = dim("text", 2, limits.max_text_chunk)  # a speech segment's text, never the whole context
        return [MethodSpec("forward", Call(self), (torch.randn(1, 8, c.input_dim, dtype=dtype_of(self)),), ({1: t},),
                           (Tensor("text_embeds", F32, (1, "text", c.input_dim)),), (Tensor("context", F32, (1, "text", c.hidden_size)),))]  # fmt: skip

    def golden_script(self, ctx, ref):  # type: ignore[no-untyped-def]
        g = torch.Generator().manual_seed(ctx.seed)
        return [("forward", (torch.randn(1, 12, self.cfg.input_dim, generator=g) * 0.02,))]


class VitaTTSAr(Component, nn.Module):
    """Autoregressive codec-token stack with KV cache (``tts_ar``)."""

    role = Role.DECODER

    def __init__(self, cfg: VitaTTSConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.ar = QwenModel(cfg.stack(cfg.ar_layers), with_embeddings=False)
        self.codec_embedding = nn.Embedding(cfg.codebook_size + 3, cfg.hidden_size)
        self.codec_head = nn.Linear(cfg.hidden_size, cfg.codebook_size + 3)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.codec_embedding(codes)

    def hidden(self, inputs_embeds: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.ar(inputs_embeds, input_pos)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.codec_head(hidden)

    def forward(self, inputs_embeds: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """AR step(s) through the cache -> codec logits [1, T, codebook + 3]."""
        return self.logits(self.hidden(inputs_embeds, input_pos))

    def export_methods(self, limits):  # type: ignore[no-untyped-def]
        c = self.cfg
        ids = dim("ids", 1, limits.max_context)
        outs = lambda n: (Tensor("logits", F32, (1, 1, c.codebook_size + 3)),)  # noqa: E731
        return [
            MethodSpec("embed_codes", Call(self, "embed_codes"), (torch.tensor([[1, 2]]),), ({1: ids},),
                       (Tensor("ids", I64, (1, "ids")),), (Tensor("embeds", F32, (1, "ids", c.hidden_size)),)),
            *lm_steps(DecoderStep(self), c.hidden_size, outs, limits, dtype_of(self)),
        ]  # fmt: skip

    def golden_script(self, ctx, ref):  # type: ignore[no-untyped-def]
        """A NAR-sized context, bos, then 16 teacher-forced codec steps."""
        from omni_export.export.golden import teacher_forced

        g = torch.Generator().manual_seed(ctx.seed)
        c = self.cfg
        context = torch.randn(1, 12, c.hidden_size, generator=g)
        bos = ref.run("embed_codes", (torch.tensor([[c.bos]]),))[0]
        prefix = torch.cat([context, bos], 1)
        steps = min(16, ctx.limits.max_context - prefix.shape[1])
        script = teacher_forced(ref, prefix, lambda t: ref.run("embed_codes", (torch.tensor([[t]]),))[0], c.codebook_size, steps)
        return [("embed_codes", (torch.tensor([[c.bos]]),)), *script]
