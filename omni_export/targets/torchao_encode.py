"""QuantResult -> torchao quantized tensors, the form ExecuTorch's XNNPACK delegate lowers.

The integers and scales are handed to torchao as they are; nothing is re-quantized, so what the
``.pte`` holds is the QuantResult (a test reads it back out). XNNPACK's quantized linears take
int8 activations quantized per token at run time (qd8-f32-qc8w / qb4w, or qd8-f16-* in an fp16
body); ExecuTorch 1.5.1 has no correct weight-only path for these tensors (lowering one gave
outputs wrong by two orders of magnitude in our probe), so weight-only configs run with dynamic
int8 activations, as ExecuTorch's own LLM recipes (8da4w) do."""

from __future__ import annotations

import torch
from torch import nn

from omni_export.quantize.recipe import Activation, QuantConfig
from omni_export.quantize.result import QTensor
from omni_export.targets.base import QuantEncodingError


def check(configs: dict[str, QuantConfig], target: str) -> list[str]:
    asym = sorted(f for f, c in configs.items() if not c.symmetric)
    static = sorted(f for f, c in configs.items() if c.activation == Activation.INT8_STATIC.value)
    if asym:
        raise QuantEncodingError(f"{target}: XNNPACK encodes symmetric weights only; set symmetric = true for {asym[:3]}")
    if static:
        raise QuantEncodingError(f"{target}: static int8 activations are not supported by this target; use int8_dynamic for {static[:3]}")
    weight_only = [f for f, c in configs.items() if c.activation == Activation.NONE.value]
    if weight_only:
        return [f"{target}: {len(weight_only)} weight-only linears run with dynamic int8 activations (XNNPACK's quantized linear)"]
    return []


def encode(module: nn.Module, tensors: dict[str, QTensor]) -> None:
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        IntxUnpackedToInt8TensorActivationQuantization,
    )

    for path, qt in tensors.items():
        lin = module.get_submodule(path)
        if not isinstance(lin, nn.Linear) or tuple(lin.weight.shape) != tuple(qt.q.shape):
            raise QuantEncodingError(f"{path}: the QuantResult does not fit this module (shape {tuple(qt.q.shape)}); re-run quantization")
        weight = IntxUnpackedToInt8Tensor(
            qt.q.contiguous(), qt.scale.float().contiguous(), qt.zero.contiguous(),
            getattr(torch, f"int{qt.config.bits}"), (1, qt.group_size), torch.float32,
            IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN,
        )  # fmt: skip
        lin.weight = nn.Parameter(weight, requires_grad=False)


def activations_to(module: nn.Module, dtype: torch.dtype, keep: list[str]) -> None:
    """The encoded linears of ``module`` take ``dtype`` activations (XNNPACK's qd8-f16 kernels
    for fp16), but for those inside the ``keep`` paths, which an fp16 body leaves fp32. The
    codes and scales are the same tensors; the scales stay fp32 (XNNPACK refuses an fp16 scale
    per channel, and converts blockwise ones to bf16 itself)."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    for path, lin in module.named_modules():
        w = getattr(lin, "weight", None)
        if not isinstance(w, IntxUnpackedToInt8Tensor) or any(path == k or path.startswith(k + ".") for k in keep if k):
            continue
        lin.weight = nn.Parameter(IntxUnpackedToInt8Tensor(
            w.qdata, w.scale, w.zero_point, w.target_dtype, w.block_size, dtype, w.activation_quantization,
        ), requires_grad=False)  # fmt: skip
