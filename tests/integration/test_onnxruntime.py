"""The onnxruntime target on both tiny families: one ONNX graph per method (prefill and decode
one graph with the cache as inputs and outputs), parity on ONNX Runtime, the QuantResult's
integers in the graphs (the same as in the .pte), the same conversation as ExecuTorch, and the
manifest's new sections (device-built files, parity that could not run here)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from typer.testing import CliRunner

from omni_export.bundle import read_manifest, verify_bundle
from omni_export.bundle.manifest import sha256_file
from omni_export.cli import app
from omni_export.profiles import get_profile

CONTEXT = 320  # as the bundles in conftest.py

runner = CliRunner()
FAMILIES = ["interactiveomni", "vita15"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_component_passes_fp32_parity_on_onnxruntime(ort_bundles, family):
    result = ort_bundles[family]
    for b in result.components:
        assert b.parity.passed and b.parity.backend == "onnxruntime", (b.name, b.parity.failures, b.parity.not_run)
        assert b.parity.worst("fp32")["cosine"] >= 0.9999, b.name
        for row in b.parity.results:  # prefill and every teacher-forced decode step through the explicit cache
            if row.reference == "fp32" and row.top1_strict is not None:
                assert row.top1_strict == 1.0, (b.name, row.method)


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("family", FAMILIES)
def test_bundle_layout_graph_names_and_kv_contract(ort_bundles, family):
    root = ort_bundles[family].bundle
    assert verify_bundle(root) == []
    m = read_manifest(root)
    assert m.profile.target == "onnxruntime" and m.profile.runtime.providers == ("CPUExecutionProvider",)
    assert m.profile.runtime.options == {"session.qdq_matmulnbits_accuracy_level": "4", "session.intra_op.allow_spinning": "0"}
    stacks = [n for n, c in m.components.items() if c.kv_cache is not None]
    assert set(stacks) == ({"llm", "speech_lm"} if family == "interactiveomni" else {"llm", "tts_ar"})
    for name, c in m.components.items():
        assert c.backend == c.parity_backend == "onnxruntime"
        assert [Path(f).suffix for f in c.files].count(".data") == 1 and all(f.startswith(f"artifacts/{name}/") for f in c.files)
        for meth, entry in c.methods.items():
            assert entry.entry in c.files and entry.entry.endswith(".onnx")
        kv = c.kv_cache
        if kv is None:
            continue
        # One graph serves prefill and decode; no reset method (the caller owns the cache).
        assert c.methods["prefill"].entry == c.methods["decode"].entry and "reset_cache" not in c.methods
        # VITA's TTS prefix attends both ways, which GroupQueryAttention cannot: plain io there
        static = name != "tts_ar"
        assert kv.held_as == ("static-io" if static else "io") and kv.methods == ("prefill", "decode") and len(kv.inputs) == 2 * kv.layers
        graph = onnx.load(str(root / c.methods["prefill"].entry), load_external_data=False).graph
        ins, outs = {i.name: _dims(i) for i in graph.input}, {o.name: _dims(o) for o in graph.output}
        assert list(ins) == ["embeds", "input_pos", *kv.inputs]
        assert list(outs) == [t.name for t in c.methods["prefill"].outputs] + list(kv.outputs)
        assert ins["embeds"][1] == "tokens"
        if static:  # every cache tensor holds max_len positions, in and out (written in place)
            assert ins[kv.inputs[0]] == [1, kv.kv_heads, kv.max_len, kv.head_dim]
            assert outs[kv.outputs[0]] == [1, kv.kv_heads, kv.max_len, kv.head_dim]
        else:  # io: the past grows by each call's positions
            assert isinstance(ins[kv.inputs[0]][2], str) and ins[kv.inputs[0]][2] != outs[kv.outputs[0]][2]
    readme = (root / "README.md").read_text()
    assert "## Loading (ONNX Runtime)" in readme and all(lang in readme for lang in ("C++", "C#", "Java", "Python"))


def test_each_tensor_is_stored_once_per_component(ort_bundles):
    """A component's graphs share one data file, and no two stored tensors are equal."""
    root = ort_bundles["interactiveomni"].bundle
    for name, c in read_manifest(root).components.items():
        data = next(root / f for f in c.files if f.endswith(".data"))
        spans = set()
        for f in c.files:
            if f.endswith(".onnx"):
                for t in onnx.load(str(root / f), load_external_data=False).graph.initializer:
                    if t.data_location == onnx.TensorProto.EXTERNAL:
                        info = {e.key: e.value for e in t.external_data}
                        assert info["location"] == data.name
                        spans.add((int(info.get("offset", 0)), int(info["length"])))
        blob = data.read_bytes()
        contents = [blob[o : o + n] for o, n in sorted(spans)]
        assert len(set(contents)) == len(contents), name
        assert sum(n for _, n in spans) <= len(blob) < sum(n for _, n in spans) + 4096 * (len(spans) + 1)


# VITA-1.5 at int8 goes through the CLI in the default run (test_main_job_and_parity_in_a_fresh_process)
@pytest.mark.parametrize("family,preset", [("interactiveomni", "int4"), pytest.param("vita15", "int8", marks=pytest.mark.slow)])
def test_quantized_bundles_pass_their_thresholds(quant_bundles, family, preset):
    result = quant_bundles("desktop-cpu", family, preset)
    profile = get_profile("desktop-cpu")
    for b in result.components:
        assert b.parity.passed, (b.name, b.parity.failures)
        assert b.parity.threshold["cosine_min"] == profile.threshold(b.precision).cosine_min
    m = read_manifest(result.bundle)
    assert m.components["llm"].precision == preset and "MatMulNBits" in m.components["llm"].quant.activations


def test_onnx_holds_exactly_the_quant_result_and_so_the_pte(quant_bundles, same_integers):
    """Both targets encode the one QuantResult: every quantized weight in the ONNX graphs and in
    the .pte files has the QuantResult's codes and scales, so the two artifacts agree."""
    ort, et = quant_bundles("desktop-cpu", "interactiveomni", "int4"), quant_bundles("android", "interactiveomni", "int4")
    assert {bits for bits, _ in same_integers(ort, et)} == {4, 8}


def test_onnxruntime_runs_fused_kernels_for_linears_norms_and_attention(quant_bundles, tmp_path):
    """What a decode step costs is mostly kernel dispatch at this size: the quantized linears run
    as MatMulNBits (those reading one input packed into one), every RMSNorm as one
    SimplifiedLayerNormalization, and each layer's RoPE, cache update and attention as one
    GroupQueryAttention (no softmax, concat or rotate-half left over)."""
    import onnxruntime as ort

    root = quant_bundles("desktop-cpu", "interactiveomni", "int4").bundle
    c = read_manifest(root).components["llm"]
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(root / c.methods["decode"].entry), so)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx"), load_external_data=False).graph.node]
    # q/k/v and gate/up read one input each: packed, a layer runs 4 MatMulNBits for its 7 linears
    assert ops.count("MatMulNBits") == 4 * c.kv_cache.layers + 1 and c.quant.linears == 7 * c.kv_cache.layers + 1
    assert "DequantizeLinear" not in ops and "MatMul" not in ops
    layers = c.kv_cache.layers
    assert ops.count("GroupQueryAttention") == layers and not {"Softmax", "Concat", "Neg", "Sin"} & set(ops)
    assert ops.count("SimplifiedLayerNormalization") >= 2 * layers + 1 and "ReduceMean" not in ops and "Sqrt" not in ops


def _conversation(bundle, speech_wav, photo):
    from omni_export.runtime_py.events import TextDelta
    from omni_export.runtime_py.pipeline import Pipeline

    p = Pipeline.from_bundle(bundle)
    from omni_export.runtime_py.audio import read_audio

    wav = read_audio(speech_wav, 16000)
    turns = []
    for i in range(3):
        for k in range(0, len(wav), 1920):
            p.push_audio(wav[k : k + 1920])
        if i == 0:
            p.add_image(photo, max_tiles=1)
        turns.append([e.token_id for e in p.respond_stream(max_new_tokens=6, speech=i == 0) if isinstance(e, TextDelta)])
    return turns, p.position


@pytest.mark.parametrize("family", FAMILIES)
def test_same_greedy_tokens_as_executorch_over_three_spoken_turns(bundles, ort_bundles, speech_wav, photo, family):
    ort_turns, ort_pos = _conversation(ort_bundles[family].bundle, speech_wav, photo)
    et_turns, et_pos = _conversation(bundles[family].bundle, speech_wav, photo)
    assert ort_turns == et_turns and ort_pos == et_pos and all(len(t) == 6 for t in ort_turns)


def test_the_session_keeps_the_cache_in_onnxruntime_memory(ort_bundles):
    import onnxruntime as ort

    from omni_export.runtime_py.backends import open_session
    from omni_export.runtime_py.backends.base import host_cores
    from omni_export.runtime_py.kv_cache import KVStack

    root = ort_bundles["interactiveomni"].bundle
    m = read_manifest(root)
    c = m.components["llm"]
    session = open_session(c, root, m.profile.runtime)
    assert not session.stateful and session._graphs["prefill"] is session._graphs["decode"]
    options = session._graphs["decode"].get_session_options()
    assert options.intra_op_num_threads == host_cores()  # the profile's threads = 0: every core
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    stack = KVStack("llm", session, 4, CONTEXT)
    stack.reset()
    stack.feed(torch.randn(1, 1, m.model["llm"]["hidden_size"]))
    buffers = [v.data_ptr() for v in stack._cache]
    stack.feed(torch.randn(1, 8, m.model["llm"]["hidden_size"]))  # chunks of 4 and 4 after the first token
    assert stack.position == 9 and all(isinstance(v, ort.OrtValue) for v in stack._cache)
    # static-io: the same max_len buffers every call, written in place; nothing past position 9
    kv = c.kv_cache
    assert [v.data_ptr() for v in stack._cache] == buffers
    assert all(v.shape() == [1, kv.kv_heads, kv.max_len, kv.head_dim] for v in stack._cache)
    keys = stack._cache[0].numpy()
    assert (abs(keys[:, :, :9]).sum(axis=(0, 1, 3)) > 0).all() and not keys[:, :, 9:].any()


def test_main_job_and_parity_in_a_fresh_process(tiny_dirs, tmp_path):
    """`omni-export --target desktop` through the CLI (VITA-1.5 at int8: each component held to the
    threshold of its precision), then `parity` in a fresh interpreter (no compile-time imports: the
    runtime registers what it needs); a second run into the same folder is refused."""
    out = tmp_path / "b"
    r = invoke("--target", "desktop", "--model", tiny_dirs["vita15"], "--quant", "int8", "--context", 96, "--out", out)
    assert r.exit_code == 0, r.output
    assert "bundle for desktop-cpu (int8)" in r.output and verify_bundle(out) == []
    assert not list(tmp_path.glob(".*partial*"))
    m = read_manifest(out)
    assert m.components["llm"].precision == "int8" and "MatMulNBits" in m.components["llm"].quant.activations
    p = subprocess.run([sys.executable, "-m", "omni_export", "parity", str(out), "--json"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads(p.stdout[p.stdout.index("[") :])
    profile = get_profile("desktop-cpu")
    for row in rows:
        assert row["passed"] and row["backend"] == "onnxruntime", row
        assert row["threshold"]["cosine_min"] == profile.threshold(m.components[row["component"]].precision).cosine_min, row
    again = invoke("--target", "desktop", "--model", tiny_dirs["vita15"], "--quant", "int8", "--out", out)
    assert again.exit_code == 2 and "already exists" in again.output


def test_a_component_no_host_runtime_can_replay_is_not_run_and_never_passes(ort_bundles, tmp_path):
    root = tmp_path / "b"
    shutil.copytree(ort_bundles["vita15"].bundle, root)
    m = json.loads((root / "manifest.json").read_text())
    m["components"]["codec_decoder"]["parity_backend"] = "coreml"  # no Core ML runtime on this host (or in this build)
    m["components"]["tts_nar"]["parity_backend"] = ""  # no host runtime at all
    (root / "manifest.json").write_text(json.dumps(m))
    r = invoke("parity", root, "--json")
    rows = {row["component"]: row for row in json.loads(r.output[r.output.index("[") : r.output.rindex("]") + 1])}
    assert r.exit_code == 5, r.output
    assert rows["codec_decoder"]["status"] == "not run on this host" and not rows["codec_decoder"]["passed"]
    assert "Core ML" in rows["codec_decoder"]["not_run"] and not rows["tts_nar"]["passed"]
    assert rows["llm"]["passed"] and "codec_decoder: not run on this host" in r.output


def test_verify_checks_files_built_on_the_device(ort_bundles, tmp_path):
    root = tmp_path / "b"
    shutil.copytree(ort_bundles["vita15"].bundle, root)
    engine = root / "engines" / "llm.step.engine"
    engine.parent.mkdir()
    engine.write_bytes(b"an engine built on the device")
    assert verify_bundle(root) == ["engines/llm.step.engine: not listed in the manifest"]
    m = json.loads((root / "manifest.json").read_text())
    m["device_files"] = {"engines/llm.step.engine": {
        "component": "llm", "built_from": "artifacts/llm/step.onnx", "builder": "tensorrt", "builder_version": "10.13",
        "device": "Orin", "sha256": sha256_file(engine), "bytes": engine.stat().st_size}}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(m))
    r = invoke("verify", root)
    assert r.exit_code == 0 and "built on the device: 1 (engines/llm.step.engine)" in r.output
    engine.write_bytes(b"another engine")
    assert "engines/llm.step.engine" in verify_bundle(root)[0] and "built on the device" in verify_bundle(root)[0]
    engine.unlink()
    assert verify_bundle(root) == ["engines/llm.step.engine: recorded as built on the device (tensorrt 10.13, Orin) but missing"]


def test_graph_metadata_is_not_shipped(ort_bundles):
    """Exporter debug metadata (stack traces per node) would bloat every graph."""
    root = ort_bundles["interactiveomni"].bundle
    c = read_manifest(root).components["llm"]
    graph = onnx.load(str(root / c.methods["prefill"].entry), load_external_data=False).graph
    assert not any(n.metadata_props for n in graph.node)
    assert (root / c.methods["prefill"].entry).stat().st_size < 100_000
