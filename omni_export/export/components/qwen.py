"""One Qwen decoder for Qwen3 (q/k RMSNorm, tied embeddings) and Qwen2/2.5 (qkv bias).

Parameter names match transformers' Qwen2/Qwen3ForCausalLM, so their state dicts load unchanged.
Each cached stack's layers hold a swappable KV cache and attention (kv.py): the reference keeps
static buffers written at explicit positions, so the same code serves ``prefill`` (many tokens)
and ``decode`` (one token); a target swaps in its own form only while exporting.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omni_export.errors import ConfigError, ContextOverflowError
from omni_export.export.components.base import Component, Role
from omni_export.export.components.kv import Attend, BufferCache, KVCache, MaskedAttention
from omni_export.export.components.layers import (
    RMSNorm,
    apply_rope,
    merge_heads,
    repeat_kv,
    rope_cos_sin,
    sdpa,
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
        self.n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
        # The cache and the attention over it are parts a KV mode swaps (see kv.py); a stack
        # without a cache (oracle tests, bidirectional stacks) attends over its own tokens.
        self.kv: KVCache | None = None
        self.attend: Attend = MaskedAttention(self.n_rep)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """x [B, T, H]; cos/sin [T, D]. With a cache (and positions) the step's keys go into it
        and attention reads it; otherwise attention is over the T tokens under ``mask``."""
        cfg = self.cfg
        b = x.shape[0]
        # the token count inferred (-1), not named: XNNPACK lowers a reshape with one inferred
        # dimension but none with a symbolic one, and each it refuses cuts the delegated graph
        q = self.q_proj(x).view(b, -1, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x).view(b, -1, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x).view(b, -1, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.kv is not None and input_pos is not None:
            q, k = self.attend.rotate(q, k, cos, sin)  # a fused attention may rotate inside
            keys, values = self.kv.update(k, v, input_pos)
            return self.o_proj(self.attend(q, keys, values, input_pos))
        q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = sdpa(q, repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep), mask)
        return self.o_proj(merge_heads(out))


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

    def forward(self, x, cos, sin, mask, input_pos=None):  # type: ignore[no-untyped-def]
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class QwenModel(nn.Module):
    """The decoder stack (``model.*`` in transformers). ``with_embeddings=False`` for stacks fed
    with embeddings only (the speech decoders)."""

    def __init__(self, cfg: QwenConfig, with_embeddings: bool = True, cached: bool = True, final_norm: bool = True,
                 whole_call: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.cfg = cfg
        # False for bidirectional stacks (VITA's NAR pre_nn): they never hold a KV cache.
        self.cached = cached
        # A cached stack whose calls attend both ways within themselves (kv.Attend): VITA's TTS
        # prefix [bos, NAR output] runs through its AR layers unmasked.
        self.whole_call = whole_call
        if with_embeddings:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(QwenDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        # VITA's layers_pre_nn ends at its last layer, with no norm after it.
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if final_norm else nn.Identity()
        self.cache_len = 0

    # -- KV cache --------------------------------------------------------------------------
    def setup_cache(self, max_len: int, dtype: torch.dtype | None = None, device: Any = None) -> None:
        """Give every layer a zeroed reference cache of ``max_len`` positions (``dtype``/``device``:
        the stack's own by default)."""
        ref = self.norm.weight
        self.cache_len = max_len
        for layer in self.layers:
            attn = layer.self_attn
            attn.kv = BufferCache(self.cfg.num_key_value_heads, self.cfg.head_dim, max_len, dtype or ref.dtype, device or ref.device)
            attn.attend = MaskedAttention(attn.n_rep, self.whole_call)

    def reset_cache(self) -> None:
        for layer in self.layers:
            if layer.self_attn.kv is not None:
                layer.self_attn.kv.reset()

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
        cached = bool(self.cache_len)
        if attn_mask is None and not cached:
            keys = torch.arange(inputs_embeds.shape[1], device=input_pos.device)
            attn_mask = keys[None, :] <= (keys[-1:] if self.whole_call else keys)[:, None]
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask, input_pos if cached else None)
        return self.norm(x)


class QwenForCausalLM(Component, nn.Module):
    role = Role.DECODER

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
        if head is not None:
            return head(hidden)
        table = self.model.embed_tokens.weight
        # stored in another type than it computes in (a bf16 checkpoint run as the fp32 reference)
        return F.linear(hidden, table if table.dtype == hidden.dtype else table.to(hidden.dtype))

    def untie_head(self) -> None:
        """Give a tied output projection its own Linear, so it can be quantized apart from the
        embedding table. It holds the table's very tensor (nothing copied: quantization replaces
        the head's weight and never writes it); the checkpoint is unchanged."""
        if getattr(self, "lm_head", None) is None:
            with torch.device("meta"):
                head = nn.Linear(self.cfg.hidden_size, self.cfg.vocab_size, bias=False)
            head.weight = self.model.embed_tokens.weight
            self.lm_head = head

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

    # -- as a component ---------------------------------------------------------------------
    def export_methods(self, limits):  # type: ignore[no-untyped-def]
        from omni_export.export.trace_specs import F32, I64, Call, DecoderStep, MethodSpec, Tensor, dim, dtype_of, lm_steps

        c = self.cfg
        ids = dim("ids", 1, limits.max_context)
        outs = lambda n: (Tensor("logits", F32, (1, 1, c.vocab_size)), Tensor("hidden", F32, (1, n, c.hidden_size)))  # noqa: E731
        return [
            MethodSpec("embed", Call(self, "embed"), (torch.tensor([[1, 2, 3]]),), ({1: ids},),
                       (Tensor("ids", I64, (1, "ids")),), (Tensor("embeds", F32, (1, "ids", c.hidden_size)),)),
            *lm_steps(DecoderStep(self, with_hidden=True), c.hidden_size, outs, limits, dtype_of(self)),
        ]  # fmt: skip

    def golden_script(self, ctx, ref):  # type: ignore[no-untyped-def]
        """The chat-formatted golden question, then 32 greedy steps teacher-forced."""
        from omni_export.export.golden import DECODE_STEPS, GOLDEN_TEXT, teacher_forced
        from omni_export.runtime_py.prompt import chat_prompt, encode

        ids = torch.tensor([encode(ctx.tokenizer, chat_prompt(GOLDEN_TEXT))])
        steps = min(DECODE_STEPS, ctx.limits.max_context - ids.shape[1])
        script = teacher_forced(ref, ref.run("embed", (ids,))[0], lambda t: ref.run("embed", (torch.tensor([[t]]),))[0],
                                self.cfg.vocab_size, steps)  # fmt: skip
        return [("embed", (ids,)), *script]

    def calibration(self, sources):  # type: ignore[no-untyped-def]
        """Chat-formatted paragraphs, plus one turn that carries the tokens of every encoder of the
        checkpoint on its real input (a photo, a spoken question), as the model sees them in use."""
        from omni_export.quantize.calibrate import Calibration, text_split
        from omni_export.runtime_py.prompt import chat_prompt, encode

        paragraphs = text_split("train")
        step = max(1, len(paragraphs) // sources.samples)
        seqs = []
        with torch.no_grad():
            for para in paragraphs[::step][: sources.samples]:
                ids = encode(sources.tokenizer, chat_prompt(para))[: sources.max_tokens]
                seqs.append(self.embed(torch.tensor([ids])).float())
            parts = [self.embed(torch.tensor([encode(sources.tokenizer, chat_prompt("Look and listen:"))])).float()]
            for other in sources.components.values():
                if getattr(other, "role", None) == Role.ENCODER:
                    parts.append(other.calibration_tokens().reshape(1, -1, self.cfg.hidden_size).float())
            if len(parts) > 1:
                seqs.append(torch.cat(parts, 1)[:, : sources.max_tokens].float())
        return Calibration(sequences=seqs)
