"""The coreml target on both tiny families: one multifunction .mlpackage per component, KV caches
as fp16 Core ML states shared by prefill and decode, the QuantResult's integers as
constexpr_blockwise_shift_scale weights, every package validated on load-back here (Core ML
predicts only on macOS: parity is recorded as not run and said so), and macOS-only tests that
run the packages where Core ML exists."""

import json
import sys
from pathlib import Path

import pytest
import torch

from omni_export.bundle import read_manifest, verify_bundle
from omni_export.quantize.presets import PRESETS
from omni_export.quantize.result import QuantResult
from omni_export.targets import TARGETS, QuantEncodingError
from omni_export.targets.base import recipe_for_target
from omni_export.targets.coreml_package import SPEC_VERSIONS, function_ops, load_spec, opset_problems, read_quantized_weights, read_tables

# VITA-1.5 on this target only in the slow run: the default run holds its budget with one family
FAMILIES = [pytest.param("interactiveomni"), pytest.param("vita15", marks=pytest.mark.slow)]
macos = pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predicts only on macOS (this host is not one)")


def _package(root: Path, entry) -> Path:  # type: ignore[no-untyped-def]
    return root / entry.methods[next(iter(entry.methods))].entry.split("#")[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_component_is_a_validated_multifunction_package_and_parity_says_not_run(coreml_bundles, family):
    result = coreml_bundles[family]
    root = result.bundle
    m = read_manifest(root)
    assert m.profile.target == "coreml" and m.profile.runtime.compute_units == "CPU_AND_NE" and m.quant.float_dtype == "fp16"
    assert verify_bundle(root) == []
    for b in result.components:
        c = m.components[b.name]
        assert c.backend == "coreml" and c.parity_backend == "coreml"
        # not run here, and never passed: the gate did not run
        assert not b.parity.passed and "macOS" in b.parity.not_run and not b.parity.failures, b.name
        package = _package(root, c)
        assert package.suffix == ".mlpackage" and c.files[0] == f"{package.relative_to(root).as_posix()}/Manifest.json"
        assert all(f in m.files for f in c.files) and any(f.endswith("weight.bin") for f in c.files)
        spec = load_spec(package)
        assert spec.specificationVersion >= SPEC_VERSIONS["iOS18"]
        functions = {f.name: f for f in spec.description.functions}
        assert set(functions) == set(c.methods) and all(e.entry.endswith(f"#{n}") for n, e in c.methods.items())
        for name, fn in functions.items():
            assert [i.name for i in fn.input] == [t.name for t in c.methods[name].inputs]
            assert [o.name for o in fn.output] == [t.name for t in c.methods[name].outputs]
        assert opset_problems(spec, "iOS18") == []
    assert any("parity not run on this host" in n and "macOS" in n for n in result.notes)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoders_hold_their_kv_cache_as_fp16_states_shared_by_prefill_and_decode(coreml_bundles, family):
    root = coreml_bundles[family].bundle
    m = read_manifest(root)
    decoders = {n: c for n, c in m.components.items() if c.kv_cache is not None}
    assert decoders
    for name, c in decoders.items():
        kv = c.kv_cache
        assert kv.held_as == "state" and kv.dtype == "float16" and "reset_cache" not in c.methods
        spec = load_spec(_package(root, c))
        for fn in spec.description.functions:
            states = list(fn.state)
            if fn.name in kv.methods:
                assert len(states) == 2 * kv.layers, (name, fn.name)
                assert all(tuple(s.type.stateType.arrayType.shape) == (1, kv.kv_heads, kv.max_len, kv.head_dim) for s in states)
                ops = {op.type for op in function_ops(spec)[fn.name]}
                assert {"read_state", "slice_update", "write_state"} <= ops, (name, fn.name, ops)
            else:
                assert not states
        names = {fn.name: sorted(s.name for s in fn.state) for fn in spec.description.functions if fn.name in kv.methods}
        assert len({tuple(v) for v in names.values()}) == 1  # one state, shared
        prefill = c.methods["prefill"]
        assert prefill.enumerated == {"tokens": (8, 16, 32, 64, 128, 256)} and not prefill.compute_units  # on the Neural Engine


def test_flexible_functions_fall_back_to_cpu_and_gpu_and_say_why(coreml_bundles):
    m = read_manifest(coreml_bundles["interactiveomni"].bundle)
    vision = m.components["vision_encoder"].methods["forward"]
    # the iPhone profile encodes one tile per call: a static shape, nothing to enumerate, ANE-eligible
    assert vision.inputs[0].shape[0] == 1 and vision.enumerated == {} and vision.compute_units == ""
    wav = m.components["audio_frontend"].methods["forward"]
    assert wav.compute_units == "CPU_AND_GPU" and "flexible input shape" in wav.compute_units_reason and "Neural Engine" in wav.compute_units_reason


@pytest.mark.parametrize("family", FAMILIES)
def test_packages_hold_exactly_the_quantresult_integers(coreml_bundles, family):
    """Read back from each .mlpackage's weight file with coremltools' own loader: every quantized
    weight is the QuantResult's codes and scales (the same QuantResult the .pte and ONNX
    bundles are built from and tested against)."""
    root = coreml_bundles[family].bundle
    result = QuantResult.load(Path(json.loads((root / "reports" / "quant.json").read_text())["cache"]))
    m = read_manifest(root)
    bits_seen = set()
    for name, c in m.components.items():
        tensors = result.for_component(name)
        stored = read_quantized_weights(_package(root, c)) + read_tables(_package(root, c))
        assert len(stored) == len(tensors), name
        left = dict(tensors)
        for w in stored:
            hit = next((k for k, t in left.items() if t.q.shape == w.q.shape and torch.equal(t.q, w.q)), None)
            assert hit is not None, (name, w.q.shape)
            t = left.pop(hit)
            assert torch.equal(t.scale.float(), w.scale) and w.offset is None and w.dtype == f"int{t.config.bits}"
            bits_seen.add((t.config.bits, t.config.group_size))
    assert bits_seen == ({(4, 32), (8, 0)} if family == "interactiveomni" else {(8, 0)})


def test_refusals_before_any_work_and_presets_adapted(tiny):
    target = TARGETS.get("coreml")
    comps = tiny["interactiveomni"].components
    recipe, notes = recipe_for_target(target, PRESETS.get("w8a8"), comps)
    assert notes and "weight-only" in notes[0] and all(r.config is None or r.config.activation == "none" for r in recipe.rules)
    from omni_export.quantize.engine import plan
    from omni_export.quantize.recipe import QuantConfig

    configs = plan(comps, PRESETS.get("w8a8"))
    with pytest.raises(QuantEncodingError, match='activation = "none"'):
        target.check_quant(configs)  # a recipe of the user's own asking for int8 activations
    assert target.check_quant({"llm.x": QuantConfig(bits=4, group_size=32, symmetric=False)})  # zero points: offsets


@macos
@pytest.mark.macos
@pytest.mark.parametrize("family", FAMILIES)
def test_core_ml_replays_the_golden_calls_within_the_gate(coreml_bundles, family):
    from omni_export.runtime_py.parity import check_bundle

    rows = check_bundle(coreml_bundles[family].bundle)
    assert rows and all(r.passed and r.backend == "coreml" for r in rows), [(r.component, r.failures) for r in rows]


@macos
@pytest.mark.macos
def test_a_spoken_turn_runs_on_core_ml(coreml_bundles, tmp_path, speech_wav):
    from typer.testing import CliRunner

    from omni_export.cli import app

    out = tmp_path / "reply.wav"
    r = CliRunner().invoke(app, ["run", str(coreml_bundles["interactiveomni"].bundle), "--audio", str(speech_wav), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > 1000
