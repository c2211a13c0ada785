"""ONNX Runtime for desktop CPUs (profile ``desktop-cpu``): one ONNX graph per method, decoder
caches passed as tensors, quantized linears as DequantizeLinear over the QuantResult's integers,
which the CPU provider fuses into MatMulNBits (int8 activations at accuracy level 4)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omni_export.bundle.manifest import RuntimeSettings
from omni_export.export.components.kv import kv_stacks
from omni_export.quantize.recipe import Activation
from omni_export.targets.base import TARGETS, Artifact, LoweringError, QuantEncodingError, Target, apply_floats
from omni_export.targets.onnx_lowering import GraphSet, onnx_forms, swap_quantized, to_onnx
from omni_export.targets.ort_attention import ORT_KV, translations

ARTIFACTS = "artifacts"


class OnnxRuntimeTarget(Target):
    name = "onnxruntime"
    backend = "onnxruntime"
    parity_backend = "onnxruntime"
    kv_mode = ORT_KV.name  # io tensors, attention fused into GroupQueryAttention
    quant_activation = "int8 dynamic per block of 32 inputs (MatMulNBits, accuracy level 4)"

    def kv_mode_for(self, module, profile=None):  # type: ignore[no-untyped-def]
        # GroupQueryAttention is causal over a call; a stack whose calls attend both ways (VITA's
        # TTS prefix) takes the plain growing-tensor io mode, grouped attention as ordinary ops.
        return "io" if any(s.whole_call for s in kv_stacks(module, allocated=False)) else self.kv_mode

    def runtime_settings(self, profile) -> RuntimeSettings:  # type: ignore[no-untyped-def]
        s = profile.onnxruntime
        return RuntimeSettings(threads=s.threads, providers=s.providers,
                               options={"session.qdq_matmulnbits_accuracy_level": str(s.accuracy_level),
                                        "session.intra_op.allow_spinning": "1" if s.spin else "0"})  # fmt: skip

    def check_quant(self, configs, profile=None):  # type: ignore[no-untyped-def]
        static = sorted(f for f, c in configs.items() if c.activation == Activation.INT8_STATIC.value)
        if static:
            raise QuantEncodingError(f"{self.name}: static int8 activations need calibrated activation scales, which the "
                                     f"QuantResult does not carry; use int8_dynamic for {static[:3]}")  # fmt: skip
        dynamic = [f for f, c in configs.items() if c.activation == Activation.INT8_DYNAMIC.value]
        notes = [f"{self.name}: every quantized linear runs as MatMulNBits with int8 activations quantized per block at run time "
                 "(accuracy level 4), so weight-only and int8_dynamic linears run the same kernel"]  # fmt: skip
        return notes if dynamic or configs else []

    def trace_context(self, module, limits, plan=None):  # type: ignore[no-untyped-def]
        return onnx_forms(module)

    def encode(self, module, tensors, floats) -> None:  # type: ignore[no-untyped-def]
        apply_floats(module, floats)
        swap_quantized(module, tensors)

    def lower(self, traced, profile, root: Path, metadata: dict[str, Any], quant) -> Artifact:  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        models, encoded = {}, 0
        for name, program in traced.programs.items():
            models[name], n = to_onnx(program, traced.program_specs[name], quant, translations())
            encoded += n
        if encoded != len(quant):
            raise LoweringError(f"{traced.name}: {encoded} of {len(quant)} quantized weights reached its ONNX graphs")
        rel = f"{ARTIFACTS}/{traced.name}"
        names = GraphSet(root / rel, f"{traced.name}.onnx.data").save(models)
        files = tuple(f"{rel}/{n}" for n in names)
        entries = {method: f"{rel}/{program}.onnx" for method, program in traced.aliases.items()}
        return Artifact(traced.name, files, entries, self.backend, {}, time.perf_counter() - start)


TARGETS.register(OnnxRuntimeTarget.name, OnnxRuntimeTarget())
