"""The tensorrt target on both tiny families: strongly typed fp16 graphs with fp32 method I/O
and an fp16 KV cache as explicit tensors, weight-only int4/int8 DequantizeLinear over the
QuantResult's integers (the same as the .pte's), every op checked against TensorRT's ONNX
operator table, a build plan and build script, refusals before any work, and parity of the exact
graphs on ONNX Runtime. Tests that need TensorRT itself run where `import tensorrt` works."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
import torch
from typer.testing import CliRunner

from omni_export.bundle import read_manifest, verify_bundle
from omni_export.cli import app
from omni_export.compiler import build_bundle
from omni_export.profiles import TensorRTSettings, get_profile
from omni_export.quantize.presets import PRESETS
from omni_export.quantize.recipe import load_recipe_toml
from omni_export.targets import LoweringError, QuantEncodingError
from omni_export.targets.tensorrt_ops import op_table, problems

CONTEXT = 320  # as the bundles in conftest.py
# VITA-1.5 on this target only in the slow run: the default run holds its budget with one family
FAMILIES = [pytest.param("interactiveomni"), pytest.param("vita15", marks=pytest.mark.slow)]
runner = CliRunner()

try:
    import tensorrt  # noqa: F401

    NO_TENSORRT = ""
except ImportError as exc:  # the CI machines cannot install it (its wheels fetch libraries from an unreachable host)
    NO_TENSORRT = f"TensorRT is not importable here ({exc})"
needs_tensorrt = pytest.mark.skipif(bool(NO_TENSORRT) or not torch.cuda.is_available(), reason=NO_TENSORRT or "no CUDA GPU")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_component_passes_fp16_parity_on_the_exact_tensorrt_graphs(trt_bundles, family):
    result = trt_bundles[family]
    m = read_manifest(result.bundle)
    assert m.profile.target == "tensorrt" and m.quant.float_dtype == "fp16"
    for b in result.components:
        c = m.components[b.name]
        assert c.backend == "tensorrt" and c.parity_backend == "onnxruntime" and c.precision == "fp16"
        assert b.parity.passed and b.parity.backend == "onnxruntime", (b.name, b.parity.failures, b.parity.not_run)
        assert b.parity.worst("fp16")["cosine"] >= 0.999, b.name
    assert verify_bundle(result.bundle) == []


def test_graphs_are_fp16_inside_with_fp32_methods_and_an_fp16_cache(trt_bundles):
    root = trt_bundles["interactiveomni"].bundle
    c = read_manifest(root).components["llm"]
    kv = c.kv_cache
    assert kv.held_as == "io" and kv.dtype == "float16" and c.methods["prefill"].entry == c.methods["decode"].entry
    g = onnx.load(str(root / c.methods["decode"].entry), load_external_data=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output]}
    F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert types["embeds"] == F32 and types["logits"] == F32 and types["input_pos"] == onnx.TensorProto.INT64
    assert all(types[n] == F16 for n in [*kv.inputs, *kv.outputs])
    weights = [t for t in g.initializer if len(t.dims) == 2 and "rope" not in t.name and t.name != "unsqueeze_1"]
    assert len(weights) >= 7 and all(t.data_type == F16 for t in weights), [t.name for t in weights if t.data_type != F16]
    # the only fp32 table: RoPE's inverse frequencies (angles are computed in fp32, as the reference does)
    assert [list(t.dims) for t in g.initializer if t.data_type == F32 and len(t.dims) == 2] == [[1, kv.head_dim // 2]]
    matmuls = [n for n in g.node if n.op_type in ("MatMul", "Gemm")]
    assert matmuls and not [n for n in g.node if n.op_type in ("GroupQueryAttention", "SimplifiedLayerNormalization")]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_graph_holds_only_ops_and_types_tensorrt_parses(trt_bundles, family):
    import onnx_ir as ir

    t = op_table()
    assert t.tensorrt_version.startswith("10.") and t.source.startswith("https://github.com/onnx/onnx-tensorrt/")
    root = trt_bundles[family].bundle
    graphs = sorted(root.glob("artifacts/*/*.onnx"))
    assert len(graphs) >= 7
    for f in graphs:
        assert problems(ir.load(f)) == [], f
    # The audio front end's spectrum is matmuls over the DFT basis here (TensorRT has no DFT).
    ops = {n.op_type for n in onnx.load(str(root / "artifacts/audio_frontend/forward.onnx"), load_external_data=False).graph.node}
    assert "DFT" not in ops and "MatMul" in ops


def test_an_op_tensorrt_cannot_parse_fails_the_export_naming_component_node_and_op(tiny_dirs, tmp_path, monkeypatch):
    """The audio front end with its FFT kept (as ONNX Runtime and ExecuTorch take it): the
    export stops at that component, before anything is published."""
    from omni_export.runtime_py import audio

    real = audio.power_spectrum
    monkeypatch.setattr(audio, "power_spectrum", lambda frames, n_fft, form="fft": real(frames, n_fft, "fft"))
    out = tmp_path / "b"
    with pytest.raises(LoweringError) as e:
        build_bundle(get_profile("jetson"), tiny_dirs["interactiveomni"], PRESETS.get("fp16"), out, context=CONTEXT)
    msg = str(e.value)
    assert "audio_frontend/forward.onnx" in msg and "(DFT)" in msg and "node node_DFT" in msg and "has no DFT" in msg
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_type_tensorrt_refuses_is_named_with_what_it_takes():
    class Clamp(torch.nn.Module):
        def forward(self, ids):
            return ids.clamp(0, 5) * 2

    model = torch.onnx.export(Clamp(), (torch.tensor([1, 7]),), dynamo=True, verbose=False).model
    found = problems(model)
    assert len(found) == 1 and "(Clip)" in found[0] and "is INT64" in found[0] and "it takes FP32, FP16, BF16" in found[0]


@pytest.mark.slow  # its own tiny int4 build, minutes: the default run holds its budget (run with -m slow)
def test_int4_integers_in_the_tensorrt_graphs_equal_the_quant_result_and_the_pte(quant_bundles, tiny_dirs, tmp_path, holds_exactly,
                                                                                 quant_result_of):  # fmt: skip
    """The int4 preset on TensorRT uses blocks of 64 (TensorRT's blocks are 64 or 128): every
    quantized weight in the TensorRT graphs is the QuantResult's, codes and scales, and the
    ExecuTorch target lowering the LLM from that same QuantResult writes the same numbers into
    its .pte: one QuantResult, two targets. (The LLM alone: a whole ExecuTorch bundle costs
    minutes here and adds no other encoding.)"""
    from omni_export.export.checkpoint import load_checkpoint
    from omni_export.export.trace import trace_component
    from omni_export.export.trace_specs import Limits
    from omni_export.quantize.engine import untie_heads
    from omni_export.targets import TARGETS
    from omni_export.targets.onnx_weights import read_component
    from omni_export.targets.pte_weights import read_quantized_weights as read_pte

    trt = quant_bundles("jetson", "interactiveomni", "int4")
    assert any("int4 blocks of 64" in n for n in trt.notes)
    assert any("embedding tables stay float" in n for n in trt.notes)
    assert all(b.parity.passed for b in trt.components), [(b.name, b.parity.failures) for b in trt.components]
    result = quant_result_of(trt)
    m = read_manifest(trt.bundle)
    for name, comp in m.components.items():
        holds_exactly(result.for_component(name), read_component([trt.bundle / f for f in comp.files]), name)
    tensors = result.for_component("llm")
    assert {(t.config.bits, t.group_size) for t in tensors.values()} == {(4, 64)}
    et = TARGETS.get("executorch")
    llm = load_checkpoint(tiny_dirs["interactiveomni"], dtype=torch.float32, components=["llm"]).components["llm"]
    untie_heads({"llm": llm})  # as the quantizer did: the tied head quantized as its own linear
    et.encode(llm, tensors, result.floats_for("llm"))
    limits = Limits(max_context=CONTEXT, prefill_chunk=min(Limits.prefill_chunk, CONTEXT))
    with et.trace_context(llm, limits):
        traced = trace_component("llm", llm, limits, et.kv_mode)
    art = et.lower(traced, get_profile("android"), tmp_path, {}, tensors)
    holds_exactly(tensors, read_pte(tmp_path / art.files[0]), "llm (pte)")


@pytest.mark.slow  # an int8 variant of the int4 integers test above (45 s); run with -m slow
def test_int8_weights_are_per_channel_with_fp16_scales(quant_bundles):
    r = quant_bundles("jetson", "vita15", "int8")
    assert all(b.parity.passed for b in r.components), [(b.name, b.parity.failures) for b in r.components]
    c = read_manifest(r.bundle).components["llm"]
    g = onnx.load(str(r.bundle / c.methods["decode"].entry), load_external_data=False).graph
    inits = {t.name: t for t in g.initializer}
    dqs = [n for n in g.node if n.op_type == "DequantizeLinear"]
    assert dqs
    for n in dqs:
        assert inits[n.input[0]].data_type == onnx.TensorProto.INT8 and len(n.input) == 2  # no zero point
        assert inits[n.input[1]].data_type == onnx.TensorProto.FLOAT16 and len(inits[n.input[1]].dims) == 1


def test_build_plan_script_and_trtexec_lines(trt_bundles, tmp_path):
    root = trt_bundles["interactiveomni"].bundle
    m = read_manifest(root)
    plan = json.loads((root / "tensorrt/build_plan.json").read_text())
    assert plan["sm_arch"] == "sm_87" and plan["workspace_mb"] == 1024 and plan["strongly_typed"]
    assert {"tensorrt/build_plan.json", "tensorrt/build_engines.py"} <= set(m.files)
    graphs = {e["onnx"] for e in plan["engines"]}
    assert graphs == {meth.entry for c in m.components.values() for meth in c.methods.values()}
    step = next(e for e in plan["engines"] if e["onnx"] == m.components["llm"].methods["decode"].entry)
    decode, prefill = step["profiles"]
    assert decode["name"] == "decode" and prefill["name"] == "prefill"
    assert decode["shapes"]["embeds"]["max"][1] == 1 and prefill["shapes"]["embeds"]["max"][1] == m.model["prefill_chunk"]
    assert decode["shapes"]["past_key_0"]["min"][2] == 0 and decode["shapes"]["past_key_0"]["max"][2] == CONTEXT
    for e in plan["engines"]:  # every input of every graph has min <= opt <= max
        g = onnx.load(str(root / e["onnx"]), load_external_data=False).graph
        for p in e["profiles"]:
            assert set(p["shapes"]) == {i.name for i in g.input}, e["onnx"]
            for s in p["shapes"].values():
                assert all(a <= o <= b for a, o, b in zip(s["min"], s["opt"], s["max"], strict=True))
    readme = (root / "README.md").read_text()
    assert readme.count("trtexec --onnx=") == len(plan["engines"]) and "--stronglyTyped" in readme
    assert f"--minShapes=embeds:1x1x{m.model['llm']['hidden_size']}" in readme
    if NO_TENSORRT:  # the script says where it runs, and changes nothing
        p = subprocess.run([sys.executable, str(root / "tensorrt/build_engines.py")], capture_output=True, text=True, timeout=120)
        assert p.returncode == 3 and "run this on the device" in p.stderr
        r = runner.invoke(app, ["build-engines", str(root)], catch_exceptions=False)
        assert r.exit_code == 5 and "not importable here" in r.output
        r = runner.invoke(app, ["verify", str(root)], catch_exceptions=False)
        assert r.exit_code == 0 and f"TensorRT engines: 0 of {len(plan['engines'])} built" in r.output


def test_a_precision_the_device_lacks_is_refused_before_any_work(tiny_dirs, tmp_path):
    xavier = replace(get_profile("jetson"), name="jetson-xavier", description="Jetson AGX Xavier", tensorrt=TensorRTSettings("sm_72", ("fp16", "int8")))
    with pytest.raises(QuantEncodingError, match=r"jetson-xavier \(Jetson AGX Xavier, sm_72\) has no int4 \(it needs SM 7.5"):
        build_bundle(xavier, tiny_dirs["vita15"], PRESETS.get("int4"), tmp_path / "b", context=CONTEXT)
    assert not list(tmp_path.iterdir())
    with pytest.raises(Exception, match="fp8 needs SM 8.9 or newer; this device is sm_87"):
        TensorRTSettings("sm_87", ("fp16", "fp8"))


def test_recipes_tensorrt_cannot_encode_are_refused_saying_what_to_change(tiny_dirs, tmp_path):
    g32 = tmp_path / "g32.toml"
    g32.write_text('name = "mine"\n[[rules]]\npattern = "."\nroles = ["decoder"]\nbits = 4\ngroup_size = 32\n')
    with pytest.raises(QuantEncodingError, match=r"blocks of \(64, 128\), not 32; set group_size"):
        build_bundle(get_profile("jetson"), tiny_dirs["vita15"], load_recipe_toml(g32), tmp_path / "b", context=CONTEXT)
    a4 = tmp_path / "a4.toml"
    a4.write_text('name = "mine"\n[[rules]]\npattern = "^llm\\\\."\nbits = 4\ngroup_size = 64\nactivation = "int8_dynamic"\n')
    with pytest.raises(QuantEncodingError, match="activations only with int8 weights"):
        build_bundle(get_profile("jetson"), tiny_dirs["vita15"], load_recipe_toml(a4), tmp_path / "b", context=CONTEXT)
    assert not list((tmp_path).glob("b*"))


@pytest.mark.slow  # builds a w8a8 bundle of its own (50 s); run with -m slow
def test_w8a8_quantizes_activations_with_calibrated_static_scales(quant_bundles):
    r = quant_bundles("jetson", "interactiveomni", "w8a8")
    assert all(b.parity.passed for b in r.components), [(b.name, b.parity.failures) for b in r.components]
    m = read_manifest(r.bundle)
    assert m.components["llm"].precision == "w8a8" and "static per-tensor" in m.components["llm"].quant.activations
    g = onnx.load(str(r.bundle / m.components["llm"].methods["decode"].entry), load_external_data=False).graph
    inits = {t.name: t for t in g.initializer}
    qs = [n for n in g.node if n.op_type == "QuantizeLinear"]
    # every quantized GEMM reads its input through Q/DQ: one per packed group (q/k/v, gate/up) or linear
    layers = m.components["llm"].kv_cache.layers
    assert len(qs) == 4 * layers + 1
    for q in qs:
        scale = onnx.numpy_helper.to_array(inits[q.input[1]])
        assert scale.shape == () and scale.dtype.name == "float16" and 0 < float(scale) < 10
        assert onnx.numpy_helper.to_array(inits[q.input[2]]).item() == 0  # TensorRT takes no zero point
    report = json.loads((r.bundle / "reports" / "quant.json").read_text())["layers"]
    assert all(v["act_absmax"] > 0 for k, v in report.items() if k.startswith("llm."))


def test_fit_counts_the_tensorrt_workspace(tiny):
    from omni_export.profiles.fit import fit_check

    ck = tiny["vita15"]
    small, big = get_profile("jetson-orin-nano"), get_profile("jetson-agx-orin")
    a = fit_check(small, ck.family, ck.config, PRESETS.get("int4"), context=CONTEXT).plan
    b = fit_check(big, ck.family, ck.config, PRESETS.get("int4"), context=CONTEXT).plan
    assert b.overhead_bytes - a.overhead_bytes == (4096 - 1024) << 20 and a.float_dtype == "fp16"
    llm = next(c for c in a.components if c.name == "llm")
    assert llm.precision == "int4 g64"  # counted as TensorRT builds the preset


@needs_tensorrt
@pytest.mark.tensorrt
@pytest.mark.parametrize("family", FAMILIES)
def test_engines_build_record_and_pass_parity_on_tensorrt(trt_bundles, tmp_path, family):
    from omni_export.runtime_py.parity import check_bundle
    from omni_export.targets.tensorrt_build import build_all

    root = tmp_path / "b"
    shutil.copytree(trt_bundles[family].bundle, root)
    built = build_all(root, force=True)
    assert built and verify_bundle(root) == []
    assert set(read_manifest(root).device_files) == {b["engine"] for b in built}
    for r in check_bundle(root, "tensorrt"):
        assert r.passed and r.backend == "tensorrt", (r.component, r.failures, r.not_run)


def test_the_tensorrt_session_says_why_it_cannot_run_here(trt_bundles):
    from omni_export.runtime_py.backends import BackendUnavailableError, open_session

    root = trt_bundles["interactiveomni"].bundle
    m = read_manifest(root)
    if not NO_TENSORRT and torch.cuda.is_available():
        pytest.skip("TensorRT runs here: the engine tests cover the session")
    with pytest.raises(BackendUnavailableError, match="TensorRT|CUDA"):
        open_session(m.components["llm"], root, m.profile.runtime)


def test_a_spoken_turn_runs_on_the_tensorrt_graphs_here_with_backend_parity(trt_bundles, speech_wav, tmp_path):
    """Where TensorRT is not installed, `run --backend parity` drives the exact graphs the engines
    are built from through the streaming pipeline (on ONNX Runtime); without it the run says why."""
    from omni_export.runtime_py.audio import read_audio

    root = trt_bundles["interactiveomni"].bundle
    out = tmp_path / "reply.wav"
    r = runner.invoke(app, ["run", str(root), "--audio", str(speech_wav), "--max-new-tokens", "6", "--out", str(out), "--backend", "parity", "--json"],
                      catch_exceptions=False)  # fmt: skip
    assert r.exit_code == 0, r.output
    turn = json.loads(r.output.strip().splitlines()[-1])["turns"][0]
    assert len(turn["tokens"]) == 6 and turn["audio_s"] > 0
    assert len(read_audio(out, 24000)) > 0
    if NO_TENSORRT:
        r = runner.invoke(app, ["run", str(root), "--audio", str(speech_wav), "--out", str(tmp_path / "x.wav")], catch_exceptions=False)
        assert r.exit_code != 0 and "TensorRT" in r.output
