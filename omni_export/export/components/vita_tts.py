"""VITA-1.5's speech decoder (LLM2TTSCodecAR): LLM text embeddings projected to the decoder width,
a bidirectional (non-autoregressive) Llama-layer stack, then an autoregressive Llama-layer stack
with a KV cache that emits codec tokens (1024 codes + pad/bos/eos)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from omni_export.export.components.qwen import QwenConfig, QwenModel


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


class VitaTTSNar(nn.Module):
    """Text embeddings -> input projection -> bidirectional stack (``tts_nar``)."""

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


class VitaTTSAr(nn.Module):
    """Autoregressive codec-token stack with KV cache (``tts_ar``)."""

    def __init__(self, cfg: VitaTTSConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.ar = QwenModel(cfg.stack(cfg.ar_layers), with_embeddings=False)
        self.codec_embedding = nn.Embedding(cfg.codebook_size + 3, cfg.hidden_size)
        self.codec_head = nn.Linear(cfg.hidden_size, cfg.codebook_size + 3)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.codec_embedding(codes)

    def forward(self, inputs_embeds: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """AR step(s) through the cache -> codec logits [1, T, codebook + 3]."""
        return self.codec_head(self.ar(inputs_embeds, input_pos))
