"""Read the quantized weights back out of ONNX graphs: every DequantizeLinear over an integer
initializer, unpacked to the QuantResult's layout (codes [out, in] as int8, scales [out, groups]).
This is how a test proves a graph holds the QuantResult's integers and scales, reading the file
with ONNX tooling, not with the code that wrote it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class OnnxQuantWeight:
    node: str
    bits: int
    q: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # fp32 [out, in // group]
    zero: torch.Tensor | None


def read_quantized_weights(path: str | os.PathLike) -> list[OnnxQuantWeight]:
    import onnx

    model = onnx.load(str(path), load_external_data=True)
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        w = inits[node.input[0]]
        bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.INT8: 8}.get(w.data_type)
        if bits is None:
            continue
        codes = onnx.numpy_helper.to_array(w).astype(np.int8)  # [K, N]
        scale = onnx.numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        zero = onnx.numpy_helper.to_array(inits[node.input[2]]).astype(np.int8) if len(node.input) > 2 and node.input[2] else None
        if scale.ndim == 1:  # per output channel: one group spanning all inputs
            scale, zero = scale[None], None if zero is None else zero[None]
        for lo, hi in _packed_parts(node, codes.shape[1], consumers, inits):
            out.append(OnnxQuantWeight(node.name, bits, torch.from_numpy(codes[:, lo:hi].T.copy()), torch.from_numpy(scale[:, lo:hi].T.copy()),
                                       None if zero is None else torch.from_numpy(zero[:, lo:hi].T.copy())))  # fmt: skip
    return out


def _packed_parts(dq, n: int, consumers: dict, inits: dict) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    """Column ranges of the linears a weight holds: linears packed side by side (one MatMul, an
    Add of their packed biases if they have them, then a Split along the last axis) are read
    back one by one."""
    import onnx

    users = consumers.get(dq.output[0], [])
    if len(users) == 1 and users[0].op_type == "MatMul":
        after = consumers.get(users[0].output[0], [])
        if len(after) == 1 and after[0].op_type == "Add":  # packed biases
            after = consumers.get(after[0].output[0], [])
        if len(after) == 1 and after[0].op_type == "Split" and len(after[0].input) > 1 and after[0].input[1] in inits:
            sizes = onnx.numpy_helper.to_array(inits[after[0].input[1]]).tolist()
            edges = np.cumsum([0, *sizes]).tolist()
            return list(zip(edges[:-1], edges[1:], strict=True))
    return [(0, n)]


def read_component(files: list[Path]) -> list[OnnxQuantWeight]:
    """Every quantized weight in a component's graphs: linears, then embedding tables (each once,
    though several graphs may gather from one)."""
    graphs = [f for f in files if f.suffix == ".onnx"]
    tables = {(w.q.shape, w.q.numpy().tobytes()): w for f in graphs for w in read_tables(f)}
    return [w for f in graphs for w in read_quantized_weights(f)] + list(tables.values())


def read_tables(path: str | os.PathLike) -> list[OnnxQuantWeight]:
    """Quantized embedding tables (targets/tables.py): a gather over a rank-2 int8 (or packed
    uint8) initializer, and the gather with the same indices over an fp16 initializer (its scales)."""
    import onnx

    from omni_export.targets.tables import unpack_int4

    model = onnx.load(str(path), load_external_data=True)
    inits = {t.name: t for t in model.graph.initializer}
    gathers = [n for n in model.graph.node if n.op_type in ("Gather", "GatherND") and n.input[0] in inits]
    out = []
    for g in gathers:
        data = inits[g.input[0]]
        if data.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) or len(data.dims) != 2:
            continue
        scale = next((inits[s.input[0]] for s in gathers if s.input[1] == g.input[1] and inits[s.input[0]].data_type == onnx.TensorProto.FLOAT16), None)
        if scale is None:
            continue
        codes = torch.from_numpy(onnx.numpy_helper.to_array(data).copy())
        packed = data.data_type == onnx.TensorProto.UINT8
        q = unpack_int4(codes).to(torch.int8) if packed else codes
        out.append(OnnxQuantWeight(g.name, 4 if packed else 8, q, torch.from_numpy(onnx.numpy_helper.to_array(scale).astype(np.float32)), None))
    return out
