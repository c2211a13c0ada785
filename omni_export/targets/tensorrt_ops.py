"""What TensorRT's ONNX parser takes: every op and the data types it accepts, from the table in
``tensorrt_ops.toml`` (TensorRT version and source recorded there). ``check_graph`` fails an
export on the workstation, naming component, graph, node and op, where the Jetson's parser
would fail hours later."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from omni_export.targets.base import LoweringError

# onnx-ir data type names -> the table's names
_TYPE_NAMES = {"FLOAT": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16", "DOUBLE": "FP64", "INT4": "INT4", "UINT4": "UINT4", "INT8": "INT8",
               "UINT8": "UINT8", "INT32": "INT32", "INT64": "INT64", "BOOL": "BOOL", "FLOAT8E4M3FN": "FP8", "FLOAT4E2M1": "FP4"}  # fmt: skip


@dataclass(frozen=True)
class OpTable:
    tensorrt_version: str
    source: str
    ops: dict[str, tuple[str, ...]]  # op -> data types it accepts
    unsupported: dict[str, str]
    notes: dict[str, str]


@cache
def op_table() -> OpTable:
    data = tomllib.loads(resources.files("omni_export.targets").joinpath("tensorrt_ops.toml").read_text())
    return OpTable(data["tensorrt_version"], data["source"], {k: tuple(v) for k, v in data["ops"].items()},
                   dict(data.get("unsupported", {})), dict(data.get("notes", {})))  # fmt: skip


def _nodes(graph, where: str):  # type: ignore[no-untyped-def]
    """Every node, subgraphs (If / Loop bodies) included."""
    for node in graph:
        yield node, where
        for attr in node.attributes.values():
            sub = getattr(attr, "value", None)
            for g in sub if isinstance(sub, (list, tuple)) else [sub]:
                if g is not None and hasattr(g, "initializers") and hasattr(g, "inputs"):
                    yield from _nodes(g, f"{where} > {node.name}")


def problems(model, table: OpTable | None = None) -> list[str]:  # type: ignore[no-untyped-def]
    """What TensorRT's parser would refuse in ``model`` (an onnx-ir model), one line per node."""
    t = table or op_table()
    out = []
    for node, where in _nodes(model.graph, "graph"):
        label = f"node {node.name or '(unnamed)'} ({node.domain + '::' if node.domain not in ('', 'ai.onnx') else ''}{node.op_type})"
        if node.domain not in ("", "ai.onnx") or node.op_type not in t.ops:
            why = t.unsupported.get(node.op_type, "")
            out.append(f"{label} in {where}: TensorRT {t.tensorrt_version}'s ONNX parser has no {node.op_type}{f' ({why})' if why else ''}")
            continue
        accepted = t.ops[node.op_type]
        if not accepted:
            continue
        # The table's types are those of the op's data (first) input: a comparison's BOOL
        # output or a DequantizeLinear's float scale are not what it lists.
        v = node.inputs[0] if node.inputs else None
        dtype = None if v is None or v.dtype is None else _TYPE_NAMES.get(v.dtype.name, v.dtype.name)
        if dtype is not None and dtype not in accepted:
            hint = " (TensorRT wants INT32 here: cast, or trace the value in int32)" if dtype == "INT64" else ""
            out.append(f"{label} in {where}: input {v.name} is {dtype}, which TensorRT's {node.op_type} does not take "
                       f"(it takes {', '.join(accepted)}){hint}")  # fmt: skip
    return out


def check_graph(model, component: str, graph: str) -> None:  # type: ignore[no-untyped-def]
    found = problems(model)
    if found:
        t = op_table()
        shown = "\n  ".join(found[:10]) + (f"\n  ... and {len(found) - 10} more" if len(found) > 10 else "")
        raise LoweringError(f"{component}/{graph}.onnx holds what TensorRT cannot build:\n  {shown}\n"
                            f"(table: TensorRT {t.tensorrt_version}, {t.source}). Replace the module that produces it with an "
                            "export form of supported ops, or build this component for another target.")  # fmt: skip
