"""Quantized embedding tables: the form every target lowers, what the presets and recipes ask for,
and what the fit check counts."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from omni_export.export.families import FAMILIES
from omni_export.profiles.fit import memory_plan
from omni_export.quantize.engine import plan
from omni_export.quantize.presets import PRESETS
from omni_export.quantize.recipe import QuantConfig
from omni_export.quantize.rtn import rtn
from omni_export.targets import TARGETS
from omni_export.targets.base import LoweringError, QuantEncodingError, check_plan, recipe_for_target
from omni_export.targets.tables import QuantizedEmbedding, pack_int4, split_tables, swap_tables, unpack_int4

ROWS8, G32 = QuantConfig(bits=8), QuantConfig(bits=4, group_size=32)


def _meta(ckpt):  # type: ignore[no-untyped-def]
    """Weightless modules of a checkpoint (plan() unties heads: never on the shared fixture's)."""
    with torch.device("meta"):
        return {name: spec.build() for name, spec in ckpt.specs.items()}


def test_int4_codes_pack_two_per_byte_and_unpack_exactly():
    q = torch.randint(-8, 8, (5, 64), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 32)
    assert torch.equal(unpack_int4(packed).to(torch.int8), q)


@pytest.mark.parametrize("cfg", [ROWS8, G32, QuantConfig(bits=4, group_size=16, symmetric=False)])
def test_a_quantized_table_gives_the_dequantized_rows_and_stores_only_codes(cfg):
    w = torch.randn(300, 64, generator=torch.Generator().manual_seed(0))
    qt = rtn(w, cfg)
    table = QuantizedEmbedding(qt, torch.float32)
    ids = torch.tensor([[0, 299, 17, 17, 5]])
    assert torch.equal(table(ids), qt.dequantize()[ids])
    assert table.codes.nbytes == 300 * 64 * cfg.bits // 8 and table.scale.dtype == torch.float16
    assert not any(b.is_floating_point() and b.shape == w.shape for b in table.buffers())


def test_swap_replaces_only_the_tables_the_result_names():
    m = nn.ModuleDict({"emb": nn.Embedding(40, 32), "other": nn.Embedding(40, 32), "lin": nn.Linear(32, 32)})
    tensors = {"emb": rtn(m["emb"].weight.detach(), ROWS8), "lin": rtn(m["lin"].weight.detach(), ROWS8)}
    tables, linears = split_tables(m, tensors)
    assert list(tables) == ["emb"] and list(linears) == ["lin"]
    swap_tables(m, tables)
    assert isinstance(m["emb"], QuantizedEmbedding) and isinstance(m["other"], nn.Embedding)
    with pytest.raises(LoweringError, match="does not fit this table"):
        swap_tables(m, {"other": rtn(torch.randn(8, 32), ROWS8)})


def test_int4_presets_quantize_decoder_tables_8_bit_per_row_and_nothing_else(tiny):
    modules = _meta(tiny["interactiveomni"])
    cfgs = plan(modules, PRESETS.get("int4"))
    tables = {f: c for f, c in cfgs.items() if isinstance(modules[f.split(".")[0]].get_submodule(f.split(".", 1)[1]), nn.Embedding)}
    assert tables and all(c == ROWS8 for c in tables.values())
    assert "llm.model.embed_tokens" in tables and "speech_lm.speech_embedding" in tables
    assert {f.split(".")[0] for f in tables} <= {"llm", "speech_lm"}  # decoders only: not Whisper's positions
    assert cfgs["llm.lm_head"] == G32  # the tied head is its own int4 linear
    assert not any(f in tables for f in plan(_meta(tiny["interactiveomni"]), PRESETS.get("int8")))


def test_fit_counts_a_table_at_its_quantized_bytes(tiny):
    ck = tiny["interactiveomni"]
    family = FAMILIES.get("interactiveomni")
    int4 = PRESETS.get("int4")
    with_tables, without = (memory_plan(family, ck.config, r, 256) for r in (int4, replace(int4, embeddings=None)))
    llm = lambda p: next(c for c in p.components if c.name == "llm")  # noqa: E731
    vocab, hidden = ck.components["llm"].model.embed_tokens.weight.shape
    # fp16 (2 bytes) -> 1 byte per weight plus one fp16 scale per row
    assert llm(without).weight_bytes - llm(with_tables).weight_bytes == vocab * hidden * 2 - (vocab * hidden + vocab * 2)
    assert "embeddings int8 per row" in llm(with_tables).precision


def test_tensorrt_keeps_tables_float_and_refuses_a_recipe_that_asks(tiny):
    trt = TARGETS.get("tensorrt")
    modules = _meta(tiny["interactiveomni"])
    recipe, notes = recipe_for_target(trt, PRESETS.get("int4"), modules)
    assert recipe.embeddings is None and any("embedding tables stay float" in n for n in notes)
    mine = replace(PRESETS.get("int8"), name="mine", embeddings=ROWS8)
    with pytest.raises(QuantEncodingError, match="remove \\[embeddings\\]"):
        check_plan(trt, modules, plan(modules, mine))
    et = TARGETS.get("executorch")
    assert any("embedding table(s) stored int8 per row" in n for n in check_plan(et, modules, plan(modules, PRESETS.get("int4"))))
