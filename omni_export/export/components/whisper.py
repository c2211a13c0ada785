"""Whisper encoder (parameter names as transformers' WhisperEncoder) and InteractiveOmni's pooling
adapter into the LLM width."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omni_export.errors import ConfigError
from omni_export.export.components.audio_encoder import AudioEncoderComponent
from omni_export.export.components.layers import merge_heads, sdpa, split_heads
from omni_export.export.trace_specs import F32, Call, MethodSpec, Tensor, dim, dtype_of


@dataclass(frozen=True)
class WhisperEncoderConfig:
    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    num_mel_bins: int = 128
    max_source_positions: int = 1500

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], where: str = "audio_config") -> WhisperEncoderConfig:
        if d.get("model_type") != "whisper":
            raise ConfigError(f"{where}.model_type must be 'whisper', got {d.get('model_type')!r}")
        try:
            return cls(**{k: d[k] for k in ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim")},
                       num_mel_bins=d.get("num_mel_bins", 128), max_source_positions=d.get("max_source_positions", 1500))
        except KeyError as exc:
            raise ConfigError(f"{where}: required key {exc} missing from the Whisper config") from None

    def to_hf(self) -> dict[str, Any]:
        return {
            "architectures": ["WhisperForConditionalGeneration"],
            "model_type": "whisper",
            "d_model": self.d_model,
            "encoder_layers": self.encoder_layers,
            "encoder_attention_heads": self.encoder_attention_heads,
            "encoder_ffn_dim": self.encoder_ffn_dim,
            "decoder_layers": self.encoder_layers,
            "decoder_attention_heads": self.encoder_attention_heads,
            "decoder_ffn_dim": self.encoder_ffn_dim,
            "num_mel_bins": self.num_mel_bins,
            "max_source_positions": self.max_source_positions,
            "activation_function": "gelu",
        }


class WhisperAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (split_heads(p(x), self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(merge_heads(sdpa(q, k, v, mask)))


class WhisperEncoderLayer(nn.Module):
    def __init__(self, cfg: WhisperEncoderConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.self_attn = WhisperAttention(d, cfg.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    """log-mel [1, n_mels, F] -> hidden [1, ceil(F/2), d_model] at 50 Hz."""

    def __init__(self, cfg: WhisperEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        self.layers = nn.ModuleList(WhisperEncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(d)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(features))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.embed_positions.weight[: x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class AudioPoolingAdapter(nn.Module):
    """Average-pool 2x (50 Hz -> 25 Hz; an odd last frame is dropped) then LayerNorm + 2-layer
    GELU MLP into the LLM width."""

    def __init__(self, d_audio: int, d_llm: int, pool: int = 2) -> None:
        super().__init__()
        self.pool = pool
        self.norm = nn.LayerNorm(d_audio)
        self.fc1 = nn.Linear(d_audio, d_llm)
        self.fc2 = nn.Linear(d_llm, d_llm)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        b, t, d = hidden.shape
        n = t // self.pool  # explicit sizes: avg_pool1d's decomposition adds an unprovable shape guard
        x = hidden[:, : n * self.pool].reshape(b, n, self.pool, d).mean(dim=2)
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class WhisperAudioEncoder(AudioEncoderComponent, nn.Module):
    """The InteractiveOmni audio component: Whisper encoder + pooling adapter, log-mel in,
    LLM-width tokens (25 Hz) out. Input frames come in multiples of ``FRAME_MULTIPLE`` (40 ms,
    the encoder's total stride), which keeps every length in the traced graph exact."""

    FRAME_MULTIPLE = 4

    def __init__(self, cfg: WhisperEncoderConfig, d_llm: int) -> None:
        super().__init__()
        self.encoder = WhisperEncoder(cfg)
        self.adapter = AudioPoolingAdapter(cfg.d_model, d_llm)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.encoder(features))

    @staticmethod
    def tokens_for_frames(frames: int) -> int:
        return frames // 4

    # -- as a component ---------------------------------------------------------------------
    def export_methods(self, limits):  # type: ignore[no-untyped-def]
        cfg = self.encoder.cfg
        quads = dim("frames_div4", 2, cfg.max_source_positions // 2)
        h = self.adapter.fc2.out_features
        return [MethodSpec("forward", Call(self), (torch.randn(1, cfg.num_mel_bins, 200, dtype=dtype_of(self)),), ({2: 4 * quads},),
                           (Tensor("features", F32, (1, cfg.num_mel_bins, "frames")),), (Tensor("tokens", F32, (1, "frames/4", h)),))]  # fmt: skip

    def features(self, wav: torch.Tensor) -> torch.Tensor:
        """16 kHz samples -> the log-mel this encoder reads, whole strides only."""
        from omni_export.runtime_py.audio import WhisperLogMel, pad_to_multiple

        mel = WhisperLogMel(self.encoder.cfg.num_mel_bins)(wav.float())
        return pad_to_multiple(mel, -1, self.FRAME_MULTIPLE).to(dtype_of(self))
