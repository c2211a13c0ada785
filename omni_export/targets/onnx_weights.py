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
        out.append(OnnxQuantWeight(node.name, bits, torch.from_numpy(codes.T.copy()), torch.from_numpy(scale.T.copy()),
                                   None if zero is None else torch.from_numpy(zero.T.copy())))  # fmt: skip
    return out


def read_component(files: list[Path]) -> list[OnnxQuantWeight]:
    """Every quantized weight in a component's graphs."""
    return [w for f in files if f.suffix == ".onnx" for w in read_quantized_weights(f)]
