"""The vocabulary a component uses to describe its exported methods: example inputs, dynamic
shapes and named inputs/outputs with symbolic dims. Each component class says its own methods
(``Component.export_methods``); this module holds only what they share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.export import Dim

from omni_export.export.components.base import component
from omni_export.export.components.kv import kv_stacks, reset_kv


@dataclass(frozen=True)
class Limits:
    """Upper bounds the traced graphs accept (and the runtime enforces)."""

    max_context: int = 1024
    # Prefill is traced up to this many tokens and longer prompts are prefilled chunk by chunk:
    # memory planning sizes a method for its largest shapes, and a full-context prefill would plan
    # attention scores and logits for the whole context (3.3 GB for the small demo at 4096).
    prefill_chunk: int = 256
    max_tiles: int = 13
    # Memory planning sizes every activation for a method's largest call, so a method is traced
    # for the largest call the runtime makes, not the largest a model could take: image tiles
    # per call (None: all of an image's tiles at once; a phone profile asks fewer and the runtime
    # encodes an image in several calls) and mel frames per vocoder window (the stream's left
    # context + one flow chunk + lookahead fits with room; longer spans go in several windows).
    tiles_per_call: int | None = None
    vocoder_window: int = 96
    max_audio_s: int = 30
    max_speech_tokens: int = 1024
    max_text_chunk: int = 64


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # str = symbolic dim


@dataclass(frozen=True)
class MethodSpec:
    name: str
    module: nn.Module  # its forward is the method
    example_inputs: tuple[torch.Tensor, ...]
    dynamic_shapes: tuple | None
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    # Reads and writes the component's KV cache (prefill, decode): a target that passes the cache
    # as tensors traces these as one graph with the cache inputs and outputs appended.
    cached: bool = False
    resets: bool = False  # zeroes the cache (reset_cache); not needed where the caller owns it

    def manifest(self) -> dict[str, list[dict]]:
        """The method's I/O as the manifest records it."""
        as_dict = lambda t: {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}  # noqa: E731
        return {"inputs": [as_dict(t) for t in self.inputs], "outputs": [as_dict(t) for t in self.outputs]}


class Call(nn.Module):
    """Exposes one method of a component as ``forward`` (what torch.export traces). Every method
    of a component is wrapped the same way, so weights and KV buffers keep one name across methods
    and a multi-method program stores each once and shares the cache."""

    def __init__(self, module: nn.Module, method: str = "forward") -> None:
        super().__init__()
        self.module, self.method = module, method

    def forward(self, *args: torch.Tensor):  # type: ignore[no-untyped-def]
        return getattr(self.module, self.method)(*args)


class ResetCache(Call):
    """Zeroes every KV cache of the component. Shipping zeroed caches inside the file would cost a
    full cache image per method; a reset method costs nothing and also starts new conversations."""

    def forward(self) -> torch.Tensor:  # type: ignore[override]
        reset_kv(self.module)
        return torch.full((1,), len(kv_stacks(self.module)), dtype=torch.int64)


class DecoderStep(Call):
    """Prefill and decode of a decoder stack (``hidden`` then ``logits`` of the component):
    embeddings at positions -> logits of the last position only, which is all a sampler reads (a
    256-token prefill chunk would otherwise compute, plan and return 256 rows of logits: 155 MB
    fp32 at Qwen3's vocabulary), and with ``with_hidden`` the hidden states of every position (the
    speech decoder reads them)."""

    def __init__(self, module: nn.Module, with_hidden: bool = False) -> None:
        super().__init__(module)
        self.with_hidden = with_hidden

    def forward(self, embeds: torch.Tensor, input_pos: torch.Tensor):  # type: ignore[no-untyped-def]
        hidden = self.module.hidden(embeds, input_pos)
        # A traced decode has one position: slicing it would export an ``alias`` Core ML refuses.
        one = isinstance(hidden.shape[1], int) and hidden.shape[1] == 1
        logits = self.module.logits(hidden if one else hidden[:, hidden.shape[1] - 1 :])
        return (logits, hidden) if self.with_hidden else logits


def method_specs(module: nn.Module, limits: Limits) -> list[MethodSpec]:
    return component(module).export_methods(limits)


F32, I64 = "float32", "int64"
_dims: dict[tuple[str, int, int], Dim] = {}


def dim(name: str, lo: int, hi: int) -> Dim:
    # One Dim object per (name, range) so specs that share a name share a symbol.
    key = (name, lo, hi)
    if key not in _dims:
        _dims[key] = Dim(name, min=lo, max=hi)
    return _dims[key]


def dtype_of(m: nn.Module) -> torch.dtype:
    """The float dtype most of ``m``'s parameters hold (a mixed-precision module keeps a few
    layers in fp32 inside an fp16 body: its activations are fp16), or the type it computes in
    while it runs in another than it stores (export/widen.computing_in)."""
    from omni_export.export.widen import compute_dtype

    if (computes := compute_dtype(m)) is not None:
        return computes
    counts: dict[torch.dtype, int] = {}
    for p in m.parameters():
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.__getitem__)


DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int64: "int64", torch.int32: "int32"}
TORCH_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


def lm_steps(step: Call, hidden_in: int, outs: Callable[[str | int], tuple[Tensor, ...]], lim: Limits, dtype) -> list[MethodSpec]:
    t = dim("tokens", 2, min(lim.prefill_chunk, lim.max_context))
    return [
        MethodSpec("reset_cache", ResetCache(step.module), (), None, (), (Tensor("stacks", I64, (1,)),), resets=True),
        MethodSpec("prefill", step, (torch.randn(1, 8, hidden_in, dtype=dtype), torch.arange(8)), ({1: t}, {0: t}),
                   (Tensor("embeds", F32, (1, "tokens", hidden_in)), Tensor("input_pos", I64, ("tokens",))), outs("tokens"), cached=True),
        MethodSpec("decode", step, (torch.randn(1, 1, hidden_in, dtype=dtype), torch.tensor([8])), None,
                   (Tensor("embeds", F32, (1, 1, hidden_in)), Tensor("input_pos", I64, (1,))), outs(1), cached=True),
    ]  # fmt: skip


