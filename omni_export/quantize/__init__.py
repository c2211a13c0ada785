"""Quantization, computed once per (checkpoint, recipe) into a QuantResult that every target
encodes unchanged: recipes and presets, the RTN / AWQ / GPTQ algorithms on one integer grid,
multimodal calibration, the on-disk cache, sensitivity analysis and the trained fixture."""
