"""Read the quantized weights back out of a ``.pte``: the XNNPACK delegate payloads are decoded
with their flatbuffer schema and each quantized constant is unpacked from the program's named
data. This is how a test proves an artifact holds the QuantResult's integers and scales, with
no help from the code that wrote them."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

_QUANT_TYPES = {"xnn_datatype_qbint4": 4, "xnn_datatype_qcint4": 4, "xnn_datatype_qcint8": 8}


@dataclass
class PteQuantWeight:
    bits: int
    q: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # fp32 [out, in // group]


def _xnn_graph(blob: bytes) -> dict:
    from executorch.backends.xnnpack.serialization import xnnpack_graph_serialize
    from executorch.exir._serialize._flatbuffer import _flatc_decompile

    # XNNHeader: 4 zero bytes, magic "XH00", header size, then flatbuffer offset and size.
    if blob[4:8] != b"XH00":
        raise ValueError("not an XNNPACK delegate payload")
    off, size = int.from_bytes(blob[10:14], "little"), int.from_bytes(blob[14:18], "little")
    schema = Path(xnnpack_graph_serialize.__file__).with_name("schema.fbs")
    with tempfile.TemporaryDirectory() as d:
        Path(d, "graph.bin").write_bytes(blob[off : off + size])
        _flatc_decompile(d, str(schema), os.path.join(d, "graph.bin"))
        # flatc writes non-finite floats (clamp bounds) as bare inf/nan, which JSON has no word for.
        text = re.sub(rb"(:\s*)(-?(?:inf|nan))(?=\s*[,}\]])", rb'\1"\2"', Path(d, "graph.json").read_bytes())
        return json.loads(text)


def _unpack(raw: bytes, bits: int, out: int, k: int) -> torch.Tensor:
    data = np.frombuffer(raw, dtype=np.uint8)
    if bits == 8:
        return torch.from_numpy(data.view(np.int8).reshape(out, k).copy())
    # Two codes per byte, even column in the low nibble, stored with a +8 offset.
    cols = k + (k % 2)
    pairs = data.reshape(out, cols // 2)
    codes = np.stack([pairs & 0x0F, pairs >> 4], -1).reshape(out, cols)[:, :k]
    return torch.from_numpy(codes.astype(np.int8) - 8)


def data_file(path: str | os.PathLike) -> Path | None:
    """The ``.ptd`` the build writes beside a program that keeps its weights outside."""
    ptd = Path(path).with_suffix(".ptd")
    return ptd if ptd.is_file() else None


def _external(path: str | os.PathLike) -> dict[str, bytes]:
    """Key -> bytes of the program's ``.ptd`` (XNNPACK's weights by hash, the program's own
    constants by name); empty when it has none."""
    ptd = data_file(path)
    if ptd is None:
        return {}
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    payload = FlatTensorSerializer().deserialize(ptd.read_bytes())
    return {key: bytes(payload.buffers[e.buffer_index]) for key, e in payload.named_data.items()}


def read_quantized_weights(path: str | os.PathLike) -> list[PteQuantWeight]:
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte = deserialize_pte_binary(Path(path).read_bytes())
    named = pte.named_data
    store = _external(path)
    if named is not None:
        store.update({key: bytes(named.buffers[e.buffer_index]) for key, e in named.pte_data.items()})
    if not store:
        return []
    out, seen = [], set()
    for delegate in pte.program.backend_delegate_data:
        graph = _xnn_graph(bytes(delegate.data))
        consts = graph["constant_data"]
        for value in graph["xvalues"]:
            if value["xvalue_union_type"] != "XNNQuantizedTensorValue":
                continue
            tv, qp = value["xvalue_union"]["tensor_value"], value["xvalue_union"]["quant_params"]
            bits = _QUANT_TYPES.get(tv["datatype"])
            if bits is None or not tv["constant_buffer_idx"]:
                continue
            key = consts[tv["constant_buffer_idx"]]["named_key"]
            if key in seen:  # methods of one component share their weights
                continue
            seen.add(key)
            n_out, k = tv["dims"]
            raw_scale = store[consts[qp["scale_buffer_idx"]]["named_key"]]
            dtype = torch.bfloat16 if tv["datatype"] == "xnn_datatype_qbint4" else torch.float32
            scale = torch.frombuffer(bytearray(raw_scale), dtype=dtype).float().reshape(n_out, -1)
            out.append(PteQuantWeight(bits, _unpack(store[key], bits, n_out, k), scale))
    return out


@dataclass
class PteTable:
    """A quantized embedding table (targets/tables.py) as a .pte holds it: a constant of codes
    (int8, or uint8 two per byte) and its fp16 scales, read from the program's constants."""

    bits: int
    q: torch.Tensor  # int8 [rows, width]
    scale: torch.Tensor  # fp32 [rows, groups]


_INT8, _UINT8, _FP16 = 1, 0, 5  # executorch ScalarType codes


def read_tables(path: str | os.PathLike) -> list[PteTable]:
    """Each integer constant of rank 2 paired with the fp16 constant of the same row count that
    the same method reads next (its scales): the form QuantizedEmbedding traces to."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    from omni_export.targets.tables import unpack_int4

    program = deserialize_pte_binary(Path(path).read_bytes()).program
    external = _external(path)

    def data(t) -> bytes | None:  # type: ignore[no-untyped-def]
        info = t.extra_tensor_info
        if info is not None and info.fully_qualified_name in external:
            return external[info.fully_qualified_name]
        return bytes(program.constant_buffer[t.data_buffer_idx].storage) if t.data_buffer_idx else None

    out, seen = [], set()
    for plan in program.execution_plan:
        consts = [(v.val, raw) for v in plan.values if type(v.val).__name__ == "Tensor" and len(v.val.sizes) == 2
                  and (raw := data(v.val)) is not None]  # fmt: skip
        for i, (t, raw) in enumerate(consts):
            if t.scalar_type not in (_INT8, _UINT8) or raw in seen:
                continue
            scale = next((s for s, _ in consts[i + 1:] if s.scalar_type == _FP16 and s.sizes[0] == t.sizes[0]), None)
            if scale is None:
                continue
            seen.add(raw)
            rows, cols = t.sizes
            codes = torch.frombuffer(bytearray(raw[: rows * cols]), dtype=torch.int8 if t.scalar_type == _INT8 else torch.uint8).reshape(rows, cols)
            q = unpack_int4(codes).to(torch.int8) if t.scalar_type == _UINT8 else codes
            sraw = bytearray(data(scale)[: scale.sizes[0] * scale.sizes[1] * 2])  # type: ignore[index]
            out.append(PteTable(4 if t.scalar_type == _UINT8 else 8, q, torch.frombuffer(sraw, dtype=torch.float16).float().reshape(scale.sizes)))
    return out
