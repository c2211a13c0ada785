"""ONNX lowering shared by the ONNX Runtime and TensorRT targets.

Each traced program becomes one ONNX graph (``torch.onnx.export(..., dynamo=True)``, opset 21):
inputs and outputs carry the manifest's names and symbolic dims, onnxscript's optimizer folds
and cleans the graph, and the QuantResult is written in, not recomputed:

- a quantized linear is exported as ``MatMul(x, weight_t)`` ([K, N], see ``QuantizedMatMul``)
  and its ``weight_t`` initializer is replaced by ``DequantizeLinear`` over the QuantResult's
  integers: INT4 (or INT8) codes [K, N] with block-wise scales [K / group, N] along axis 0, or
  per-channel scales [N] along axis 1, and zero points only when the weights are asymmetric.
  This is the form ONNX Runtime's CPU provider fuses into ``MatMulNBits`` at load (its
  ``DQMatMulToMatMulNBits`` rule: a constant int4/int8 DQ feeding a MatMul's B, block size a
  power of two >= 16), and the explicit-quantization form TensorRT consumes.
- everything else stays float.

All graphs of a component share one external-data file, each tensor stored once (a tied LM head
and its embedding table are one copy), so no .onnx file nears protobuf's 2 GB limit."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from omni_export.export.components.layers import RMSNorm
from omni_export.export.trace_specs import MethodSpec
from omni_export.quantize.result import QTensor
from omni_export.files import staged_file
from omni_export.targets.base import LoweringError, library_chatter, swap_linears, traced_forms

log = logging.getLogger(__name__)

OPSET = 21  # int4 and block-wise DequantizeLinear
INLINE_BYTES = 1024  # smaller initializers stay inside the graph
ALIGN = 64
ALIGN_LARGE = 4096  # page-aligned large tensors: a runtime may map them instead of copying
DTYPES = {"float32": "FLOAT", "int64": "INT64", "int32": "INT32", "float16": "FLOAT16"}


class QuantizedMatMul(nn.Module):
    """Export-only stand-in for a quantized nn.Linear: ``x @ weight_t (+ bias)``. ``weight_t`` is
    a placeholder of the right shape that costs no memory (a broadcast zero): the lowering
    replaces its initializer with the QuantResult's codes and scales before anything reads it."""

    def __init__(self, lin: nn.Linear, path: str) -> None:
        super().__init__()
        self.path = path
        self.in_features, self.out_features = lin.in_features, lin.out_features
        w = lin.weight
        self.register_buffer("weight_t", torch.zeros((), dtype=torch.float32, device=w.device).expand(w.shape[1], w.shape[0]))
        self.bias = lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias


class OnnxRMSNorm(RMSNorm):
    """RMSNorm written as ``x / sqrt(mean(x^2) + eps) * w``: the pattern ONNX Runtime fuses into
    one ``SimplifiedLayerNormalization`` at load (the ``x * rsqrt(...)`` form stays seven
    element-wise ops per norm, most of a small decoder step's time). Equal to RMSNorm to fp32
    rounding; parity checks it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


@contextmanager
def onnx_forms(module: nn.Module) -> Iterator[None]:
    """While tracing for ONNX: modules in the form ONNX optimizers recognise (same parameters,
    same function); restored afterwards."""
    with traced_forms(module, {RMSNorm: OnnxRMSNorm}):
        yield


def swap_quantized(module: nn.Module, tensors: dict[str, QTensor]) -> None:
    """Replace every quantized linear of ``module`` by its QuantizedMatMul (for good: the module
    is the compiler's copy, consumed by this build)."""
    swap_linears(module, tensors, lambda lin, path, qt: QuantizedMatMul(lin, path))


def _symbolic(shape: tuple[int | str, ...]):  # type: ignore[no-untyped-def]
    import onnx_ir as ir

    return ir.Shape([d if isinstance(d, int) else ir.SymbolicDim(d) for d in shape])


def to_onnx(program, spec: MethodSpec, tensors: dict[str, QTensor], translations: dict | None = None,  # type: ignore[no-untyped-def]
            activations: bool = False):  # fmt: skip  # -> (ir.Model, int)
    """One traced program as an ONNX model (onnx-ir) with the manifest's I/O names and dims and
    the QuantResult encoded; also how many quantized weights it holds. ``translations``: a
    target's own ops (torch custom op -> onnxscript function). ``activations``: quantized
    activations as QuantizeLinear/DequantizeLinear with the QuantResult's static scales (a
    target without dynamic activation quantization)."""
    import onnxscript.optimizer

    try:
        with library_chatter("torch.onnx", stdout=True):
            exported = torch.onnx.export(program, (), dynamo=True, opset_version=OPSET, optimize=False, verbose=False,
                                         custom_translation_table=translations)  # fmt: skip
    except Exception as exc:  # torch.onnx raises many types; name the method and the first line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LoweringError(f"ONNX export of {spec.name} failed: {type(exc).__name__}: {first}") from exc
    model = exported.model
    graph = model.graph
    if len(graph.inputs) != len(spec.inputs) or len(graph.outputs) != len(spec.outputs):
        raise LoweringError(f"{spec.name}: the ONNX graph has {len(graph.inputs)} inputs / {len(graph.outputs)} outputs, "
                            f"the method declares {len(spec.inputs)} / {len(spec.outputs)}")  # fmt: skip
    for value, t in zip([*graph.inputs, *graph.outputs], [*spec.inputs, *spec.outputs], strict=True):
        value.name = t.name
        value.shape = _symbolic(t.shape)
    # Encoded first: the placeholders it replaces are equal to each other and would be merged.
    encoded = encode_quant(model, tensors, activations)
    # Large limits: every constant transpose of a float weight is folded into a [K, N] initializer
    # once here, instead of at every session load; DequantizeLinear is never folded (it is the
    # quantization the runtime fuses into its integer kernels).
    onnxscript.optimizer.optimize_ir(model, input_size_limit=1 << 40, output_size_limit=1 << 40,
                                     should_fold=lambda node: False if node.op_type == "DequantizeLinear" else None)  # fmt: skip
    _strip_debug(model)
    model.producer_name = "omni-export"
    return model, encoded


def _strip_debug(model) -> None:  # type: ignore[no-untyped-def]
    """The exporter annotates every node with its Python stack and FX names; a shipped graph
    carries none of that (it would be most of a small graph's bytes)."""
    for node in model.graph:
        node.metadata_props.clear()
        node.doc_string = None
    for value in [*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values()]:
        value.metadata_props.clear()
    model.graph.metadata_props.clear()


def encode_quant(model, tensors: dict[str, QTensor], activations: bool = False) -> int:  # type: ignore[no-untyped-def]
    """Replace each quantized linear's ``weight_t`` initializer in this graph with
    DequantizeLinear over its integers and scales, then pack the linears that read one input.
    Returns how many weights were encoded (a graph holds the linears its method uses; the
    component's graphs together hold them all)."""
    graph = model.graph
    by_suffix = {f"{path}.weight_t": (path, qt) for path, qt in tensors.items()}
    done: dict[str, object] = {}
    for name in list(graph.initializers):
        match = next((v for k, v in by_suffix.items() if name == k or name.endswith("." + k)), None)
        if match is None:
            continue
        path, qt = match
        value = graph.initializers[name]
        # Scales in the placeholder's dtype: DequantizeLinear's output takes its scale's type, and
        # an fp16 graph (TensorRT) multiplies fp16 activations by it.
        node = _dequantize(graph, path, qt, _NP_FLOAT[value.dtype.name])
        graph.insert_before(_first_user(graph, value), node)
        value.replace_all_uses_with(node.outputs[0])
        del graph.initializers[name]
        done[path] = node
    _pack_shared_inputs(graph, {p: (tensors[p], n) for p, n in done.items()})
    if activations:
        _quantize_activations(graph, tensors)
    return len(done)


def _quantize_activations(graph, tensors: dict[str, QTensor]) -> None:  # type: ignore[no-untyped-def]
    """Each MatMul over a quantized weight whose config quantizes activations reads its input
    through QuantizeLinear/DequantizeLinear (int8, per tensor, the calibrated scale; a packed
    MatMul takes the largest of its linears', which read the same tensor): the explicit form a
    strongly typed TensorRT network turns into an int8 GEMM."""
    import onnx_ir as ir

    for dq in [n for n in graph if n.op_type == "DequantizeLinear" and n.name.endswith(".dequantize")]:
        paths = dq.name[: -len(".dequantize")].split("+")
        qts = [tensors[p] for p in paths if p in tensors]
        if not qts or qts[0].config.activation == "none":
            continue
        missing = [p for p, t in zip(paths, qts, strict=True) if t.act_scale is None]
        if missing:
            raise LoweringError(f"{missing[0]}: int8 activations need a calibrated activation scale, which this QuantResult lacks "
                                "(computed before omni-export recorded them); delete the cached quantization and build again")  # fmt: skip
        users = [(n, i) for n, i in dq.outputs[0].uses() if n.op_type == "MatMul" and i == 1]
        if len(users) != 1:
            continue
        matmul = users[0][0]
        x = matmul.inputs[0]
        dtype = _NP_FLOAT[dq.inputs[1].dtype.name]
        name = "+".join(paths)
        scale = _initializer(graph, f"{name}.act_scale", ir.Tensor(np.array(max(float(t.act_scale) for t in qts), dtype=dtype)))
        zero = _initializer(graph, f"{name}.act_zero", ir.Tensor(np.array(0, dtype=np.int8)))
        q = ir.node("QuantizeLinear", [x, scale, zero], name=f"{name}.act_quantize", outputs=[ir.Value(name=f"{name}.act_q")])
        d = ir.node("DequantizeLinear", [q.outputs[0], scale, zero], name=f"{name}.act_dequantize", outputs=[ir.Value(name=f"{name}.act")])
        graph.insert_before(matmul, [q, d])
        matmul.replace_input_with(0, d.outputs[0])


_NP_FLOAT = {"FLOAT": np.float32, "FLOAT16": np.float16}


def _dequantize(graph, path: str, qt: QTensor, scale_dtype=np.float32):  # type: ignore[no-untyped-def]
    """DequantizeLinear over ``qt`` as [K, N]: int4 blockwise along K, or int8 per channel;
    scales in ``scale_dtype`` (every QuantResult scale is exact in fp16)."""
    import ml_dtypes
    import onnx_ir as ir

    k = qt.q.shape[1]
    g = qt.group_size
    codes = qt.q.T.contiguous().numpy()
    code_type = ml_dtypes.int4 if qt.config.bits == 4 else np.int8
    ir_type = ir.DataType.INT4 if qt.config.bits == 4 else ir.DataType.INT8
    per_channel = g == k
    scale = qt.scale.T.contiguous().float().numpy().astype(scale_dtype)  # [K/g, N]
    attrs = {"axis": 1} if per_channel else {"axis": 0, "block_size": g}
    if per_channel:
        scale = scale[0]
    inputs = [
        _initializer(graph, f"{path}.qweight", ir.Tensor(codes.astype(code_type), dtype=ir_type)),
        _initializer(graph, f"{path}.scales", ir.Tensor(scale)),
    ]
    if not qt.config.symmetric:
        zero = qt.zero.T.contiguous().numpy()
        zero = zero[0] if per_channel else zero
        inputs.append(_initializer(graph, f"{path}.zero_points", ir.Tensor(zero.astype(code_type), dtype=ir_type)))
    return ir.node("DequantizeLinear", inputs, attributes=attrs, name=f"{path}.dequantize", outputs=[ir.Value(name=f"{path}.weight")])


def _pack_shared_inputs(graph, encoded: dict) -> None:  # type: ignore[no-untyped-def]
    """Quantized linears that read the same tensor with the same quantization (q/k/v, gate/up)
    become one MatMul over their concatenated codes, then a Split: fewer, wider MatMulNBits,
    which is where a small decoder step spends its time. Exact: the codes and scales are the
    same numbers, side by side along N."""
    import onnx_ir as ir

    groups: dict[tuple, list[tuple[str, QTensor, object, object]]] = {}
    for path, (qt, dq) in encoded.items():
        users = list(dq.outputs[0].uses())
        if len(users) != 1 or users[0][0].op_type != "MatMul" or users[0][1] != 1:
            continue
        matmul = users[0][0]
        key = (id(matmul.inputs[0]), qt.config.bits, qt.group_size, qt.config.symmetric, qt.q.shape[1])
        groups.setdefault(key, []).append((path, qt, dq, matmul))
    order = {id(node): i for i, node in enumerate(graph)}
    for members in groups.values():
        if len(members) < 2:
            continue
        members.sort(key=lambda m: order[id(m[3])])
        paths, qts = [m[0] for m in members], [m[1] for m in members]
        packed = QTensor(torch.cat([t.q for t in qts]), torch.cat([t.scale for t in qts]), torch.cat([t.zero for t in qts]), qts[0].config)
        name = "+".join(paths)
        first = members[0][3]
        dq = _dequantize(graph, name, packed, members[0][2].inputs[1].const_value.numpy().dtype)
        mm = ir.node("MatMul", [first.inputs[0], dq.outputs[0]], name=f"{name}.matmul", outputs=[ir.Value(name=f"{name}.out")])
        new = [dq, mm]
        # Biases (Qwen2's q/k/v) are packed too, so the runtime folds one Add into its kernel.
        adds = [_bias_add(graph, m[3]) for m in members]
        olds = [m[3] for m in members]
        biased = all(a is not None for a in adds)
        if biased:
            bias = np.concatenate([a[1].const_value.numpy() for a in adds])
            new.append(ir.node("Add", [mm.outputs[0], _initializer(graph, f"{name}.bias", ir.Tensor(bias))], name=f"{name}.add",
                               outputs=[ir.Value(name=f"{name}.biased")]))  # fmt: skip
            olds = [a[0] for a in adds]
        sizes = _initializer(graph, f"{name}.split", ir.Tensor(np.array([t.q.shape[0] for t in qts], dtype=np.int64)))
        split = ir.node("Split", [new[-1].outputs[0], sizes], attributes={"axis": -1}, name=f"{name}.split",
                        outputs=[ir.Value(name=f"{p}.out") for p in paths])  # fmt: skip
        graph.insert_before(first, [*new, split])
        for old, out in zip(olds, split.outputs, strict=True):
            old.outputs[0].replace_all_uses_with(out)
        for i, (_, _, old_dq, old_mm) in enumerate(members):
            chain = [adds[i][0], old_mm, old_dq] if biased else [old_mm, old_dq]  # consumers first
            stored = [v for n in chain for v in n.inputs if v is not None and v.name in graph.initializers]
            for n in chain:
                graph.remove(n, safe=True)
            for value in stored:
                if value.name in graph.initializers and not list(value.uses()):
                    del graph.initializers[value.name]


def _bias_add(graph, matmul):  # type: ignore[no-untyped-def]
    """(the Add, its constant [N] bias) when ``matmul``'s only consumer adds a bias to it."""
    users = list(matmul.outputs[0].uses())
    if len(users) != 1 or users[0][0].op_type != "Add":
        return None
    add = users[0][0]
    other = add.inputs[1 - users[0][1]]
    if other is None or other.name not in graph.initializers or other.const_value is None or len(other.const_value.shape) != 1:
        return None
    return add, other


def _initializer(graph, name: str, tensor):  # type: ignore[no-untyped-def]
    import onnx_ir as ir

    value = ir.Value(name=name, const_value=tensor, type=ir.TensorType(tensor.dtype), shape=tensor.shape)
    graph.register_initializer(value)
    return value


def _first_user(graph, value):  # type: ignore[no-untyped-def]
    users = {id(u) for u, _ in value.uses()}
    return next(node for node in graph if id(node) in users)


@dataclass
class GraphSet:
    """The graphs of one component, saved with one shared external-data file."""

    directory: Path
    data_name: str

    def save(self, models: dict[str, object]) -> list[str]:
        """Write ``name.onnx`` per model and the shared data file; returns the file names."""
        import onnx_ir as ir

        self.directory.mkdir(parents=True, exist_ok=True)
        data = self.directory / self.data_name
        seen: dict[tuple, tuple[int, int]] = {}
        offset = 0
        with staged_file(data) as tmp_data, open(tmp_data, "wb") as f:
            for model in models.values():
                for value in model.graph.initializers.values():  # type: ignore[attr-defined]
                    tensor = value.const_value
                    if tensor is None or tensor.nbytes < INLINE_BYTES:
                        continue
                    raw = tensor.tobytes()
                    key = (tensor.dtype, tuple(tensor.shape), hashlib.sha1(raw).digest())
                    if key not in seen:
                        align = ALIGN_LARGE if len(raw) >= 1 << 20 else ALIGN
                        pad = -offset % align
                        f.write(b"\0" * pad)
                        offset += pad
                        f.write(raw)
                        seen[key] = (offset, len(raw))
                        offset += len(raw)
                    start, length = seen[key]
                    value.const_value = ir.ExternalTensor(self.data_name, start, length, tensor.dtype, shape=tensor.shape,
                                                          name=value.name, base_dir=self.directory)  # fmt: skip
        names = []
        for name, model in models.items():
            path = self.directory / f"{name}.onnx"
            with staged_file(path) as tmp:
                ir.save(model, tmp)  # type: ignore[arg-type]
            names.append(path.name)
        return [*names, data.name]
