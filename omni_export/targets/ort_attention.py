"""ONNX Runtime's own KV mode: the cache update and the attention of a layer as one
``com.microsoft.GroupQueryAttention`` node.

Exported in plain ONNX ops (the ``io`` mode, what TensorRT reads), a decoder layer's attention is
some thirty small nodes (reshapes, the past/present concatenation, grouped matmuls, the mask,
softmax); at decode each costs a dispatch, and together they took more time than the layer's
quantized matmuls. ONNX Runtime's CPU provider has a fused kernel for this: queries, this
step's keys and values and the cache in, the output and the cache with this step's positions
written out. Its cache tensors keep max_context positions (``static-io``): bound as both the past
input and the present output, the kernel writes the new positions in place, where the ``io``
form's concatenation copies the whole cache every step (at 4B shapes and 4k tokens, over a GB
per decoded token).

The op is traced as a torch custom op (``omni_export::group_query_attention``; its eager body
rotates, writes the step into copies of the caches and runs the ``io`` mode's grouped attention
over the filled prefix, so eager checks see the same numbers) and written into the ONNX graph
through ``torch.onnx``'s custom translation table. Parity replays the graph in ONNX Runtime against the eager reference."""

from __future__ import annotations

import functools
from typing import Any

import torch

from omni_export.export.components.kv import HEADS_FIRST, KV_MODES, Attend, GroupedAttention, IOSlots, KVCache, KVMode
from omni_export.export.components.layers import apply_rope, rope_cos_sin


@torch.library.custom_op("omni_export::group_query_attention", mutates_args=())
def group_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                          input_pos: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                          num_heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """q [B, T, H*D], k and v [B, T, Hkv*D] before RoPE, at consecutive ``input_pos``; caches [B,
    Hkv, max_len, D]; RoPE tables [max_len, D/2] -> (out [B, T, H*D], the caches with this step's
    rotated keys and its values written at ``input_pos``)."""
    b, t, _ = q.shape
    d = q.shape[-1] // num_heads
    cos = cos_cache[input_pos].repeat(1, 2)[:, None]  # [T, 1, D]: the half tables, as rope_cos_sin lays them out
    sin = sin_cache[input_pos].repeat(1, 2)[:, None]
    qh, kh = apply_rope(q.view(b, t, num_heads, d), cos, sin), apply_rope(k.view(b, t, kv_heads, d), cos, sin)
    keys, values = past_k.clone(), past_v.clone()
    keys.index_copy_(2, input_pos, kh.transpose(1, 2).to(keys.dtype))
    values.index_copy_(2, input_pos, v.view(b, t, kv_heads, d).transpose(1, 2).to(values.dtype))
    n = int(input_pos[-1]) + 1  # attention reads the filled prefix only
    out = GroupedAttention(num_heads // kv_heads)(qh, keys[:, :, :n], values[:, :, :n], input_pos)
    return out, keys, values


@group_query_attention.register_fake
def _(q, k, v, past_k, past_v, input_pos, cos_cache, sin_cache, num_heads, kv_heads):  # type: ignore[no-untyped-def]
    return q.new_empty(q.shape), torch.empty_like(past_k), torch.empty_like(past_v)


@functools.lru_cache(maxsize=8)
def _rope_tables(head_dim: int, theta: float, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One pair of tables per stack shape, shared by every layer (one initializer in the graph)."""
    cos, sin = rope_cos_sin(torch.arange(max_len), head_dim, theta, torch.float32)
    return cos[:, : head_dim // 2].contiguous(), sin[:, : head_dim // 2].contiguous()


class StepKV(KVCache):
    """Hands attention this step's keys and values untouched: the fused op writes them."""

    def update(self, k, v, input_pos):  # type: ignore[no-untyped-def]
        return k, v


class FusedGQA(Attend):
    """One GroupQueryAttention per layer, RoPE included (its cos/sin tables are constants of the
    graph); the present cache it returns goes to the step's slots."""

    def __init__(self, stack: Any, n_rep: int, layer: int, slots: IOSlots) -> None:
        super().__init__(n_rep)
        self.layer, self.slots = layer, slots
        cos, sin = _rope_tables(stack.cfg.head_dim, stack.cfg.rope_theta, stack.cache_len)
        self.register_buffer("cos_cache", cos, persistent=False)
        self.register_buffer("sin_cache", sin, persistent=False)

    def rotate(self, q, k, cos, sin):  # type: ignore[no-untyped-def]
        return q, k  # the kernel rotates (do_rotary), from the positions it is given

    def forward(self, q, keys, values, input_pos):  # type: ignore[no-untyped-def]
        b, t, h, d = q.shape
        i = 2 * self.layer
        out, pk, pv = group_query_attention(q.reshape(b, t, h * d), keys.reshape(b, t, -1), values.reshape(b, t, -1),
                                            self.slots.past[i], self.slots.past[i + 1], input_pos, self.cos_cache,
                                            self.sin_cache, h, h // self.n_rep)  # fmt: skip
        self.slots.present[i], self.slots.present[i + 1] = pk, pv
        return out


ORT_KV = KV_MODES.register("onnxruntime", KVMode("onnxruntime", "static-io", HEADS_FIRST, lambda stack, layer, n, slots: StepKV(),
                                                  FusedGQA))  # fmt: skip


@functools.cache
def translations() -> dict[Any, Any]:
    """torch.onnx custom translations: the custom op -> GroupQueryAttention (ONNX Runtime contrib
    domain; the positions give the total length: one sequence, consecutive positions)."""
    import onnxscript
    from onnx.defs import OpSchema
    from onnxscript import opset21 as op

    param = OpSchema.FormalParameter
    schema = OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[param("query", "T"), param("key", "T"), param("value", "T"), param("past_key", "T"), param("past_value", "T"),
                param("seqlens_k", "M"), param("total_sequence_length", "M"), param("cos_cache", "T"), param("sin_cache", "T")],
        outputs=[param("output", "T"), param("present_key", "T"), param("present_value", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in ("num_heads", "kv_num_heads", "do_rotary", "rotary_interleaved")],
    )  # fmt: skip
    gqa = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "GroupQueryAttention", schema)

    def lower(q, k, v, past_k, past_v, input_pos, cos_cache, sin_cache, num_heads: int, kv_heads: int):  # type: ignore[no-untyped-def]
        last = op.ReduceMax(input_pos, keepdims=0)
        total = op.Cast(op.Add(last, op.Constant(value_int=1)), to=6)  # int32 scalar: past + this step
        seqlens_k = op.Cast(op.Reshape(last, op.Constant(value_ints=[1])), to=6)  # [batch] = total - 1
        # The kernel rotates position total - T + i, i.e. input_pos (consecutive, one sequence).
        return gqa(q, k, v, past_k, past_v, seqlens_k, total, cos_cache, sin_cache, num_heads=num_heads, kv_num_heads=kv_heads,
                   do_rotary=1, rotary_interleaved=0)  # fmt: skip

    return {torch.ops.omni_export.group_query_attention.default: lower}
