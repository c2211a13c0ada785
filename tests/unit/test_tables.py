"""Quantized embedding tables: the form every target lowers, what the presets and recipes ask for,
and what the fit check counts."""

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from omni_export.export.families import FAMILIES
from omni_export.profiles.fit import memory_plan
from omni_export.quantize.engine import plan, tied_pairs
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
    assert cfgs["llm.lm_head"] == ROWS8  # the tied head takes its table's quantization: one set of codes
    own = plan(_meta(tiny["interactiveomni"]), replace(PRESETS.get("int4"), tied_head="own"))
    assert own["llm.lm_head"] == G32  # its own int4 linear
    assert not any(f in tables for f in plan(_meta(tiny["interactiveomni"]), PRESETS.get("int8")))


def test_a_tied_head_holds_its_tables_codes_through_the_cache(tiny, tmp_path):
    """Quantized as the table, the head holds the very codes and scales the table got; the saved
    QuantResult stores them once and loads them back shared."""
    from omni_export.quantize.engine import quantize_components
    from omni_export.quantize.result import QuantResult

    ck = tiny["interactiveomni"]
    modules = {n: copy.deepcopy(m) for n, m in ck.components.items()}
    result = quantize_components(modules, PRESETS.get("int4"), "fp", ck.tokenizer)
    head, table = result.tensors["llm.lm_head"], result.tensors["llm.model.embed_tokens"]
    assert head is table and result.shares("llm.lm_head") == "llm.model.embed_tokens"
    assert result.shares("llm.model.embed_tokens") is None
    result.save(tmp_path / "q")
    back = QuantResult.load(tmp_path / "q")
    assert back.tensors["llm.lm_head"] is back.tensors["llm.model.embed_tokens"]
    assert torch.equal(back.tensors["llm.lm_head"].q, head.q) and back.shares("llm.lm_head") == "llm.model.embed_tokens"
    # untied stacks keep their heads: VITA-1.5's Qwen2 has its own lm_head weights
    assert not tied_pairs({n: m for n, m in _meta(tiny["vita15"]).items()}, PRESETS.get("int4"))


def test_the_recipe_says_how_a_tied_head_is_quantized(tmp_path):
    from omni_export.errors import ConfigError
    from omni_export.quantize.recipe import load_recipe_toml, recipe_toml

    assert PRESETS.get("int4").tied_head == "table"
    own = PRESETS.get("int4-own-head")
    assert own.tied_head == "own" and own.rules == PRESETS.get("int4").rules and own.embeddings == PRESETS.get("int4").embeddings
    with pytest.raises(ConfigError, match="tied_head must be one of"):
        replace(PRESETS.get("int4"), tied_head="both")
    mine = replace(PRESETS.get("int4"), name="mine", tied_head="own")
    (tmp_path / "r.toml").write_text(recipe_toml(mine))
    assert load_recipe_toml(tmp_path / "r.toml") == mine
    (tmp_path / "bad.toml").write_text(recipe_toml(mine).replace('tied_head = "own"', 'tied_head = "twice"'))
    with pytest.raises(ConfigError, match="tied_head"):
        load_recipe_toml(tmp_path / "bad.toml")


def test_only_a_target_that_stores_the_codes_once_shares_a_head_by_default(tiny):
    """ExecuTorch keeps the preset's shared head (one copy in its .ptd); ONNX Runtime and Core ML,
    which would store the codes twice, give the head its own smaller int4 codes, and say so."""
    modules = _meta(tiny["interactiveomni"])
    recipe, _ = recipe_for_target(TARGETS.get("executorch"), PRESETS.get("int4"), modules)
    assert recipe.tied_head == "table"
    assert any("stored once" in n for n in check_plan(TARGETS.get("executorch"), modules, plan(modules, recipe)))
    for name in ("onnxruntime", "coreml"):
        recipe, notes = recipe_for_target(TARGETS.get(name), PRESETS.get("int4"), modules)
        assert recipe.tied_head == "own" and any("second copy of the table" in n for n in notes), name
    # a recipe the user wrote is kept as written: shared codes, stored twice there, said so
    mine = replace(PRESETS.get("int4"), name="mine")
    ort = TARGETS.get("onnxruntime")
    assert recipe_for_target(ort, mine, modules)[0].tied_head == "table"
    assert any("stored twice" in n for n in check_plan(ort, modules, plan(modules, mine)))


def test_fit_counts_a_table_at_its_quantized_bytes(tiny):
    ck = tiny["interactiveomni"]
    family = FAMILIES.get("interactiveomni")
    int4 = PRESETS.get("int4")
    own = replace(int4, tied_head="own")
    with_tables, without = (memory_plan(family, ck.config, r, 256) for r in (own, replace(int4, embeddings=None)))
    llm = lambda p: next(c for c in p.components if c.name == "llm")  # noqa: E731
    vocab, hidden = ck.components["llm"].model.embed_tokens.weight.shape
    row8 = vocab * hidden + vocab * 2  # 1 byte per weight plus one fp16 scale per row
    # fp16 (2 bytes) -> 1 byte per weight plus one fp16 scale per row
    assert llm(without).weight_bytes - llm(with_tables).weight_bytes == vocab * hidden * 2 - row8
    assert "embeddings int8 per row" in llm(with_tables).precision
    # a head quantized as its table: the table's bytes again where the target stores two copies,
    # nothing where it stores one
    assert llm(memory_plan(family, ck.config, own, 256, share_tied=True)).weight_bytes == llm(with_tables).weight_bytes
    twice, once = (llm(memory_plan(family, ck.config, int4, 256, share_tied=s)).weight_bytes for s in (False, True))
    assert twice - once == row8
    assert llm(with_tables).weight_bytes - once == vocab * hidden // 2 + vocab * (hidden // 32) * 2  # the int4 head's codes and scales


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
