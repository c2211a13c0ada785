"""Will it fit? Weights at the chosen precision + KV cache at the chosen context + the largest
activation peak + runtime overhead, against a profile's usable memory, before any export work.

Weights are counted from the components built on the meta device (no RAM, exact shapes), so the
figure for an 8B model costs milliseconds. Activations are an estimate (documented below)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from omni_export.errors import ConfigError
from omni_export.export.checkpoint import meta_build
from omni_export.export.components.internvit import InternViTConfig
from omni_export.export.components.base import role_of
from omni_export.export.components.base import component
from omni_export.export.components.kv import kv_stacks
from omni_export.export.families import ComponentSpec, Family
from omni_export.export.trace_specs import Limits
from omni_export.profiles import Profile
from omni_export.quantize.engine import config_of, tied_pairs, untie_heads, weight_roles
from omni_export.quantize.recipe import QuantConfig, QuantRecipe, embedding_kind

GB = 1e9
RUNTIME_OVERHEAD = 300_000_000  # interpreter/runtime, tokenizer, audio and I/O buffers
AUDIO_FRAMES = 1500  # 30 s at 50 Hz, Whisper's window


@dataclass(frozen=True)
class ComponentMemory:
    name: str
    params: int
    weight_bytes: int
    precision: str


@dataclass(frozen=True)
class MemoryPlan:
    recipe: str
    context: int
    components: tuple[ComponentMemory, ...]
    kv_bytes: int
    activation_bytes: int
    overhead_bytes: int
    float_dtype: str = "fp16"  # what the target stores float tensors and the KV cache as
    # State a streaming component keeps between calls (the flow's attention windows, the vocoder's
    # source window), in the float type of the components that keep it.
    stream_bytes: int = 0
    kv_dtype: str = ""  # the cache's type where the target holds it in one of its own (else float_dtype)
    stream_dtype: str = ""  # the streaming components' float type(s), where not float_dtype

    @property
    def weight_bytes(self) -> int:
        return sum(c.weight_bytes for c in self.components)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.stream_bytes + self.activation_bytes + self.overhead_bytes


@dataclass(frozen=True)
class FitResult:
    profile: Profile
    plan: MemoryPlan

    @property
    def available_bytes(self) -> int:
        return int(self.profile.usable_memory_gb * GB)

    @property
    def margin_bytes(self) -> int:
        return self.available_bytes - self.plan.total_bytes

    @property
    def fits(self) -> bool:
        return self.margin_bytes >= 0


def _float_bytes(float_dtype: str) -> int:
    return 4 if float_dtype == "fp32" else 2


def _describe(cfgs: set[QuantConfig | None], float_name: str) -> str:
    names = sorted(
        float_name if c is None else f"int{c.bits}" + (f" g{c.group_size}" if c.group_size else "") +
        ("+a8" if c.activation != "none" else "")
        for c in cfgs
    )  # fmt: skip
    return " / ".join(names)


def component_memory(spec: ComponentSpec, module: nn.Module, recipe: QuantRecipe, share_tied: bool = False,
                     float_dtype: str | None = None) -> ComponentMemory:  # fmt: skip
    """Bytes as the build stores them: linears by the recipe's rules, the decoders' embedding
    tables by its ``embeddings`` config (float when it has none); a tied head quantized as its
    table takes the table's config, and no bytes of its own where the target shares them.
    ``float_dtype``: what stays float, where the target keeps this component's in a type of its
    own (ExecuTorch's fp32 vocoder in an fp16 build); else the recipe's."""
    float_dtype = float_dtype or recipe.float_dtype
    fb = _float_bytes(float_dtype)
    role = role_of(module).value
    tied = tied_pairs({spec.name: module}, recipe)
    total, params, used, tables = 0.0, 0, set(), set()
    # a quantized tied head holds its table's tensor until encoded: counted under both names
    for name, t in list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers()):
        path, _, leaf = name.rpartition(".")
        owner = module.get_submodule(path) if path else module
        weight = leaf == "weight" and t.ndim == 2 and isinstance(owner, (nn.Linear, nn.Embedding))
        fqn = f"{spec.name}.{path}"
        if weight and fqn in tied:
            if not share_tied:
                total += t.numel() * recipe.embeddings.bytes_per_weight(t.shape[1])  # type: ignore[union-attr]
            params += t.numel()
            continue
        # rules match module paths (what the quantizer checks), not parameter names
        cfg = config_of(recipe, fqn, role, owner) if weight else None
        if isinstance(owner, nn.Linear) and weight:
            used.add(cfg)
        elif cfg is not None:
            tables.add(cfg)
        if cfg is None:
            total += t.numel() * (fb if t.is_floating_point() else t.element_size())
        else:
            total += t.numel() * cfg.bytes_per_weight(t.shape[1])
        params += t.numel()
    what = _describe(used or ({None} if params else set()), float_dtype)
    if tables:
        what += f"; embeddings {embedding_kind(next(iter(tables)))}"
    return ComponentMemory(spec.name, params, int(total), what)


def _kv_bytes(module: nn.Module, context: int, elem: int) -> int:
    total = 0
    for m in kv_stacks(module, allocated=False):
        c = m.cfg
        total += 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * context * elem
    return total


def _linear_dims(module: nn.Module) -> tuple[int, int]:
    ins = [m.in_features for m in module.modules() if isinstance(m, nn.Linear)] or [1]
    outs = [m.out_features for m in module.modules() if isinstance(m, nn.Linear)] or [1]
    return max(ins), max(outs)


def activation_estimate(family: Family, cfg: Any, modules: dict[str, nn.Module], context: int, elem: int) -> int:
    """Peak of: an LLM prefill chunk of the traced size (hidden states, MLP intermediates, attention scores against the
    whole cache, fp32 logits of the last token); one vision tile; 30 s through the audio encoder.
    Components run one after another, so the peak is the largest of them, not their sum."""
    llm = family.llm_config(cfg)
    chunk = min(context, Limits.prefill_chunk)
    peaks = [
        chunk * (4 * llm.hidden_size + 2 * llm.intermediate_size) * elem
        + llm.num_attention_heads * chunk * context * elem
        + llm.vocab_size * 4
    ]
    vision = getattr(cfg, "vision", None)
    if isinstance(vision, InternViTConfig):
        n = vision.patches_per_side**2 + 1
        peaks.append(n * (4 * vision.hidden_size + vision.intermediate_size) * elem + vision.num_attention_heads * n * n * elem)
    if "audio_encoder" in modules:
        d, w = _linear_dims(modules["audio_encoder"])
        peaks.append(AUDIO_FRAMES * (4 * d + w) * elem)
    return max(peaks)


def check_context(context: int | None, what: str = "--context") -> None:
    """A context length is a positive number of tokens (None: the profile's)."""
    if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 1):
        raise ConfigError(f"{what} must be a positive number of tokens, got {context!r}; leave it out for the profile's own")


def memory_plan(family: Family, cfg: Any, recipe: QuantRecipe, context: int, specs: Sequence[ComponentSpec] | None = None,
                share_tied: bool = False, kv_elem: int | None = None, float_of: Callable[[str], str] | None = None) -> MemoryPlan:  # fmt: skip
    """``kv_elem``: bytes per KV cache element where the target holds the cache in a type of its
    own (ExecuTorch's fp16 cache); else the float type's. ``float_of(role)``: a component's float
    type where the target decides it per role; else the recipe's."""
    check_context(context)
    specs = list(specs or family.specs(cfg))
    modules = {s.name: meta_build(s) for s in specs}
    if not recipe.is_float:
        untie_heads(modules)  # as the quantizer will: a tied head quantized is a second copy
    # the same (module path, role) pairs the quantizer checks, so a plan refuses exactly what a build would
    recipe.check_matches(weight_roles(modules).items())
    elem = _float_bytes(recipe.float_dtype)
    comps = tuple(component_memory(s, modules[s.name], recipe, share_tied, float_of(role_of(modules[s.name]).value) if float_of else None)
                  for s in specs)  # fmt: skip
    kv = sum(_kv_bytes(modules[s.name], context, kv_elem or elem) for s in specs)
    streams = {s.name: (n, float_of(role_of(modules[s.name]).value) if float_of else recipe.float_dtype)
               for s in specs if (n := component(modules[s.name]).stream_state_elements())}  # fmt: skip
    stream = sum(n * _float_bytes(dtype) for n, dtype in streams.values())
    dtypes = {dtype for _, dtype in streams.values()}
    stream_dtype = "" if dtypes <= {recipe.float_dtype} else "/".join(sorted(dtypes))
    act = activation_estimate(family, cfg, modules, context, elem)
    return MemoryPlan(recipe.name, context, comps, kv, act, RUNTIME_OVERHEAD, recipe.float_dtype, stream,
                      {2: "fp16", 4: "fp32"}.get(kv_elem, "") if kv_elem else "", stream_dtype)  # fmt: skip


def fit_check(profile: Profile, family: Family, cfg: Any, recipe: QuantRecipe, context: int | None = None) -> FitResult:
    from omni_export.targets import TARGETS

    from omni_export.targets.base import recipe_for_target

    check_context(context)
    # Counted as the target stores it: a preset as the target adapts it (TensorRT's int4 blocks),
    # and a target whose float class is fp32 (ONNX Runtime's CPU provider, ExecuTorch's XNNPACK
    # here) keeps the recipe's float tensors and the KV cache in fp32.
    share, float_of = False, None
    if profile.target in TARGETS:
        target = TARGETS.get(profile.target)
        recipe, _ = recipe_for_target(target, recipe, {s.name: meta_build(s) for s in family.specs(cfg)})
        recipe = replace(recipe, float_dtype=target.float_class_for(profile, recipe))
        share = not target.no_shared_head
        float_of = functools.partial(target.float_class_for, profile, recipe)
    # ExecuTorch's fp16 cache is for quantized stacks and fp16 builds (an fp32 build keeps its gate's fp32 cache)
    kv16 = (profile.target == "executorch" and profile.executorch is not None and profile.executorch.kv_dtype == "fp16"
            and (not recipe.is_float or recipe.float_dtype == "fp16"))
    plan = memory_plan(family, cfg, recipe, context or profile.max_context, share_tied=share, kv_elem=2 if kv16 else None,
                       float_of=float_of)  # fmt: skip
    if profile.tensorrt is not None:
        plan = replace(plan, overhead_bytes=plan.overhead_bytes + (profile.tensorrt.workspace_mb << 20))
    return FitResult(profile, plan)
