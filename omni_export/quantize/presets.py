"""Named presets: what ``--quant`` accepts. Component patterns cover both families, so every rule
matches something in either (decoders: llm, speech_lm / tts_*; vocoders: vocoder / codec_decoder)."""

from __future__ import annotations

from pathlib import Path

from omni_export.quantize.recipe import (
    QuantConfig,
    QuantRecipe,
    QuantRule,
    load_recipe_toml,
)
from omni_export.registry import Registry

DECODERS = r"^(llm|speech_lm|tts_nar|tts_ar)\."
ENCODERS = r"^(vision_encoder|audio_encoder|flow)\."
VOCODERS = r"^(vocoder|codec_decoder)\."
ANY = r"."

PRESETS: Registry[QuantRecipe] = Registry("quantization preset")

W8 = QuantConfig(bits=8)
W8A8 = QuantConfig(bits=8, activation="int8_dynamic")
W4G32 = QuantConfig(bits=4, group_size=32)
W4_AWQ = QuantConfig(bits=4, group_size=32, method="awq")
W4_GPTQ = QuantConfig(bits=4, group_size=32, method="gptq")

for recipe in (
    QuantRecipe("fp32", (QuantRule(ANY, None),), float_dtype="fp32"),
    QuantRecipe("fp16", (QuantRule(ANY, None),)),
    QuantRecipe("int8", (QuantRule(VOCODERS, None), QuantRule(ANY, W8))),
    QuantRecipe("w8a8", (QuantRule(VOCODERS, None), QuantRule(ANY, W8A8))),
    QuantRecipe("int4", (QuantRule(DECODERS, W4G32), QuantRule(ENCODERS, W8), QuantRule(VOCODERS, None))),
    QuantRecipe("int4-all", (QuantRule(ANY, W4G32),)),
    # int4 with a calibrated method for the decoders (encoders stay 8-bit round-to-nearest).
    QuantRecipe("int4-awq", (QuantRule(DECODERS, W4_AWQ), QuantRule(ENCODERS, W8), QuantRule(VOCODERS, None))),
    QuantRecipe("int4-gptq", (QuantRule(DECODERS, W4_GPTQ), QuantRule(ENCODERS, W8), QuantRule(VOCODERS, None))),
):
    PRESETS.register(recipe.name, recipe)


def resolve_recipe(name_or_path: str) -> QuantRecipe:
    """A preset name, or a path to a recipe TOML file."""
    if name_or_path in PRESETS or not name_or_path.endswith(".toml"):
        return PRESETS.get(name_or_path)
    return load_recipe_toml(Path(name_or_path))
