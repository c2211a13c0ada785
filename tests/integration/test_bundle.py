"""The ExecuTorch spine on both tiny families: trace -> lower -> golden -> parity -> bundle, then
verify / inspect / parity on the result, and tampering caught by name."""

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from omni_export.bundle import read_manifest, verify_bundle
from omni_export.bundle.golden import read_golden
from omni_export.cli import app

runner = CliRunner()
CONTEXT = 320


@pytest.fixture
def bundle_copy(bundles, tmp_path):
    def make(family):
        dst = tmp_path / family
        shutil.copytree(bundles[family].bundle, dst)
        return dst

    return make


@pytest.mark.parametrize("family", ["interactiveomni", "vita15"])
def test_every_component_passes_fp32_parity(bundles, family):
    result = bundles[family]
    assert result.precision == "fp32" and result.components
    for b in result.components:
        assert b.parity.passed, (b.name, b.parity.failures)
        w32 = b.parity.worst("fp32")
        assert w32["cosine"] >= 0.9999, (b.name, w32)
        for row in b.parity.results:  # LLM-like: prefill and every teacher-forced decode step agree
            if row.reference == "fp32" and row.top1_strict is not None:
                assert row.top1_strict == 1.0, (b.name, row.method)
        # The report carries the same figures against the fp16 reference.
        assert {r.reference for r in b.parity.results} == {"fp32", "fp16"}


@pytest.mark.parametrize("family", ["interactiveomni", "vita15"])
def test_bundle_layout_and_manifest(bundles, family):
    root = bundles[family].bundle
    m = read_manifest(root)
    assert verify_bundle(root) == []
    assert m.family == family and m.profile.target == "executorch" and m.quant.recipe == "fp32"
    for name, c in m.components.items():
        assert len(c.files) == 1 and (root / c.files[0]).suffix == ".pte" and c.golden == f"golden/{name}.npz"
        assert c.methods and all(io.outputs for io in c.methods.values()) and c.precision == "fp32"
        assert all(io.inputs for meth, io in c.methods.items() if meth != "reset_cache")
        # a method is its own program method, but a cached stack's prefill and decode are one: step
        cached = set(c.kv_cache.methods) if c.kv_cache else set()
        assert all(io.entry == ("step" if meth in cached else meth) for meth, io in c.methods.items()) and c.parity_backend == "executorch"
    llm = m.components["llm"]
    assert set(llm.methods) == {"embed", "prefill", "decode", "reset_cache"} and llm.role == "decoder"
    assert llm.methods["decode"].outputs[0].shape == (1, 1, m.model["llm"]["vocab_size"])
    kv = llm.kv_cache
    assert kv.max_len == CONTEXT and kv.held_as == "buffers" and kv.methods == ("prefill", "decode")
    assert kv.axes == ("batch", "positions", "kv_heads", "head_dim") and not kv.inputs
    assert m.model["audio_sample_rate"] == 16000 and m.model["output_sample_rate"] == 24000
    assert m.profile.runtime.threads == 4  # the android profile's; sessions cap it at this host's cores
    assert (root / "tokenizer" / "tokenizer.json").is_file() and (root / "README.md").is_file()
    readme = (root / "README.md").read_text()
    assert "I/O contract" in readme and "Measured parity" in readme
    parity = json.loads((root / "reports" / "parity.json").read_text())
    assert {p["component"] for p in parity} == set(m.components) and {p["backend"] for p in parity} == {"executorch"}
    assert m.model["assets"] and all((root / p).is_file() for p in m.model["assets"].values())
    assert (root / "manifest.schema.json").is_file() and "manifest.schema.json" in m.files


def test_llm_golden_holds_ids_and_logits_under_manifest_names(bundles):
    root = bundles["interactiveomni"].bundle
    m = read_manifest(root)
    calls = read_golden(root / "golden" / "llm.npz")
    methods = [c.method for c in calls]
    assert methods[:2] == ["embed", "prefill"] and methods.count("decode") == 32
    embed_in = [t.name for t in m.components["llm"].methods["embed"].inputs]
    prefill_out = [t.name for t in m.components["llm"].methods["prefill"].outputs]
    assert list(calls[0].inputs) == embed_in == ["ids"] and calls[0].inputs["ids"].dtype == np.int64
    for prec in ("fp16", "fp32"):
        assert list(calls[1].outputs[prec]) == prefill_out
        assert calls[1].outputs[prec]["logits"].shape[-1] == m.model["llm"]["vocab_size"]
    # fp16 reference really is a different (half precision) computation.
    assert not np.array_equal(calls[1].outputs["fp16"]["logits"], calls[1].outputs["fp32"]["logits"])


def test_artifacts_carry_their_metadata(bundles):
    from executorch.runtime import Runtime

    m = read_manifest(bundles["interactiveomni"].bundle)
    program = Runtime.get().load_program(bundles["interactiveomni"].bundle / m.components["llm"].files[0])
    read = lambda name: program.load_method(name).execute([])[0]  # noqa: E731
    assert read("omni_max_context") == CONTEXT
    assert read("omni_output_sample_rate") == 24000
    assert read("omni_image_token_id") == m.model["image_token_id"]
    assert read("omni_eos_id") == m.model["eos_ids"][0]


def test_artifacts_accept_their_declared_maximum_sizes(bundles):
    """Lowering once cut these (30 s of audio -> 6.4 s, 2048 mel frames -> 64) while parity on the
    short golden inputs still passed."""
    from executorch.runtime import Runtime

    def max_sizes(family, component, method):
        b = bundles[family].bundle
        prog = Runtime.get().load_program(b / read_manifest(b).components[component].files[0])
        md = prog.metadata(method)
        return [str(md.input_tensor_meta(i)).split("sizes=[")[1].split("]")[0] for i in range(md.num_inputs())]

    assert max_sizes("interactiveomni", "audio_encoder", "forward") == ["1, 128, 3000"]
    assert max_sizes("interactiveomni", "vocoder", "source") == ["1, 80, 96", "1, 9", "1", "1, 9, 96, 480"]
    assert max_sizes("interactiveomni", "vocoder", "decode") == ["1, 80, 96", "1, 96, 480"]
    assert max_sizes("vita15", "audio_encoder", "forward") == ["1, 3000, 80"]
    assert max_sizes("vita15", "codec_decoder", "forward")[0] == "1, 1024"
    assert max_sizes("vita15", "llm", "step")[0] == f"1, {min(256, CONTEXT)}, 64"  # prefill and decode


def test_lowering_refuses_to_cut_a_declared_range(tiny):
    """With the host's oneDNN kernel selection active while lowering, ExecuTorch's edge pass cuts
    the Whisper encoder's frame range; the target must refuse, naming the method."""
    import torch

    from omni_export.export.trace import trace_component
    from omni_export.export.trace_specs import Limits
    from omni_export.targets.executorch import ExecuTorchTarget, LoweringError

    traced = trace_component("audio_encoder", tiny["interactiveomni"].components["audio_encoder"], Limits())
    with torch.backends.mkldnn.flags(enabled=True), pytest.raises(LoweringError, match="audio_encoder.forward: lowering cut"):
        ExecuTorchTarget._lower(traced, [], {})


def test_a_profile_whose_target_is_not_registered_fails_before_work(tiny_dirs, tmp_path, monkeypatch):
    """A profile may name a target this install does not have (a plugin not installed): refused
    naming the targets it has, before anything is written."""
    from omni_export.targets import TARGETS

    monkeypatch.delitem(TARGETS._items, "coreml")
    r = runner.invoke(app, ["--target", "iphone", "--model", str(tiny_dirs["vita15"]), "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "unknown target 'coreml'" in r.output and "executorch, onnxruntime, tensorrt" in r.output
    assert not (tmp_path / "b").exists() and not list(tmp_path.iterdir())


def test_verify_names_a_changed_byte(bundle_copy):
    root = bundle_copy("vita15")
    pte = root / "artifacts" / "llm.pte"
    data = bytearray(pte.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pte.write_bytes(bytes(data))
    problems = verify_bundle(root)
    assert problems == ["artifacts/llm.pte: sha256 differs from the manifest (the file was modified or corrupted)"]
    r = runner.invoke(app, ["verify", str(root)])
    assert r.exit_code == 1 and "artifacts/llm.pte" in r.output


def test_verify_names_missing_and_unlisted_files(bundle_copy):
    root = bundle_copy("vita15")
    (root / "golden" / "codec_decoder.npz").unlink()
    (root / "artifacts" / "extra.bin").write_bytes(b"x")
    problems = verify_bundle(root)
    assert "golden/codec_decoder.npz: missing" in problems
    assert "artifacts/extra.bin: not listed in the manifest" in problems


def test_verify_rejects_broken_manifest(bundle_copy):
    root = bundle_copy("vita15")
    m = json.loads((root / "manifest.json").read_text())
    del m["components"]["llm"]["methods"]
    (root / "manifest.json").write_text(json.dumps(m))
    assert any("components.llm: required key 'methods' is missing" in p for p in verify_bundle(root))


def test_parity_command_reruns_and_catches_drift(bundle_copy):
    root = bundle_copy("interactiveomni")
    ok = runner.invoke(app, ["parity", str(root), "--json"])
    assert ok.exit_code == 0, ok.output
    rows = json.loads(ok.output[ok.output.index("[") :])
    assert all(r["passed"] for r in rows)
    # Make the recorded reference disagree with the artifact: the gate must fail and say where.
    path = root / "golden" / "vocoder.npz"
    data = dict(np.load(path))
    data["fp32/2/wav"] = -data["fp32/2/wav"]  # call 2: the first decode
    np.savez(path, **data)
    bad = runner.invoke(app, ["parity", str(root)])
    assert bad.exit_code == 4 and "vocoder" in bad.output and "cosine" in bad.output


def test_parity_in_a_fresh_process(bundles):
    """A fresh interpreter has none of the compile-time imports: the runtime must register the
    LLM custom-op kernels itself."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "omni_export", "parity", str(bundles["vita15"].bundle), "--json"],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout[r.stdout.index("[") :])
    assert {row["component"] for row in rows} >= {"llm", "tts_ar"} and all(row["passed"] for row in rows)


@pytest.mark.parametrize("family", ["interactiveomni", "vita15"])
def test_run_a_bundle_end_to_end(bundles, tiny_dirs, speech_wav, photo, tmp_path, family):
    """The bundle's ExecuTorch artifacts answer a spoken question about an image, and give the
    same greedy text as the eager checkpoint through the same pipeline."""
    out = tmp_path / "reply.wav"
    args = ["--audio", str(speech_wav), "--image", str(photo), "--max-new-tokens", "6", "--json", "--max-context", str(CONTEXT)]
    r = runner.invoke(app, ["run", str(bundles[family].bundle), "--out", str(out), *args])
    assert r.exit_code == 0, r.output
    from_bundle = json.loads(r.output.strip().splitlines()[-1])
    import soundfile as sf

    info = sf.info(out)
    assert info.samplerate == 24000 and info.frames > 0 and len(from_bundle["tokens"]) == 6
    eager = runner.invoke(app, ["run", str(tiny_dirs[family]), "--out", str(tmp_path / "e.wav"), *args])
    assert eager.exit_code == 0, eager.output
    assert json.loads(eager.output.strip().splitlines()[-1])["tokens"] == from_bundle["tokens"]


@pytest.mark.parametrize("family", ["interactiveomni", "vita15"])
def test_the_longest_reply_the_context_allows_is_spoken_whole(bundles, tmp_path, family):
    """A reply filling the LLM's context (here 320 positions, the speech LM's too) is spoken to
    its end: the flow streams chunk by chunk past any traced length and the speech LM speaks in
    segments, so at least 2 speech tokens per text token are heard (CosyVoice2's
    min_token_text_ratio; the bistream gives up to 3, less where the model asks for text sooner)."""
    import soundfile as sf

    out = tmp_path / "long.wav"
    r = runner.invoke(app, ["run", str(bundles[family].bundle), "--text", "Tell me a long story.", "--max-new-tokens", "250",
                            "--out", str(out), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    reply = json.loads(r.output.strip().splitlines()[-1])
    assert len(reply["tokens"]) == 250
    seconds = sf.info(out).duration
    if family == "interactiveomni":
        assert seconds >= 250 * 2 / 25  # 25 speech tokens a second
    else:
        assert seconds >= 250 / 24 * 0.5  # every segment of text gives speech


@pytest.mark.parametrize("family", ["interactiveomni", "vita15"])
def test_run_a_bundle_on_a_clip_gives_the_checkpoint_s_answer(bundles, tiny_dirs, clip, tmp_path, family):
    """The frames go through the bundle's vision encoder and give the same greedy text as the
    eager checkpoint."""
    args = ["--video", str(clip), "--text", "What happens?", "--max-new-tokens", "5", "--json", "--no-speech", "--max-context", str(CONTEXT)]
    got = [runner.invoke(app, ["run", str(root), "--out", str(tmp_path / f"{i}.wav"), *args]) for i, root in
           enumerate((bundles[family].bundle, tiny_dirs[family]))]  # fmt: skip
    assert all(r.exit_code == 0 for r in got), [r.output for r in got]
    bundle, eager = (json.loads(r.output.strip().splitlines()[-1])["tokens"] for r in got)
    assert len(bundle) == 5 and bundle == eager


def test_run_refuses_a_bundle_that_fails_verify(bundle_copy, tmp_path):
    root = bundle_copy("vita15")
    (root / "golden" / "llm.npz").unlink()
    r = runner.invoke(app, ["run", str(root), "--text", "hi", "--out", str(tmp_path / "o.wav")])
    assert r.exit_code == 2 and "fails verify" in r.output and "golden/llm.npz: missing" in r.output


def test_inspect_summarises(bundles):
    r = runner.invoke(app, ["inspect", str(bundles["vita15"].bundle)])
    assert r.exit_code == 0
    for name in ("audio_frontend", "llm", "tts_ar", "codec_decoder", "pass"):
        assert name in r.output


@pytest.mark.slow  # a fresh android build through the CLI (200 s); the default run drives the CLI's main job on desktop
def test_main_job_on_tiny_checkpoint_writes_verified_bundle(tiny_dirs, tmp_path):
    out = tmp_path / "b"
    r = runner.invoke(app, ["--target", "android", "--model", str(tiny_dirs["vita15"]), "--quant", "fp32",
                            "--context", "96", "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "bundle for android-sd8g3 (fp32)" in r.output and "pass" in r.output
    assert verify_bundle(out) == [] and not list(tmp_path.glob(".*partial*"))
    again = runner.invoke(app, ["--target", "android", "--model", str(tiny_dirs["vita15"]), "--quant", "fp32", "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_run_speaks_in_a_cloned_voice_on_the_bundle_as_on_the_checkpoint(bundles, tiny_dirs, speech_wav, voice_wav, tmp_path):
    """--voice: the release's speaker encoder (campplus.onnx, carried in the bundle's assets) turns
    the reference into a speaker embedding that conditions the flow; the reply's audio changes
    with the voice, and the bundle speaks as the checkpoint does."""
    import soundfile as sf

    args = ["--audio", str(speech_wav), "--max-new-tokens", "6", "--max-context", str(CONTEXT)]
    bundle = bundles["interactiveomni"].bundle
    assert {"speaker_encoder", "speech_tokenizer"} <= set(read_manifest(bundle).model["asset_files"])  # the prompt speech path runs too
    runs = {}
    for name, root, extra in (("cloned", bundle, ["--voice", str(voice_wav)]), ("default", bundle, []),
                              ("eager", tiny_dirs["interactiveomni"], ["--voice", str(voice_wav)])):  # fmt: skip
        r = runner.invoke(app, ["run", str(root), "--out", str(tmp_path / f"{name}.wav"), *args, *extra])
        assert r.exit_code == 0, r.output
        runs[name] = sf.read(tmp_path / f"{name}.wav")[0]
    cloned, default, eager = runs["cloned"], runs["default"], runs["eager"]
    assert len(cloned) == len(default) == len(eager) > 0  # same tokens, other voice
    # Relative to the reply: a tiny checkpoint's random vocoder speaks quietly and its random flow
    # barely listens to the speaker (0.6% of the peak, measured); the bundle follows the checkpoint
    # far closer than that (0.01%), and the voice's effect is far above the wav's 16-bit steps.
    peak = max(np.abs(default).max(), np.abs(eager).max())
    backend = np.abs(cloned - eager).max()
    assert backend < 0.01 * peak
    assert np.abs(cloned - default).max() > 10 * max(backend, 2 / 32768)


def test_voice_is_refused_clearly_where_it_cannot_work(bundles, tiny_dirs, voice_wav, tmp_path):
    vita = runner.invoke(app, ["run", str(bundles["vita15"].bundle), "--text", "hi", "--voice", str(voice_wav), "--out", str(tmp_path / "v.wav")])
    assert vita.exit_code != 0 and "takes no reference voice" in vita.output
    missing = runner.invoke(app, ["run", str(tiny_dirs["interactiveomni"]), "--text", "hi", "--voice", str(tmp_path / "none.wav"),
                                  "--out", str(tmp_path / "m.wav")])  # fmt: skip
    assert missing.exit_code != 0 and "voice file" in missing.output and "does not exist" in missing.output


def test_reset_cache_zeroes_the_shared_cache_in_place(bundles):
    """reset_cache zeroes the cache prefill and decode share: a decode at position 5 after a reset
    reads zeros at 0..4, as in a fresh program, not the prefill's keys. It writes in place, so
    its own arena holds one zero image at most, not a second copy of every cache (the runtime
    sizes every method's arena to the largest method's)."""
    import torch

    from omni_export.runtime_py.backends import open_session

    root = bundles["interactiveomni"].bundle
    m = read_manifest(root)
    entry = m.components["llm"]

    def fresh():  # type: ignore[no-untyped-def]
        return open_session(entry, root, m.profile.runtime)  # loads the program and runs its reset

    hidden = entry.methods["decode"].inputs[0].shape[-1]
    embeds = torch.randn(1, 6, hidden, generator=torch.Generator().manual_seed(0))
    s = fresh()
    s.run("prefill", [embeds[:, :5], torch.arange(5)])
    after_prefill = s.run("decode", [embeds[:, 5:], torch.tensor([5])])[0]
    s.reset()
    after_reset = s.run("decode", [embeds[:, 5:], torch.tensor([5])])[0]
    from_fresh = fresh().run("decode", [embeds[:, 5:], torch.tensor([5])])[0]
    assert torch.equal(after_reset, from_fresh) and not torch.allclose(after_reset, after_prefill)
    plans = s._plans()
    kv = entry.kv_cache
    one_cache = kv.max_len * kv.kv_heads * kv.head_dim * 4  # fp32 build
    step = entry.methods["prefill"].entry  # prefill and decode: one program method
    assert step == entry.methods["decode"].entry and step in plans and not {"prefill", "decode"} & set(plans)
    assert plans["reset_cache"][1] < 2 * one_cache and 2 * kv.layers * one_cache <= sum(plans[step][2:])
    assert s.planned_bytes() < sum(s.planned_bytes_by_method().values())
