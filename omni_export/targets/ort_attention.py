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

The op is traced as a torch custom op (``omni_export::group_query_attention``; its eager body is
the ``io`` mode's concatenation and grouped attention, so ``torch.export`` checks and golden I/O
see the same numbers) and written into the ONNX graph through ``torch.onnx``'s custom
translation table. Parity replays the graph in ONNX Runtime against the eager reference."""

from __future__ import annotations

from typing import Any

import torch

from omni_export.export.components.kv import HEADS_FIRST, KV_MODES, Attend, GroupedAttention, IOSlots, KVCache, KVMode


@torch.library.custom_op("omni_export::group_query_attention", mutates_args=())
def group_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                          input_pos: torch.Tensor, num_heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """q [B, T, H*D], k and v [B, T, Hkv*D] at consecutive ``input_pos``, caches [B, Hkv, max_len,
    D] -> (out [B, T, H*D], the caches with this step written at ``input_pos``)."""
    b, t, _ = q.shape
    d = q.shape[-1] // num_heads
    keys, values = past_k.clone(), past_v.clone()
    keys.index_copy_(2, input_pos, k.view(b, t, kv_heads, d).transpose(1, 2).to(keys.dtype))
    values.index_copy_(2, input_pos, v.view(b, t, kv_heads, d).transpose(1, 2).to(values.dtype))
    n = int(input_pos[-1]) + 1  # attention reads the filled prefix only
    out = GroupedAttention(num_heads // kv_heads)(q.view(b, t, num_heads, d), keys[:, :, :n], values[:, :, :n], input_pos)
    return out, keys, values


@group_query_attention.register_fake
def _(q, k, v, past_k, past_v, input_pos, num_heads, kv_heads):  # type: ignore[no-untyped-def]
    return q.new_empty(q.shape), torch.empty_like(past_k), torch.empty_like(past_v)


class StepKV(KVCache):
    """Hands attention this step's keys and values untouched: the fused op appends them."""

    def update(self, k, v, input_pos):  # type: ignore[no-untyped-def]
        return k, v


class FusedGQA(Attend):
    """One GroupQueryAttention per layer; the present cache it returns goes to the step's slots."""

    def __init__(self, n_rep: int, layer: int, slots: IOSlots) -> None:
        super().__init__(n_rep)
        self.layer, self.slots = layer, slots

    def forward(self, q, keys, values, input_pos):  # type: ignore[no-untyped-def]
        b, t, h, d = q.shape
        i = 2 * self.layer
        out, pk, pv = group_query_attention(q.reshape(b, t, h * d), keys.reshape(b, t, -1), values.reshape(b, t, -1),
                                            self.slots.past[i], self.slots.past[i + 1], input_pos, h, h // self.n_rep)  # fmt: skip
        self.slots.present[i], self.slots.present[i + 1] = pk, pv
        return out


ORT_KV = KV_MODES.register("onnxruntime", KVMode("onnxruntime", "static-io", HEADS_FIRST, lambda stack, layer, n, slots: StepKV(),
                                                  lambda n_rep, layer, slots: FusedGQA(n_rep, layer, slots)))  # fmt: skip


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
                param("seqlens_k", "M"), param("total_sequence_length", "M")],
        outputs=[param("output", "T"), param("present_key", "T"), param("present_value", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""), OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, "")],
    )  # fmt: skip
    gqa = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "GroupQueryAttention", schema)

    def lower(q, k, v, past_k, past_v, input_pos, num_heads: int, kv_heads: int):  # type: ignore[no-untyped-def]
        last = op.ReduceMax(input_pos, keepdims=0)
        total = op.Cast(op.Add(last, op.Constant(value_int=1)), to=6)  # int32 scalar: past + this step
        seqlens_k = op.Cast(op.Reshape(last, op.Constant(value_ints=[1])), to=6)  # [batch] = total - 1
        return gqa(q, k, v, past_k, past_v, seqlens_k, total, num_heads=num_heads, kv_num_heads=kv_heads)

    return {torch.ops.omni_export.group_query_attention.default: lower}
