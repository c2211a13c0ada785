import pytest

from omni_export.errors import ConfigError, ProfileError
from omni_export.export.families import FAMILIES
from omni_export.profiles import all_profiles, get_profile
from omni_export.profiles.fit import fit_check, memory_plan
from omni_export.quantize.presets import PRESETS, resolve_recipe
from omni_export.quantize.recipe import (
    QuantConfig,
    QuantRecipe,
    QuantRule,
    load_recipe_toml,
)

IO = FAMILIES.get("interactiveomni")


def test_presets_exist_and_match_both_families():
    assert {"fp32", "fp16", "int8", "w8a8", "int4", "int4-all"} <= set(PRESETS)
    for fam_name in FAMILIES:
        fam = FAMILIES.get(fam_name)
        for preset in PRESETS:
            memory_plan(fam, fam.preset("tiny"), PRESETS.get(preset), 256)  # raises if a rule matches nothing


def test_int4_preset_assignments_follow_roles_not_names():
    r = PRESETS.get("int4")
    assert r.config_for("llm.model.layers.0.mlp.up_proj.weight", "decoder") == QuantConfig(bits=4, group_size=32)
    assert r.config_for("tts_ar.ar.layers.0.self_attn.q_proj.weight", "decoder").bits == 4
    assert r.config_for("audio_encoder.encoder.layers.0.fc1.weight", "encoder").bits == 8
    assert r.config_for("flow.encoder.encoders.0.self_attn.linear_q.weight", "acoustic").bits == 8
    assert r.config_for("vocoder.conv_pre.weight", "vocoder") is None and r.config_for("codec_decoder.codebook.weight", "vocoder") is None
    # A family with other component names gets the same precision from the roles its classes declare.
    assert r.config_for("talker.layers.0.mlp.up_proj.weight", "decoder").bits == 4
    assert r.config_for("code2wav.conv.weight", "vocoder") is None


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: QuantConfig(bits=3), "bits must be 4 or 8"),
        (lambda: QuantConfig(bits=4, group_size=48), "power of two"),
        (lambda: QuantConfig(bits=4, method="magic"), "magic"),
        (lambda: QuantRule("llm.(", None), "not a valid regular expression"),
        (lambda: resolve_recipe("int5"), "unknown quantization preset 'int5'.*int4"),
    ],
)
def test_invalid_recipes_fail_before_work(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_rule_matching_nothing_is_an_error():
    recipe = QuantRecipe("typo", (QuantRule(r"^lmm\.", QuantConfig(bits=4, group_size=32)), QuantRule(".", None)))
    with pytest.raises(ConfigError, match="lmm"):
        memory_plan(IO, IO.preset("tiny"), recipe, 128)


def test_recipe_toml(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('name = "mine"\n[[rules]]\npattern = "^llm\\\\."\nbits = 4\ngroup_size = 64\n[[rules]]\npattern = "."\nfloat = true\n')
    r = load_recipe_toml(path)
    assert r.config_for("llm.x") == QuantConfig(bits=4, group_size=64) and r.config_for("flow.x") is None
    path.write_text('[[rules]]\nroles = ["decoder"]\nbits = 4\ngroup_size = 32\n[[rules]]\npattern = "."\nfloat = true\n')
    r = load_recipe_toml(path)
    assert r.config_for("anything.x", "decoder").bits == 4 and r.config_for("anything.x", "encoder") is None
    assert load_recipe_toml(_roundtrip(tmp_path, r)) == r
    path.write_text('[[rules]]\nroles = ["talker"]\nbits = 4\n')
    with pytest.raises(ConfigError, match="talker"):
        load_recipe_toml(path)
    path.write_text('[[rules]]\npattern = "."\nbits = 4\ngroupsize = 32\n')
    with pytest.raises(ConfigError, match="groupsize"):
        load_recipe_toml(path)


def test_a_recipe_quantizes_embedding_tables_by_its_own_table(tmp_path):
    from dataclasses import replace

    recipe = replace(PRESETS.get("int4"), name="mine", embeddings=QuantConfig(bits=4, group_size=32))
    assert load_recipe_toml(_roundtrip(tmp_path, recipe)) == recipe
    rule = '[[rules]]\nroles = ["decoder"]\nbits = 4\n'
    for table, error in (('method = "gptq"', "round-to-nearest"), ("rows = 1", "rows"), ("bits = 3", "bits")):
        (tmp_path / "t.toml").write_text(f"{rule}[embeddings]\nbits = 8\n{table}\n" if "bits" not in table else f"{rule}[embeddings]\n{table}\n")
        with pytest.raises(ConfigError, match=error):
            load_recipe_toml(tmp_path / "t.toml")


def _roundtrip(tmp_path, recipe):
    from omni_export.quantize.recipe import recipe_toml

    path = tmp_path / "again.toml"
    path.write_text(recipe_toml(recipe))
    return path


def test_precision_class_comes_from_the_configs_not_the_name():
    from omni_export.quantize.recipe import precision_class

    w4, w8 = QuantConfig(bits=4, group_size=32), QuantConfig(bits=8)
    assert precision_class([], "decoder") == "fp32" and precision_class([], "vocoder", "fp16") == "fp16"
    assert precision_class([w4, w8], "decoder") == "int4" and precision_class([w4], "encoder") == "int4-all"
    assert precision_class([w8], "encoder") == "int8"
    assert precision_class([QuantConfig(bits=8, activation="int8_dynamic")], "decoder") == "w8a8"


def test_profiles_and_aliases():
    names = set(all_profiles())
    assert {"jetson-orin-nano", "jetson-agx-orin", "jetson-thor", "rtx-4090", "iphone-15-pro", "mac-m3", "android-sd8g3", "host-cpu"} <= names
    assert get_profile("jetson").name == "jetson-orin-nano"
    assert get_profile("iphone").name == "iphone-15-pro"
    assert get_profile("android").name == "android-sd8g3"
    assert get_profile("desktop-gpu").name == "rtx-4090"
    for p in all_profiles().values():
        assert p.bandwidth_gbs > 0 and p.usable_memory_gb <= p.memory_gb and p.default_quant in PRESETS
    with pytest.raises(ProfileError, match="unknown profile 'pixel'"):
        get_profile("pixel")


def test_profile_rejects_unknown_keys():
    from omni_export.profiles import _parse

    with pytest.raises(ConfigError, match="bandwith_gbs"):
        _parse("x", 'description="d"\ntarget="onnxruntime"\nmemory_gb=1\nusable_memory_gb=1\nbandwith_gbs=1\n')


def test_full_4b_fit_on_orin_nano():
    cfg, nano = IO.preset("full"), get_profile("jetson-orin-nano")
    fp16, int4 = fit_check(nano, IO, cfg, PRESETS.get("fp16"), 2048), fit_check(nano, IO, cfg, PRESETS.get("int4"), 2048)
    assert not fp16.fits and int4.fits
    # At the profile's whole 4096 context it does not: CosyVoice2's flow (112.5 M parameters) and
    # its streaming state (each ODE step's windows, fp16) take the last 0.1 GB.
    whole = fit_check(nano, IO, cfg, PRESETS.get("int4"))
    assert not whole.fits and -0.2e9 < whole.margin_bytes < 0 and 0.2e9 < whole.plan.stream_bytes < 0.3e9
    llm16 = next(c for c in fp16.plan.components if c.name == "llm")
    llm4 = next(c for c in int4.plan.components if c.name == "llm")
    assert abs(llm16.params - 4.02e9) < 0.01e9  # Qwen3-4B, tied embedding counted once
    assert llm16.weight_bytes == pytest.approx(2 * llm16.params, rel=1e-3)
    # Linears at 4 bits + an fp16 scale per 64 (the int4 preset as TensorRT builds it); the
    # embedding table stays float (fp16 on TensorRT) and the tied head is quantized as its own copy.
    table = cfg.llm.vocab_size * cfg.llm.hidden_size
    assert llm4.params == llm16.params + table and llm4.precision == "int4 g64"
    assert llm4.weight_bytes == pytest.approx((llm4.params - table) * (0.5 + 2 / 64) + table * 2, rel=0.01)
    # KV: 36 layers x 8 heads x 128 x 2048 positions x K,V x fp16, plus the speech LM's.
    assert int4.plan.kv_bytes >= 36 * 8 * 128 * 2048 * 2 * 2


def test_fit_counts_floats_as_the_target_stores_them():
    # ONNX Runtime's CPU provider keeps what the recipe leaves float, and the KV cache, in fp32.
    cfg = IO.preset("full")
    nano, desktop = get_profile("jetson-orin-nano"), get_profile("desktop-cpu")
    a, b = fit_check(nano, IO, cfg, PRESETS.get("int4"), 4096), fit_check(desktop, IO, cfg, PRESETS.get("int4"), 4096)
    assert (a.plan.float_dtype, b.plan.float_dtype) == ("fp16", "fp32")
    assert b.plan.kv_bytes == 2 * a.plan.kv_bytes
    voc_a, voc_b = (next(c for c in f.plan.components if c.name == "vocoder") for f in (a, b))
    assert voc_b.weight_bytes == pytest.approx(2 * voc_a.weight_bytes, rel=1e-3) and voc_b.precision == "fp32"


def test_fit_counts_executorch_caches_and_tied_heads_as_the_profile_holds_them():
    # android: quantized stacks keep an fp16 cache (host-cpu, same target, an fp32 one); an fp32
    # build keeps fp32. The 4B's tied head shares its table's codes there: counted once.
    cfg = IO.preset("full")
    android, host = get_profile("android"), get_profile("host-cpu")
    a, h = (fit_check(p, IO, cfg, PRESETS.get("int4"), 4096) for p in (android, host))
    assert h.plan.kv_bytes == 2 * a.plan.kv_bytes and (a.plan.kv_dtype, h.plan.kv_dtype) == ("fp16", "")
    assert fit_check(android, IO, cfg, PRESETS.get("fp32"), 4096).plan.kv_bytes == h.plan.kv_bytes
    # flow and vocoder, which keep the streaming state, stay fp32 where the rest computes fp16
    assert (a.plan.float_dtype, a.plan.stream_dtype, a.plan.stream_bytes) == ("fp16", "fp32", h.plan.stream_bytes)
    llm = lambda f: next(c for c in f.plan.components if c.name == "llm")  # noqa: E731
    ort = fit_check(get_profile("desktop-cpu"), IO, cfg, PRESETS.get("int4"), 4096)  # the head's own int4 codes
    vocab, hidden, layers, head_dim = 151936, 2560, 36, 128
    # and android runs its float layers (the RMSNorms: two per layer, q/k norms, the last) in fp16
    norms = layers * (2 * hidden + 2 * head_dim) + hidden
    assert llm(ort).weight_bytes - llm(a).weight_bytes == pytest.approx(vocab * hidden * (0.5 + 2 / 32) + norms * (4 - 2), rel=1e-6)


def test_the_host_check_counts_what_the_job_holds_at_its_largest_phase():
    """The job holds the quantized codes (about a byte a weight) until they are cached, then
    builds one component at a time; lowering the largest costs what the 4B run measured per
    byte of its traced weights. VITA-1.5 (7B-shaped) at int4 is refused on a 24 GiB host before
    any work, saying what it needs; so is its fp16 build (traced in fp32). The tiny one fits; a
    host that gives no figure is not refused."""
    from dataclasses import replace

    from omni_export.profiles.host import CODE_BYTES, LOWERING_FACTOR, RUNTIME_BYTES, host_fit

    fam = FAMILIES.get("vita15")
    int4, fp16 = (memory_plan(fam, fam.preset("full"), PRESETS.get(q), 4096) for q in ("int4", "fp16"))
    llm = next(c.params for c in int4.components if c.name == "llm")
    quantized = sum(c.params for c in int4.components if not c.precision.startswith("fp"))
    refused = host_fit(int4, available=24 * 2**30)
    assert not refused.fits and refused.largest == ("llm", llm) and llm > 7e9
    assert refused.floor_bytes == max(int(quantized * CODE_BYTES), int(LOWERING_FACTOR * llm * CODE_BYTES)) + RUNTIME_BYTES
    assert f"{refused.floor_bytes / 1e9:.1f} GB" in refused.explain() and "25.8 GB is available" in refused.explain()
    as_float = host_fit(fp16, available=24 * 2**30)
    assert not as_float.fits and as_float.floor_bytes == int(LOWERING_FACTOR * 4 * llm) + RUNTIME_BYTES
    assert host_fit(memory_plan(fam, fam.preset("tiny"), PRESETS.get("int4"), 256), available=24 * 2**30).fits
    assert host_fit(int4, available=10**12).fits
    assert replace(refused, available_bytes=None).fits  # a host that does not say is not refused


def test_executorch_lowers_fp16_only_where_the_profile_computes_it_and_parity_allows():
    from omni_export.targets import TARGETS

    et = TARGETS.get("executorch")
    android, host = get_profile("android"), get_profile("host-cpu")
    assert et.float_class_for(android, PRESETS.get("fp16")) == "fp16"
    # the host-cpu profile computes fp32; an fp32 build stays fp32
    assert et.float_class_for(host, PRESETS.get("fp16")) == "fp32"
    assert et.float_class_for(android, PRESETS.get("fp32")) == "fp32"
    assert et.float_class_for(host, PRESETS.get("int4"), "decoder") == "fp32"
    # quantized stacks take fp16 activations (XNNPACK's qd8-f16 linears) where the profile computes fp16
    assert et.float_class_for(android, PRESETS.get("int4")) == "fp16"
    assert et.float_class_for(android, PRESETS.get("int4"), "decoder") == "fp16"
    assert et.float_class_for(android, PRESETS.get("int4"), "encoder") == "fp16"
    # measured: the vocoder's waveform misses the gate, flow's cached chunks come out NaN, VITA's
    # log-mel misses its gate
    for role in ("frontend", "vocoder", "acoustic"):
        assert et.float_class_for(android, PRESETS.get("fp16"), role) == "fp32"
        assert et.float_class_for(android, PRESETS.get("int4"), role) == "fp32"
    cfg = IO.preset("full")
    a, h = (fit_check(p, IO, cfg, PRESETS.get("fp16"), 4096) for p in (android, host))
    assert (a.plan.float_dtype, h.plan.float_dtype) == ("fp16", "fp32")
    assert h.plan.kv_bytes == 2 * a.plan.kv_bytes
    comp = lambda f, name: next(c for c in f.plan.components if c.name == name)  # noqa: E731
    assert comp(h, "llm").weight_bytes == pytest.approx(2 * comp(a, "llm").weight_bytes, rel=1e-3)
    # the vocoder stays fp32 in an fp16 build, and fit counts it so
    assert comp(a, "vocoder").weight_bytes == comp(h, "vocoder").weight_bytes and "fp32" in comp(a, "vocoder").precision
    with pytest.raises(ProfileError, match="float_dtype must be fp32 or fp16"):
        from omni_export.profiles import ExecuTorchSettings

        ExecuTorchSettings(float_dtype="bf16")
