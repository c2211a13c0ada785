"""Core ML for iPhone, iPad and Mac (profiles iphone-15-pro, mac-m3): one ML Program
``.mlpackage`` per component, converted with coremltools from the traced programs.

- Every method of a component is a *function* of one multifunction package (coremltools'
  ``MultiFunctionDescriptor``), so weights shared by methods are stored once.
- Decoder KV caches are Core ML *states* (iOS 18 / macOS 15): fp16 buffers written by a slice
  update at the call's first position (``state`` KV mode), shared by the ``prefill`` and
  ``decode`` functions; a caller starts a conversation with a new state.
- Compute is fp16 (coremltools' fp16 pass over the fp32 trace), with the ops of the layers
  measured to need fp32 (targets/precision.py, as for TensorRT) kept in fp32; method inputs and
  outputs stay fp32.
- Quantized linears are torchao ``dequantize_affine`` over the QuantResult's integers, which
  coremltools writes as ``constexpr_blockwise_shift_scale`` (int4 block-wise, int8 per channel)
  holding those integers and scales as they are (a test reads them back).
- ``prefill``'s token count is enumerated (powers of two up to the prefill chunk): the Neural
  Engine runs fixed or enumerated shapes only. Methods left with a flexible (range) shape are
  recorded as running on CPU and GPU, with the reason, in the manifest.

Core ML predicts only on macOS: elsewhere every package is loaded back and validated
(targets/coreml_package.py) and parity is recorded as not run on this host."""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omni_export.bundle.manifest import RuntimeSettings
from omni_export.quantize.engine import plan
from omni_export.quantize.recipe import Activation
from omni_export.targets.base import (
    TARGETS,
    Artifact,
    LoweringError,
    QuantEncodingError,
    Target,
    apply_floats,
    library_chatter,
    swap_linears,
)
from omni_export.targets.precision import matmul_spectra, measure_fp16

ARTIFACTS = "artifacts"
NEURAL_ENGINE_UNITS = ("CPU_AND_NE", "ALL")
FALLBACK_UNITS = "CPU_AND_GPU"


class DequantizedLinear(nn.Module):
    """A quantized nn.Linear as ``dequantize_affine(q, scale, zero) @ x``: the QuantResult's
    integers and scales as buffers, which coremltools encodes as they are."""

    def __init__(self, lin: nn.Linear, qt: Any) -> None:
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.bits, self.group = qt.config.bits, qt.group_size
        self.register_buffer("q", qt.q.contiguous())
        self.register_buffer("scale", qt.scale.float().contiguous())
        self.register_buffer("zero", None if qt.config.symmetric else qt.zero.contiguous())
        self.bias = lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        w = torch.ops.torchao.dequantize_affine(self.q, [1, self.group], self.scale, self.zero, torch.int8, lo, hi, self.scale.dtype)
        return F.linear(x, w.to(x.dtype), self.bias)


def token_sizes(chunk: int, smallest: int = 8) -> tuple[int, ...]:
    """The prefill lengths a package accepts: powers of two from ``smallest`` to the chunk, and
    the chunk itself. A runtime splits a prompt into these and decodes the remainder (< smallest)
    one token at a time, so no call is padded."""
    sizes = []
    n = smallest
    while n < chunk:
        sizes.append(n)
        n *= 2
    return (*sizes, chunk)


MAX_ENUMERATED = 16  # Core ML compiles a program per enumerated shape: a handful, not hundreds


def enumerations(spec) -> dict[str, tuple[int, ...]]:  # type: ignore[no-untyped-def]
    """The sizes a method's one dynamic dimension is enumerated with, so the Neural Engine can
    run it: a cached method's token count (prefill) as ``token_sizes``, any other dimension
    whose traced range holds at most MAX_ENUMERATED sizes (image tiles) as every size. Methods
    with several dynamic dimensions or a long range (audio samples) stay flexible: {}."""
    dims = {d.__name__: d for shapes in spec.dynamic_shapes or () if shapes for d in shapes.values()}
    if len(dims) != 1:
        return {}
    (name, d), = dims.items()
    if spec.cached:
        return {name: token_sizes(int(d.max))}
    if int(d.max) - int(d.min) + 1 <= MAX_ENUMERATED:
        return {name: tuple(range(int(d.min), int(d.max) + 1))}
    return {}


class CoreMLTarget(Target):
    name = "coreml"
    backend = "coreml"
    parity_backend = "coreml"  # Core ML itself, on a macOS build host; elsewhere "not run on this host"
    kv_mode = "state"
    float_class = "fp16"
    quant_activation = "fp16 (weight-only: constexpr_blockwise_shift_scale int4 block-wise / int8 per-channel, decompressed to fp16)"

    def runtime_settings(self, profile) -> RuntimeSettings:  # type: ignore[no-untyped-def]
        return RuntimeSettings(compute_units=profile.coreml.compute_units)

    def check_quant(self, configs, profile=None):  # type: ignore[no-untyped-def]
        for path, c in configs.items():
            if c.bits not in (4, 8):
                raise QuantEncodingError(f"{path}: Core ML's block-wise weights are 4- or 8-bit, not {c.bits}-bit")
            if c.activation != Activation.NONE.value:
                raise QuantEncodingError(f"{path}: Core ML decompresses quantized weights to fp16 and has no int8 activation path "
                                         f"here; set activation = \"none\" (the w8a8 preset does this itself on this target)")  # fmt: skip
        return [f"{self.name}: quantized linears are constexpr_blockwise_shift_scale weights decompressed to fp16"] if configs else []

    def adapt_recipe(self, recipe, components):  # type: ignore[no-untyped-def]
        """Presets that quantize activations (w8a8) run weight-only here: Core ML has no dynamic
        int8 activations."""
        if recipe.is_float or not any(c.activation != Activation.NONE.value for c in plan(components, recipe).values()):
            return recipe, []
        rules = tuple(replace(r, config=replace(r.config, activation=Activation.NONE.value)) if r.config else r for r in recipe.rules)
        return replace(recipe, rules=rules), [f"{self.name}: preset {recipe.name} runs weight-only here (int8 weights, fp16 "
                                              "activations): Core ML has no dynamic int8 activation quantization"]  # fmt: skip

    def precision_plan(self, module, run_script, skip, precision):  # type: ignore[no-untyped-def]
        return measure_fp16(module, run_script, skip)

    def trace_context(self, module, limits, plan=None):  # type: ignore[no-untyped-def]
        # Traced in fp32: coremltools' own fp16 pass lowers it (its converters mishandle fp16
        # torch graphs: a LayerNorm's fp32 epsilon against fp16 weights), keeping the measured
        # layers in fp32; ``lower`` reads the plan from the module (the compiler's copy).
        module._omni_precision_plan = plan
        return matmul_spectra(module)

    def encode(self, module, tensors, floats) -> None:  # type: ignore[no-untyped-def]
        with library_chatter("torch", "torchao"):
            import torchao.quantization.quant_primitives  # noqa: F401  (registers torchao::dequantize_affine)
        apply_floats(module, floats)
        swap_linears(module, tensors, lambda lin, path, qt: DequantizedLinear(lin, qt))

    def lower(self, traced, profile, root: Path, metadata: dict[str, Any], quant) -> Artifact:  # type: ignore[no-untyped-def]
        from omni_export.targets import coreml_package as pkg

        start = time.perf_counter()
        rel = f"{ARTIFACTS}/{traced.name}/{traced.name}.mlpackage"
        plan = getattr(traced.module, "_omni_precision_plan", None)
        target = profile.coreml.minimum_deployment_target
        sizes = {method: enumerations(spec) for method, spec in traced.program_specs.items()}
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".coreml-", dir=root) as scratch:
            functions = {method: pkg.convert(program, traced.program_specs[method], target, sizes[method],
                                             Path(scratch) / f"{method}.mlpackage", plan)
                         for method, program in traced.programs.items()}  # fmt: skip
            pkg.merge(functions, next(iter(traced.programs)), root / rel)
        report = pkg.validate(root / rel, traced, target, len(quant), sizes)
        units = {}
        if profile.coreml.compute_units in NEURAL_ENGINE_UNITS:
            units = {m: (FALLBACK_UNITS, f"flexible input shape ({', '.join(f)}): the Neural Engine runs fixed or enumerated shapes only")
                     for m, f in report.flexible.items()}  # fmt: skip
        files = sorted(p.relative_to(root).as_posix() for p in (root / rel).rglob("*") if p.is_file())
        main = f"{rel}/Manifest.json"
        return Artifact(traced.name, (main, *(f for f in files if f != main)), {m: f"{rel}#{m}" for m in traced.aliases},
                        self.backend, {}, time.perf_counter() - start, notes=tuple(f"{traced.name}: {n}" for n in report.notes),
                        enumerated={m: e for m, e in sizes.items() if e}, compute_units=units)  # fmt: skip


def function_of(entry: str) -> tuple[str, str]:
    """``package#function`` -> (package path, function name)."""
    package, sep, function = entry.rpartition("#")
    if not sep or not re.fullmatch(r"\w+", function):
        raise LoweringError(f"{entry!r} is not a Core ML entry (package#function)")
    return package, function


TARGETS.register(CoreMLTarget.name, CoreMLTarget())
