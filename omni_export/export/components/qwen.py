"""One Qwen decoder for Qwen3 (q/k RMSNorm, tied embeddings) and Qwen2/2.5 (qkv bias).

Parameter names match transformers' Qwen2/Qwen3ForCausalLM, so their state dicts load unchanged.
The KV cache is static ([1, kv_heads, max_len, head_dim] per layer) and written with index_copy_
at explicit positions: the same code serves ``prefill`` (many tokens) and ``decode`` (one token),
and traces with torch.export with the cache as mutable buffers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omni_export.errors import ConfigError, ContextOverflowError
from omni_export.export.components.layers import (
    RMSNorm,
    apply_rope,
    merge_heads,
    repeat_kv,
    rope_cos_sin,
    sdpa,
    split_heads,
)


@dataclass(frozen=True)
class QwenConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qk_norm: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 32768

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], where: str = "llm_config") -> QwenConfig:
        """Read a transformers Qwen2/Qwen3 config dict (keys transformers owns are not ours to reject)."""
        model_type = d.get("model_type")
        if model_type not in ("qwen2", "qwen3"):
            raise ConfigError(f"{where}.model_type must be 'qwen2' or 'qwen3', got {model_type!r}")
        required = [
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads",
        ]  # fmt: skip
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"{where}: required key(s) {missing} missing from the transformers config")
        rope = d.get("rope_parameters") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 1e6))
        heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d["num_key_value_heads"],
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rope_theta=float(theta),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qk_norm=model_type == "qwen3",
            # Qwen2 always has q/k/v bias; Qwen3 exposes it as attention_bias (False in releases).
            attention_bias=True if model_type == "qwen2" else bool(d.get("attention_bias", False)),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
        )

    def to_hf(self) -> dict[str, Any]:
        """The transformers config dict this config round-trips through."""
        qwen3 = self.qk_norm
        d: dict[str, Any] = {
            "architectures": ["Qwen3ForCausalLM" if qwen3 else "Qwen2ForCausalLM"],
            "model_type": "qwen3" if qwen3 else "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "use_sliding_window": False,
            "torch_dtype": "bfloat16",
        }
        if qwen3:
            d["attention_bias"] = self.attention_bias
        return d


class QwenAttention(nn.Module):
    def __init__(self, cfg: QwenConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_attention_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, h, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: tuple[torch.Tensor, torch.Tensor] | None,
        input_pos: torch.Tensor | None,
        kv_impl: str = "reference",
    ) -> torch.Tensor:
        cfg = self.cfg
        if cache is not None and kv_impl == "et_custom":
            return self._forward_et_custom(x, cos, sin, cache, input_pos)
        q = split_heads(self.q_proj(x), cfg.num_attention_heads)
        k = split_heads(self.k_proj(x), cfg.num_key_value_heads)
        v = split_heads(self.v_proj(x), cfg.num_key_value_heads)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k_cache, v_cache = cache
            k_cache.index_copy_(2, input_pos, k.to(k_cache.dtype))
            v_cache.index_copy_(2, input_pos, v.to(v_cache.dtype))
            k, v = k_cache.to(q.dtype), v_cache.to(q.dtype)
        n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
        out = sdpa(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), mask)
        return self.o_proj(merge_heads(out))


    def _forward_et_custom(self, x, cos, sin, cache, input_pos):  # type: ignore[no-untyped-def]
        """ExecuTorch's LLM ops: in-place cache update and SDPA over the filled prefix only, with
        caches laid out [1, max_len, kv_heads, head_dim]. Used only while tracing for ExecuTorch."""
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x).view(b, t, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x).view(b, t, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
        k_cache, v_cache = cache
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start < k_cache.shape[1])
        torch.ops.llama.update_cache(k, k_cache, start)
        torch.ops.llama.update_cache(v, v_cache, start)
        out = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0, True)
        return self.o_proj(out.reshape(b, t, cfg.num_attention_heads * cfg.head_dim))


class QwenMLP(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class QwenDecoderLayer(nn.Module):
    def __init__(self, cfg: QwenConfig) -> None:
        super().__init__()
        self.self_attn = QwenAttention(cfg)
        self.mlp = QwenMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, input_pos, kv_impl="reference"):  # type: ignore[no-untyped-def]
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, input_pos, kv_impl)
        return x + self.mlp(self.post_attention_layernorm(x))


class QwenModel(nn.Module):
    """The decoder stack (``model.*`` in transformers). ``with_embeddings=False`` for stacks fed
    with embeddings only (the speech decoders)."""

    def __init__(self, cfg: QwenConfig, with_embeddings: bool = True, cached: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        # False for bidirectional stacks (VITA's NAR pre_nn): they never hold a KV cache.
        self.cached = cached
        if with_embeddings:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(QwenDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cache_len = 0
        # "reference": caches [1, kv_heads, max_len, head_dim], plain SDPA under a mask.
        # "et_custom": caches [1, max_len, kv_heads, head_dim], ExecuTorch's llama ops (export only).
        self.kv_impl = "reference"

    # -- KV cache --------------------------------------------------------------------------
    def setup_cache(self, max_len: int, dtype: torch.dtype | None = None, device: Any = None) -> None:
        """Allocate the static cache as non-persistent buffers (they never go into a checkpoint)."""
        cfg = self.cfg
        ref = self.norm.weight
        dtype = dtype or ref.dtype
        device = device or ref.device
        if self.kv_impl == "et_custom":
            shape = (1, max_len, cfg.num_key_value_heads, cfg.head_dim)
        else:
            shape = (1, cfg.num_key_value_heads, max_len, cfg.head_dim)
        for i in range(cfg.num_hidden_layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.cache_len = max_len

    def reset_cache(self) -> None:
        for name, buf in self.named_buffers(recurse=False):
            if "_cache_" in name:
                buf.zero_()

    def _cache(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.cache_len:
            return None
        return getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        input_pos: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """inputs_embeds [1, T, H] at absolute positions input_pos [T] -> hidden [1, T, H].

        With a cache, each query attends to every cached position up to its own (causal over the
        whole conversation). Without one (oracle tests, NAR stacks) attention is over the T tokens,
        causal unless ``attn_mask`` says otherwise.
        """
        cfg = self.cfg
        cos, sin = rope_cos_sin(input_pos, cfg.head_dim, cfg.rope_theta, inputs_embeds.dtype)
        custom = self.kv_impl == "et_custom" and self.cache_len
        if attn_mask is None and not custom:
            keys = torch.arange(self.cache_len or inputs_embeds.shape[1], device=input_pos.device)
            ref = input_pos if self.cache_len else keys[: inputs_embeds.shape[1]]
            attn_mask = keys[None, :] <= ref[:, None]
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attn_mask, self._cache(i), input_pos, self.kv_impl)
        return self.norm(x)


class QwenForCausalLM(nn.Module):
    def __init__(self, cfg: QwenConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = QwenModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = getattr(self, "lm_head", None)
        return head(hidden) if head is not None else F.linear(hidden, self.model.embed_tokens.weight)

    def untie_head(self) -> None:
        """Give a tied output projection its own Linear, so it can be quantized while the
        embedding table stays float (the checkpoint is unchanged: this is an export-time copy)."""
        if getattr(self, "lm_head", None) is None:
            w = self.model.embed_tokens.weight
            self.lm_head = nn.Linear(self.cfg.hidden_size, self.cfg.vocab_size, bias=False, device=w.device, dtype=w.dtype)
            self.lm_head.weight = nn.Parameter(w.detach().clone(), requires_grad=False)

    def hidden(self, inputs_embeds: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        self.check_fits(input_pos)
        return self.model(inputs_embeds, input_pos)

    def forward(self, inputs_embeds: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.logits(self.hidden(inputs_embeds, input_pos))

    def check_fits(self, input_pos: torch.Tensor) -> None:
        # Only in eager: under tracing positions are symbolic and the runtime checks instead.
        if self.model.cache_len and not torch.compiler.is_compiling() and input_pos.numel():
            last = int(input_pos.max())
            if last >= self.model.cache_len:
                raise ContextOverflowError(
                    f"position {last} does not fit in the KV cache of {self.model.cache_len} tokens; "
                    "start a new conversation or set up a longer cache (max context)."
                )
