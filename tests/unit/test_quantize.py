"""The quantization algorithms on controlled inputs, and the QuantResult's storage."""

import pytest
import torch

from omni_export.export.checkpoint import load_checkpoint
from omni_export.quantize import awq
from omni_export.quantize.cache import quantize_checkpoint
from omni_export.quantize.gptq import gptq
from omni_export.quantize.grid import MIN_SCALE, Grid
from omni_export.quantize.presets import PRESETS
from omni_export.quantize.recipe import (
    QuantConfig,
    QuantRecipe,
    QuantRule,
    load_recipe_toml,
    recipe_toml,
)
from omni_export.quantize.result import QuantResult
from omni_export.quantize.rtn import rtn

W4 = QuantConfig(bits=4, group_size=32)


def _out_err(x, w, qt):
    ref = x @ w.T
    return float((x @ qt.dequantize().T - ref).norm() / ref.norm())


@pytest.fixture
def layer():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g) * 0.05
    # Correlated inputs with a few loud channels, as LLM activations have.
    mix = torch.randn(128, 128, generator=g) * 0.3 + torch.eye(128)
    x = torch.randn(512, 128, generator=g) @ mix
    x[:, :4] *= 20
    return w, x


@pytest.mark.parametrize("cfg", [QuantConfig(bits=8), W4, QuantConfig(bits=4, group_size=32, symmetric=False)])
def test_rtn_codes_and_scales(layer, cfg):
    w, _ = layer
    qt = rtn(w, cfg)
    grid = qt.grid
    assert qt.q.dtype == torch.int8 and grid.qmin <= int(qt.q.min()) and int(qt.q.max()) <= grid.qmax
    # Scales survive both bf16 (XNNPACK) and fp16 (Core ML, TensorRT) unchanged.
    assert torch.equal(qt.scale.to(torch.bfloat16).float(), qt.scale)
    assert torch.equal(qt.scale.half().float(), qt.scale) and float(qt.scale.min()) >= MIN_SCALE
    err = (qt.dequantize() - w).abs().reshape(96, -1, qt.group_size)
    assert bool((err <= qt.scale[..., None] * 0.5 + 1e-7).all())  # round to nearest: half a step at most


def test_gptq_beats_rtn_on_correlated_inputs(layer):
    w, x = layer
    e_rtn, e_gptq = _out_err(x, w, rtn(w, W4)), _out_err(x, w, gptq(w, x.T @ x, W4))
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


def test_gptq_codes_stay_on_the_grid(layer):
    w, x = layer
    qt = gptq(w, x.T @ x, W4)
    grid = Grid(4, 32, True)
    assert grid.qmin <= int(qt.q.min()) and int(qt.q.max()) <= grid.qmax and qt.scale.shape == (96, 4)
    assert torch.equal(qt.scale.to(torch.bfloat16).float(), qt.scale)


def test_awq_scale_and_clip_lower_output_error(layer):
    w, x = layer
    s, ratio = awq.search_scale(x, [w], W4)
    assert ratio > 0  # loud channels are worth protecting
    scaled = rtn(w * s, W4, awq.search_clip(x / s, w * s, W4))
    ref = x @ w.T
    e_awq = float((((x / s) @ scaled.dequantize().T) - ref).norm() / ref.norm())
    assert e_awq < _out_err(x, w, rtn(w, W4)), e_awq


def test_recipe_toml_round_trip(tmp_path):
    r = QuantRecipe("mixed", (QuantRule(r"^llm\.lm_head$", QuantConfig(bits=8)), *PRESETS.get("int4").rules))
    path = tmp_path / "r.toml"
    path.write_text(recipe_toml(r))
    assert load_recipe_toml(path) == r


@pytest.mark.parametrize("method", ["rtn", "awq", "gptq"])
def test_quant_result_is_cached_and_reloads_identically(tiny_dirs, method):
    ckpt = load_checkpoint(tiny_dirs["interactiveomni"], dtype=torch.float32)
    cfg = QuantConfig(bits=4, group_size=32, method=method)
    recipe = QuantRecipe(f"llm-{method}", (QuantRule(r"^llm\.", cfg), QuantRule(".", None)))
    first, where = quantize_checkpoint(ckpt, recipe)
    again, where2 = quantize_checkpoint(ckpt, recipe)
    assert where == where2 and (where / "result.json").is_file()
    assert set(first.tensors) == set(again.tensors) and "llm.lm_head" in first.tensors  # the tied head, untied
    for name, t in first.tensors.items():
        assert torch.equal(t.q, again.tensors[name].q) and torch.equal(t.scale, again.tensors[name].scale)
    assert all(k.startswith("llm.") for k in first.tensors)
    if method == "awq":  # scales folded into the norms that feed q/k/v and gate/up
        assert any(k.endswith("input_layernorm.weight") for k in first.floats)
    if method != "rtn":  # calibrated: the report has the layer's output error on real inputs
        assert all("output_rel_err" in first.layers[k] for k in first.tensors)
    (where / "tensors.safetensors").write_bytes(b"garbage")
    with pytest.raises(Exception, match="delete that directory"):
        QuantResult.load(where)
