"""Core ML packages on any host: conversion of one traced program into a function, the merge of a
component's functions into one multifunction ``.mlpackage``, the validation of a written package
against what was traced (Core ML itself predicts only on macOS) and a reader for the quantized
weights a package holds.

Validation loads the package back and checks: the specification version the deployment target
needs, one function per method, input and output names, dtypes and shapes (Core ML's own
representation: int64 inputs are int32, a scalar is a one-element vector, a traced range is a
range or the enumerated sizes), the KV states (fp16, the traced layout) on the cached methods
only, every op in the deployment target's opset, and every quantized weight present as a
``constexpr_blockwise_shift_scale``."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from omni_export.targets.base import LoweringError, library_chatter

log = logging.getLogger(__name__)

# Core ML's specification version per deployment target (coremltools' _SPECIFICATION_VERSION_*).
SPEC_VERSIONS = {"iOS17": 8, "macOS14": 8, "iOS18": 9, "macOS15": 9}
WEIGHT_OP = "constexpr_blockwise_shift_scale"
# Written by coremltools' backend from its own ops, so not in the op registry: the state write
# that ``coreml_update_state`` becomes in the file (iOS 18, as read_state).
BACKEND_OPS = {"const": None, "write_state": "iOS18"}
# Core ML input types per manifest dtype: Core ML has no int64 inputs (the converter takes them
# as int32; token ids and positions fit).
INPUT_TYPES = {"float32": "FLOAT32", "float16": "FLOAT16", "int64": "INT32", "int32": "INT32"}
NP_INPUTS = {"float32": np.float32, "float16": np.float16, "int64": np.int32, "int32": np.int32}


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """coremltools' progress bars (stderr), warnings and logs go to this package's debug log."""
    err = io.StringIO()
    with library_chatter("coremltools", stdout=True), contextlib.redirect_stderr(err):
        yield
    if err.getvalue().strip():
        log.debug("%s", err.getvalue().strip()[-4000:])


@functools.cache  # registered once, before the first conversion
def _integer_floor_division() -> None:
    """coremltools casts every floor division to fp32 (true of tensors in TorchScript), but in a
    torch.export graph ``//`` also divides symbolic sizes, whose result must stay an integer: a
    frame count cast to fp32 breaks the slice or arange that uses it."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs, promote_input_dtypes
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op
    from coremltools.converters.mil.mil import types

    def floor_divide(context, node):  # type: ignore[no-untyped-def]
        x, y = promote_input_dtypes(_get_inputs(context, node, expected=2))
        if types.is_int(x.dtype):
            context.add(mb.floor_div(x=x, y=y, name=node.name))
        else:
            context.add(mb.cast(x=mb.floor_div(x=x, y=y), dtype="fp32", name=node.name))

    register_torch_op(floor_divide, torch_alias=["floordiv"], override=True)


def deployment(name: str) -> Any:
    import coremltools as ct

    return getattr(ct.target, name)


def _shape(shape: Sequence[int | str], size: int) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else size for d in shape)


def fp32_nodes(program, keep: Sequence[str]) -> set[str]:  # type: ignore[no-untyped-def]
    """Names of the graph nodes that run inside a layer kept in fp32 (by the module path each
    node records): the converter names its ops after them."""
    if not keep:
        return set()
    out = set()
    for node in program.graph.nodes:
        paths = [p for p, _ in (node.meta.get("nn_module_stack") or {}).values()]
        # a kept path is relative to the component; the traced root may wrap it (Call: "module.")
        if any(f".{k}." in f".{p}." for p in paths for k in keep):
            out.add(node.name)
    return out


def compute_precision(program, plan):  # type: ignore[no-untyped-def]
    """fp16, but fp32 for the ops of layers the plan keeps (the whole program when it says so)."""
    import coremltools as ct

    if plan is not None and plan.whole:
        return ct.precision.FLOAT32
    names = fp32_nodes(program, plan.keep if plan is not None else [])
    if not names:
        return ct.precision.FLOAT16
    return ct.transform.FP16ComputePrecision(op_selector=lambda op: not any(op.name == n or op.name.startswith(f"{n}_") for n in names))


def convert(program, spec, target: str, enumerated: dict[str, Sequence[int]], out: Path, plan=None) -> Path:  # type: ignore[no-untyped-def]
    """One traced program -> an ML Program package at ``out`` whose inputs and outputs carry the
    method's names. ``enumerated``: {dim: sizes} for its one dynamic dimension, else as traced;
    ``plan``: the layers measured to need fp32 (targets/precision.py)."""
    with quiet():
        import coremltools as ct

        _integer_floor_division()
        inputs = None
        if enumerated:
            (sizes,) = enumerated.values()
            inputs = [ct.TensorType(name=t.name, dtype=NP_INPUTS[t.dtype], shape=ct.EnumeratedShapes([_shape(t.shape, n) for n in sizes])
                                    if any(isinstance(d, str) for d in t.shape) else _shape(t.shape, 0) or (1,))
                      for t in spec.inputs]  # fmt: skip
        try:
            ep = program.run_decompositions({})
            model = ct.convert(ep, inputs=inputs, convert_to="mlprogram", minimum_deployment_target=deployment(target),
                               compute_precision=compute_precision(ep, plan), skip_model_load=True)  # fmt: skip
        except Exception as exc:  # coremltools raises many types; name the method and the first line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise LoweringError(f"Core ML cannot convert {spec.name}: {type(exc).__name__}: {first}. An op Core ML lacks needs an "
                                "export form every target lowers (see runtime_py/audio.py's periodic_hann for one)") from exc  # fmt: skip
        mspec = model.get_spec()
        desc = mspec.description
        for have, want in [*zip(list(desc.input), spec.inputs, strict=True), *zip(list(desc.output), spec.outputs, strict=True)]:
            if have.name != want.name:
                ct.utils.rename_feature(mspec, have.name, want.name)
        model = ct.models.MLModel(mspec, weights_dir=model.weights_dir, skip_model_load=True)
        model.save(str(out))
    return out


# Blob storage reader/writer calls by the MIL dtype of the value a blob holds.
_BLOB_CALLS = {"INT4": "int4", "INT8": "int8", "UINT8": "uint8", "UINT4": "uint4", "INT16": "int16", "UINT16": "uint16",
               "INT32": "int32", "UINT32": "uint32", "FLOAT16": "fp16", "FLOAT32": "float"}  # fmt: skip
WEIGHTS = Path("Data") / "com.apple.CoreML" / "weights" / "weight.bin"
MODEL = Path("Data") / "com.apple.CoreML" / "model.mlmodel"


def _blob_values(fn) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    """Every Value of a function's ops that lives in the weight file (attributes and bound inputs)."""
    for block in fn.block_specializations.values():
        for op in _ops(block):
            for value in op.attributes.values():
                if value.WhichOneof("value") == "blobFileValue":
                    yield value
            for arg in op.inputs.values():
                for binding in arg.arguments:
                    if binding.WhichOneof("binding") == "value" and binding.value.WhichOneof("value") == "blobFileValue":
                        yield binding.value


def merge(functions: dict[str, Path], default: str, out: Path) -> Path:
    """Packages of one function each -> one multifunction package, weights the functions share
    stored once. Written here from the packages' own files one weight at a time (coremltools'
    save_multifunction loads every function's weights at once: for a 4B LLM it ran out of 24 GB)."""
    import hashlib
    import shutil

    with quiet():
        from coremltools.libmilstoragepython import _BlobStorageReader, _BlobStorageWriter
        from coremltools.proto import MIL_pb2, Model_pb2

    first = next(iter(functions.values()))
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(first, out, ignore=shutil.ignore_patterns("*.bin", "*.mlmodel"))
    writer = _BlobStorageWriter(str(out / WEIGHTS))
    merged = Model_pb2.Model()
    stored: dict[tuple, int] = {}
    for method, package in functions.items():
        spec = load_spec(package)
        if not merged.HasField("mlProgram"):
            merged.specificationVersion = spec.specificationVersion
            merged.description.metadata.CopyFrom(spec.description.metadata)
            merged.mlProgram.version = spec.mlProgram.version
        reader = _BlobStorageReader(str(Path(package) / WEIGHTS))
        fn = merged.mlProgram.functions[method]
        fn.CopyFrom(spec.mlProgram.functions["main"])
        for value in _blob_values(fn):
            call = _BLOB_CALLS[MIL_pb2.DataType.Name(value.type.tensorType.dataType)]
            data = getattr(reader, f"read_{call}_data")(value.blobFileValue.offset)
            key = (call, tuple(d.constant.size for d in value.type.tensorType.dimensions), hashlib.sha1(data.tobytes()).digest())
            if key not in stored:
                stored[key] = getattr(writer, f"write_{call}_data")(data)
            value.blobFileValue.offset = stored[key]
            del data
        d = merged.description.functions.add()
        d.name = method
        d.input.extend(spec.description.input)
        d.output.extend(spec.description.output)
        d.state.extend(spec.description.state)
    merged.description.defaultFunctionName = default
    del writer  # flushes the weight file
    (out / MODEL).write_bytes(merged.SerializeToString())
    return out


# -- reading a package back --------------------------------------------------------------------------
def load_spec(path: Path):  # type: ignore[no-untyped-def]
    with quiet():
        import coremltools as ct

        return ct.utils.load_spec(str(path))


def _ops(block) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from _ops(inner)


def function_ops(spec) -> dict[str, list[Any]]:  # type: ignore[no-untyped-def]
    """Function name -> its ML Program ops (nested blocks included)."""
    out = {}
    for name, fn in spec.mlProgram.functions.items():
        out[name] = [op for block in fn.block_specializations.values() for op in _ops(block)]
    return out


def opset_problems(spec, target: str) -> list[str]:  # type: ignore[no-untyped-def]
    """Ops of the package that the deployment target's opset does not have."""
    with quiet():
        import coremltools.converters.mil.mil.ops.defs  # noqa: F401  (registers every op)
        from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    limit = deployment(target)
    bad = set()
    for fn, ops in function_ops(spec).items():
        for op in ops:
            versions = SSAOpRegistry.core_ops.get(op.type, {})
            if op.type in BACKEND_OPS:
                since = BACKEND_OPS[op.type]
                if since is not None and deployment(since) > limit:
                    bad.add(f"{fn}: {op.type}")
            elif not any(v is not None and v <= limit for v in versions):
                bad.add(f"{fn}: {op.type}")
    return sorted(bad)


@dataclass
class PackageReport:
    functions: list[str]
    spec_version: int
    weights: int  # distinct quantized weights (constexpr_blockwise_shift_scale) across functions
    flexible: dict[str, list[str]] = field(default_factory=dict)  # function -> its inputs with a range shape (off the Neural Engine)
    notes: list[str] = field(default_factory=list)


def _array_shape(f) -> tuple[tuple[int, ...], str]:  # type: ignore[no-untyped-def]
    t = f.type.multiArrayType
    kind = t.WhichOneof("ShapeFlexibility") or "fixed"
    return tuple(t.shape), kind


def _check_io(where: str, features, tensors, enumerated: Sequence[int], problems: list[str], flexible: list[str], inputs: bool) -> None:  # type: ignore[no-untyped-def]
    import coremltools as ct

    names = [f.name for f in features]
    if names != [t.name for t in tensors]:
        problems.append(f"{where}: {'inputs' if inputs else 'outputs'} {names}, the method declares {[t.name for t in tensors]}")
        return
    if not inputs:
        return
    types = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType
    for f, t in zip(features, tensors, strict=True):
        dtype = types.Name(f.type.multiArrayType.dataType)
        if dtype != INPUT_TYPES[t.dtype]:
            problems.append(f"{where}: input {t.name} is {dtype}, the method declares {t.dtype}")
        shape, kind = _array_shape(f)
        want = tuple(t.shape) or (1,)  # Core ML has no scalar inputs: a one-element vector
        if len(shape) != len(want) or any(isinstance(w, int) and s != w for s, w in zip(shape, want, strict=False)):
            problems.append(f"{where}: input {t.name} has shape {list(shape)}, the method declares {list(want)}")
        dynamic = any(isinstance(w, str) for w in want)
        if kind == "enumeratedShapes":
            sizes = sorted({next(s for s, w in zip(e.shape, want, strict=True) if isinstance(w, str))
                            for e in f.type.multiArrayType.enumeratedShapes.shapes})  # fmt: skip
            if sizes != sorted(enumerated):
                problems.append(f"{where}: input {t.name} enumerates {sizes}, the build chose {sorted(enumerated)}")
        elif dynamic:
            if kind != "shapeRange":
                problems.append(f"{where}: input {t.name} is traced with dims {list(want)} but the package fixes its shape")
            flexible.append(f"{t.name} {list(want)}")


def validate(path: Path, traced, target: str, quantized: int, enumerated: dict[str, dict[str, Sequence[int]]]) -> PackageReport:  # type: ignore[no-untyped-def]
    """Check a written package against the traced component; raises LoweringError naming every
    problem."""
    spec = load_spec(path)
    problems: list[str] = []
    need = SPEC_VERSIONS.get(target, 9)
    if spec.specificationVersion < need:
        problems.append(f"specification version {spec.specificationVersion}, {target} needs {need}")
    functions = {f.name: f for f in spec.description.functions}
    if set(functions) != set(traced.programs):
        problems.append(f"functions {sorted(functions)}, the component's methods are {sorted(traced.programs)}")
    flexible: dict[str, list[str]] = {}
    kv = traced.kv
    for name, fn in functions.items():
        ps = traced.program_specs.get(name)
        if ps is None:
            continue
        sizes = next(iter(enumerated.get(name, {}).values()), ())
        ranged: list[str] = []
        _check_io(name, fn.input, ps.inputs, sizes, problems, ranged, True)
        _check_io(name, fn.output, ps.outputs, (), problems, ranged, False)
        if ranged:
            flexible[name] = ranged
        states = list(fn.state)
        if ps.cached and kv is not None:
            want = (1, kv.kv_heads, kv.max_len, kv.head_dim)
            if len(states) != 2 * kv.layers:
                problems.append(f"{name}: {len(states)} states, the KV cache has {2 * kv.layers} (K and V per layer)")
            for s in states:
                arr = s.type.stateType.arrayType
                if tuple(arr.shape) != want:
                    problems.append(f"{name}: state {s.name} has shape {list(arr.shape)}, the KV layout is {list(want)}")
        elif states:
            problems.append(f"{name}: holds states but reads no KV cache")
    problems += [f"op not in the {target} opset: {p}" for p in opset_problems(spec, target)]
    weights = len(quantized_weight_ops(spec))
    if weights != quantized:
        problems.append(f"{weights} of {quantized} quantized weights are {WEIGHT_OP} ops in the package")
    if problems:
        raise LoweringError(f"{path.name} does not match what was traced:\n  - " + "\n  - ".join(problems))
    notes = []
    scalars = [f"{n}.{t.name}" for n, ps in traced.program_specs.items() for t in ps.inputs if not t.shape]
    if scalars:
        notes.append(f"Core ML takes scalar inputs as one-element vectors ({', '.join(scalars)})")
    return PackageReport(sorted(functions), spec.specificationVersion, weights, flexible, notes)


def quantized_weight_ops(spec) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Distinct ``constexpr_blockwise_shift_scale`` weights by the blob their codes are stored at
    (functions of one package share them)."""
    out = {}
    for ops in function_ops(spec).values():
        for op in ops:
            if op.type == WEIGHT_OP:
                data = op.attributes.get("data") or op.inputs["data"].arguments[0].value
                blob = data.blobFileValue if data.WhichOneof("value") == "blobFileValue" else None
                key = f"{blob.fileName}@{blob.offset}" if blob is not None else op.outputs[0].name
                out.setdefault(key, op)
    return out


@dataclass(frozen=True)
class StoredWeight:
    q: Any  # torch int8 [out, in]: the codes
    scale: Any  # torch float32 [out, groups] (stored as fp16)
    offset: Any | None
    dtype: str  # the codes' type in the file: int4 | int8


def read_quantized_weights(path: Path) -> list[StoredWeight]:
    """The codes and scales of every quantized weight in a package, read from its weight file with
    coremltools' own ML Program loader."""
    import torch

    spec = load_spec(path)
    with quiet():
        from coremltools.converters.mil.frontend.milproto.load import load as load_program
        from coremltools.converters.mil.mil.types import builtin_to_string

        program = load_program(spec, spec.specificationVersion, str(Path(path) / WEIGHTS.parent))
    seen: dict[bytes, StoredWeight] = {}
    for fn in program.functions.values():
        for op in fn.find_ops(op_type=WEIGHT_OP):
            q = np.asarray(op.data.val).astype(np.int8)
            key = q.tobytes() + np.asarray(op.scale.val).tobytes()
            offset = None if op.offset is None else torch.from_numpy(np.asarray(op.offset.val).astype(np.int8))
            scale = torch.from_numpy(np.asarray(op.scale.val, dtype=np.float32))
            seen.setdefault(key, StoredWeight(torch.from_numpy(q), scale, offset, builtin_to_string(op.data.dtype)))
    return list(seen.values())


def read_tables(path: Path) -> list[StoredWeight]:
    """Quantized embedding tables (targets/tables.py) in a package: a gather over a rank-2 int8
    (or packed uint8) constant, and the gather with the same indices over an fp16 constant (its
    scales: the next such gather in the function with as many rows; the converter may cast the
    indices separately for each), read with coremltools' ML Program loader."""
    import torch

    from omni_export.targets.tables import unpack_int4

    spec = load_spec(path)
    with quiet():
        from coremltools.converters.mil.frontend.milproto.load import load as load_program

        program = load_program(spec, spec.specificationVersion, str(Path(path) / WEIGHTS.parent))
    seen: dict[bytes, StoredWeight] = {}
    for fn in program.functions.values():
        gathers = [g for g in fn.find_ops(op_type="gather") if g.x.val is not None and np.asarray(g.x.val).ndim == 2]
        for i, g in enumerate(gathers):
            codes = np.asarray(g.x.val)
            if codes.dtype not in (np.int8, np.uint8):
                continue
            scale = next((np.asarray(s.x.val) for s in gathers[i + 1:]
                          if np.asarray(s.x.val).dtype == np.float16 and np.asarray(s.x.val).shape[0] == codes.shape[0]), None)  # fmt: skip
            if scale is None:
                continue
            q = torch.from_numpy(codes.copy())
            bits = 4 if codes.dtype == np.uint8 else 8
            q = unpack_int4(q).to(torch.int8) if bits == 4 else q
            seen.setdefault(codes.tobytes(), StoredWeight(q, torch.from_numpy(scale.astype(np.float32)), None, f"int{bits}"))
    return list(seen.values())
