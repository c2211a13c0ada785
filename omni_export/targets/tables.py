"""Quantized embedding tables in the one form every target that takes them lowers: the codes are
an integer constant, a call gathers its rows (int8, or two 4-bit codes per byte), then unpacks and
scales only those rows. ExecuTorch runs it on portable kernels, ONNX as Gather/Cast/Mul, Core ML
as gather/cast/mul; nothing is dequantized up front, so the table stays at 1 (or 0.5) byte per
weight in the file and in memory. The codes and scales are the QuantResult's, unchanged."""

from __future__ import annotations

import torch
from torch import nn

from omni_export.quantize.engine import is_table
from omni_export.quantize.result import QTensor
from omni_export.targets.base import LoweringError


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], [rows, k] (k even) -> uint8 [rows, k / 2], even column low nibble."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_int4`` in ops every target lowers (floor division, not shifts:
    ExecuTorch's edge dialect has no shift op); int32 codes in [-8, 7]."""
    b = packed.to(torch.int32)
    hi = torch.div(b, 16, rounding_mode="floor")
    return torch.stack((b - hi * 16, hi), -1).flatten(-2) - 8


class QuantizedEmbedding(nn.Module):
    """``nn.Embedding`` over a QTensor: ``out[..., j] = (q[id, j] - zero[id, g]) * scale[id, g]``
    for the group ``g`` that column ``j`` falls in."""

    def __init__(self, qt: QTensor, out_dtype: torch.dtype, head: str | None = None) -> None:
        super().__init__()
        # The tied head quantized as this table (its very codes), where there is one: a target
        # that can stores the codes once for both.
        self.head = head
        rows, width = qt.q.shape
        self.bits, self.groups, self.out_dtype = qt.config.bits, qt.scale.shape[1], out_dtype
        if self.bits == 4 and width % 2:
            raise LoweringError(f"a 4-bit embedding table needs an even row width (got {width}); use 8-bit rows")
        self.register_buffer("codes", pack_int4(qt.q) if self.bits == 4 else qt.q.to(torch.int8).contiguous())
        # Scales are exact in fp16 (the QuantResult keeps them so): half the bytes of fp32.
        self.register_buffer("scale", qt.scale.to(torch.float16).contiguous())
        self.register_buffer("zero", None if qt.config.symmetric else qt.zero.to(torch.int8).contiguous())

    @property
    def num_embeddings(self) -> int:
        return self.codes.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.codes[ids]
        q = (unpack_int4(rows) if self.bits == 4 else rows).float()
        q = q.reshape(*ids.shape, self.groups, -1)
        if self.zero is not None:
            q = q - self.zero[ids].float().unsqueeze(-1)
        return (q * self.scale[ids].float().unsqueeze(-1)).reshape(*ids.shape, -1).to(self.out_dtype)


def split_tables(module: nn.Module, tensors: dict[str, QTensor]) -> tuple[dict[str, QTensor], dict[str, QTensor]]:
    """A component's QuantResult as (embedding tables, linears)."""
    tables = {p: t for p, t in tensors.items() if is_table(module, p)}
    return tables, {p: t for p, t in tensors.items() if p not in tables}


def swap_tables(module: nn.Module, tables: dict[str, QTensor], heads: dict[str, str] | None = None) -> None:
    """Replace each quantized ``nn.Embedding`` of ``module`` (the compiler's copy) by its
    ``QuantizedEmbedding`` (a tied head was untied from it by the quantizer's plan); ``heads``:
    table path -> the tied head quantized as it."""
    heads = heads or {}
    for path, qt in tables.items():
        emb = module.get_submodule(path)
        if tuple(emb.weight.shape) != tuple(qt.q.shape):
            raise LoweringError(f"{path}: the QuantResult does not fit this table (shape {tuple(qt.q.shape)}); re-run quantization")
        owner, _, leaf = path.rpartition(".")
        # rows come out in fp32, the type a component is traced in (compiler: cast_floats), not the
        # checkpoint's stored type; fp16 targets cast at their method boundaries
        setattr(module.get_submodule(owner) if owner else module, leaf, QuantizedEmbedding(qt, torch.float32, heads.get(path)))


def shared_tables(module: nn.Module) -> dict[str, str]:
    """Table path -> tied head path, for the tables of ``module`` a head reads as well."""
    return {p: m.head for p, m in module.named_modules() if isinstance(m, QuantizedEmbedding) and m.head}
