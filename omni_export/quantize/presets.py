"""Named presets: what ``--quant`` accepts. Rules choose by component role (DESIGN: LLM and speech
LM 4-bit, encoders 8-bit, vocoder float), so they fit any family whose components say their roles."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from omni_export.quantize.recipe import (
    QuantConfig,
    QuantRecipe,
    QuantRule,
    load_recipe_toml,
)
from omni_export.registry import Registry

ANY = r"."


def by_role(*roles: str, config: QuantConfig | None) -> QuantRule:
    return QuantRule(ANY, config, roles)


PRESETS: Registry[QuantRecipe] = Registry("quantization preset")

W8 = QuantConfig(bits=8)
W8A8 = QuantConfig(bits=8, activation="int8_dynamic")
W4G32 = QuantConfig(bits=4, group_size=32)
W4_AWQ = QuantConfig(bits=4, group_size=32, method="awq")
W4_GPTQ = QuantConfig(bits=4, group_size=32, method="gptq")
ROWS8 = QuantConfig(bits=8)  # embedding tables: one scale per row (ExecuTorch's 8w, optimum's default)
DECODERS, ENCODERS, VOCODERS = ("decoder",), ("encoder", "acoustic"), ("vocoder",)
INT4 = QuantRecipe("int4", (by_role(*DECODERS, config=W4G32), by_role(*ENCODERS, config=W8), by_role(*VOCODERS, config=None)), embeddings=ROWS8)

for recipe in (
    QuantRecipe("fp32", (QuantRule(ANY, None),), float_dtype="fp32"),
    QuantRecipe("fp16", (QuantRule(ANY, None),)),
    QuantRecipe("int8", (by_role(*VOCODERS, config=None), QuantRule(ANY, W8))),
    QuantRecipe("w8a8", (by_role(*VOCODERS, config=None), QuantRule(ANY, W8A8))),
    INT4,
    QuantRecipe("int4-all", (QuantRule(ANY, W4G32),), embeddings=ROWS8),
    # int4 whose tied head has its own 4-bit codes beside the 8-bit table: larger files, fewer
    # bytes read per decode step (docs/quantization, "Promotion by damage per byte").
    replace(INT4, name="int4-own-head", tied_head="own"),
    # int4 with a calibrated method for the decoders (encoders stay 8-bit round-to-nearest).
    QuantRecipe("int4-awq", (by_role(*DECODERS, config=W4_AWQ), by_role(*ENCODERS, config=W8), by_role(*VOCODERS, config=None)), embeddings=ROWS8),
    QuantRecipe("int4-gptq", (by_role(*DECODERS, config=W4_GPTQ), by_role(*ENCODERS, config=W8), by_role(*VOCODERS, config=None)), embeddings=ROWS8),
):
    PRESETS.register(recipe.name, recipe)


def resolve_recipe(name_or_path: str) -> QuantRecipe:
    """A preset name, or a path to a recipe TOML file."""
    if name_or_path in PRESETS or not name_or_path.endswith(".toml"):
        return PRESETS.get(name_or_path)
    return load_recipe_toml(Path(name_or_path))
