"""What a build after a missed gate takes from the one before (compiler.kept_from)."""

from dataclasses import replace
from pathlib import Path

import torch

from omni_export.compiler import BuildResult, ComponentBuild, kept_from
from omni_export.export.checkpoint import load_checkpoint
from omni_export.quantize.presets import PRESETS, W8
from omni_export.quantize.recipe import QuantRule
from omni_export.runtime_py.parity import ComponentParity


def _modules(path):  # type: ignore[no-untyped-def]
    ckpt = load_checkpoint(path, components=[])
    with torch.device("meta"):
        return {name: spec.build() for name, spec in ckpt.specs.items()}


def _carry(recipe, failed):  # type: ignore[no-untyped-def]
    names = ("audio_frontend", "vision_encoder", "audio_encoder", "llm", "speech_lm", "flow", "vocoder")
    builds = [ComponentBuild(n, (), 0, [], 1.0, ComponentParity(n, "fp16", {}, failures=["cosine"] if n in failed else []))
              for n in names]  # fmt: skip
    return BuildResult(Path("b.rejected"), "android-sd8g3", recipe.name, builds, 0.0, recipe=recipe)


def test_only_what_failed_or_what_a_changed_rule_touches_is_built_again(tiny_dirs):
    modules = _modules(tiny_dirs["interactiveomni"])
    base = PRESETS.get("int4")
    carry = _carry(base, {"llm"})
    everything_else = {"audio_frontend", "vision_encoder", "audio_encoder", "speech_lm", "flow", "vocoder"}
    # promotion's own kind of change: exact rules for the failed component's layers
    promoted = replace(base, name="int4-mixed", rules=(QuantRule(r"^llm\.model\.layers\.0\.mlp\.down_proj$", W8), *base.rules))
    assert kept_from(carry, promoted, modules) == everything_else
    # a rule that reaches a component that passed takes it out of what is kept
    wide = replace(base, rules=(QuantRule(r"\.fc2$", W8), *base.rules))
    kept = kept_from(carry, wide, modules)
    assert "llm" not in kept and "audio_encoder" not in kept and "flow" in kept
    # so does a rule by role, and a changed embedding or tied-head choice touches every component
    by_role = replace(base, rules=(QuantRule(".", W8, roles=("acoustic",)), *base.rules))
    assert kept_from(carry, by_role, modules) == everything_else - {"flow"}
    assert kept_from(carry, replace(promoted, embeddings=None), modules) == set()
    assert kept_from(carry, promoted, modules) <= everything_else  # a failed component is never kept
    assert kept_from(_carry(base, {"llm", "flow"}), promoted, modules) == everything_else - {"flow"}
