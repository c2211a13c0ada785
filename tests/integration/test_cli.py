"""The CLI end to end, on the tiny families."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from omni_export.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_synth_writes_a_loadable_checkpoint(tmp_path):
    r = invoke("synth", "--family", "vita15", "--size", "tiny", "--out", tmp_path / "v")
    assert r.exit_code == 0, r.output
    assert "wrote vita15 tiny checkpoint" in r.output and (tmp_path / "v" / "config.json").is_file()


@pytest.mark.parametrize("family", ["interactiveomni", "vita15"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_run_speaks_a_24k_reply(tiny_dirs, speech_wav, photo, tmp_path, family, dtype):
    out = tmp_path / "reply.wav"
    r = invoke("run", tiny_dirs[family], "--audio", speech_wav, "--image", photo, "--out", out,
               "--dtype", dtype, "--max-new-tokens", "6", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.output.strip().splitlines()[-1])
    info = sf.info(out)
    assert info.samplerate == 24000 and info.frames > 0 and result["seconds"] > 0
    assert len(result["tokens"]) == 6 and isinstance(result["text"], str)
    # The prompt holds the image tiles' and the speech's tokens: far longer than the chat template.
    assert result["prompt_tokens"] > 100
    wav, _ = sf.read(out)
    assert np.isfinite(wav).all() and np.abs(wav).max() > 0


def test_run_prints_text(tiny_dirs, speech_wav, tmp_path):
    r = invoke("run", tiny_dirs["interactiveomni"], "--audio", speech_wav, "--out", tmp_path / "r.wav", "--max-new-tokens", "4")
    assert r.exit_code == 0, r.output
    assert "turn 1 text:" in r.output and "24000 Hz" in r.output and "TTFT" in r.output


@pytest.mark.parametrize("bad", ["empty", "garbage", "missing"])
def test_run_rejects_bad_audio_clearly(tiny_dirs, tmp_path, bad):
    path = tmp_path / "in.wav"
    if bad == "empty":
        sf.write(path, np.zeros(0), 16000)
    elif bad == "garbage":
        path.write_bytes(b"definitely not audio")
    r = runner.invoke(app, ["run", str(tiny_dirs["vita15"]), "--audio", str(path), "--out", str(tmp_path / "o.wav")])
    assert r.exit_code == 2
    assert {"empty": "empty", "garbage": "cannot decode", "missing": "does not exist"}[bad] in r.output
    assert not (tmp_path / "o.wav").exists()


def test_run_rejects_undecodable_image(tiny_dirs, speech_wav, tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8 broken")
    r = runner.invoke(app, ["run", str(tiny_dirs["vita15"]), "--audio", str(speech_wav), "--image", str(tmp_path / "x.jpg")])
    assert r.exit_code == 2 and "cannot decode image" in r.output


def test_profiles_lists_all():
    r = invoke("profiles")
    for name in ("jetson-orin-nano", "jetson-agx-orin", "jetson-thor", "rtx-4090", "iphone-15-pro", "mac-m3", "android-sd8g3", "host-cpu"):
        assert name in r.output


def test_fit_full_4b_on_orin_nano():
    fit = ["fit", "--target", "jetson-orin-nano", "--family", "interactiveomni", "--json", "--quant"]
    no, yes = runner.invoke(app, [*fit, "fp16", "--context", "2048"]), runner.invoke(app, [*fit, "int4", "--context", "2048"])
    assert no.exit_code == 3 and yes.exit_code == 0
    a, b = json.loads(no.output), json.loads(yes.output)
    assert not a["fits"] and b["fits"] and a["total_bytes"] > 8e9 > b["total_bytes"]
    # the profile's whole 4096-token context takes it over (CosyVoice2's flow and its streaming state)
    assert runner.invoke(app, [*fit, "int4"]).exit_code == 3


def test_main_job_rejects_corrupt_checkpoint_and_unknown_names(tiny_dirs, tmp_path):
    import shutil

    root = tmp_path / "c"
    shutil.copytree(tiny_dirs["vita15"], root)
    (root / "model.safetensors").write_bytes(b"\x00" * 10)
    r = runner.invoke(app, ["--target", "android", "--model", str(root)])
    assert r.exit_code == 2 and "model.safetensors" in r.output
    r = runner.invoke(app, ["--target", "pixel9", "--model", str(tiny_dirs["vita15"])])
    assert r.exit_code == 2 and "unknown profile 'pixel9'" in r.output
    r = runner.invoke(app, ["--target", "android", "--model", str(tiny_dirs["vita15"]), "--quant", "int3"])
    assert r.exit_code == 2 and "unknown quantization preset 'int3'" in r.output


def test_demo_checkpoint_is_written_once(tmp_path, monkeypatch):
    from omni_export import api

    monkeypatch.setenv("OMNI_EXPORT_CACHE", str(tmp_path))
    monkeypatch.setattr(api, "DEMO_TRAIN_S", 2)  # the real demo trains its LLM for minutes
    first = api.demo_checkpoint()
    assert first == tmp_path / f"demo-interactiveomni-small-seed0-trained2s-v{api.DEMO_VERSION}" and (first / "config.json").is_file()
    shard = next(first.glob("*.safetensors"))
    assert b"omni_export_trained" in shard.read_bytes()[:200_000]  # the LLM shard was rewritten by training
    assert not list(tmp_path.glob(".demo*"))
    mtime = (first / "config.json").stat().st_mtime
    assert api.demo_checkpoint() == first and (first / "config.json").stat().st_mtime == mtime


@pytest.mark.slow
def test_main_job_on_the_demo_checkpoint(tmp_path):
    """The README's main line: the installed entry point, no --model (minutes: slow)."""
    env = {**os.environ, "OMNI_EXPORT_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "bundle"
    r = subprocess.run([sys.executable, "-m", "omni_export", "--target", "android", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "bundle for android-sd8g3" in r.stdout and (out / "manifest.json").is_file()
    assert subprocess.run([sys.executable, "-m", "omni_export", "verify", str(out)], capture_output=True).returncode == 0


def test_out_that_cannot_take_a_bundle_is_refused_before_any_work(tiny_dirs, tmp_path, monkeypatch):
    """--overwrite replaces a bundle or an empty folder, never a file or someone's folder; the
    refusal comes before the checkpoint is even read (its loader would fail on the bad model)."""
    monkeypatch.setattr("omni_export.api.plan_export", lambda *a, **k: pytest.fail("planned before checking --out"))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    r = invoke("--target", "desktop", "--model", tiny_dirs["vita15"], "--out", a_file, "--overwrite")
    assert r.exit_code == 2 and "is a file or link" in r.output and a_file.read_text() == "mine"
    home = tmp_path / "home"
    (home / "photos").mkdir(parents=True)
    (home / "photos" / "cat.jpg").write_bytes(b"jpg")
    r = invoke("--target", "desktop", "--model", tiny_dirs["vita15"], "--out", home, "--overwrite")
    assert r.exit_code == 2 and "not an omni-export bundle" in r.output and (home / "photos" / "cat.jpg").read_bytes() == b"jpg"
    r = invoke("--target", "desktop", "--model", tiny_dirs["vita15"], "--out", home)
    assert r.exit_code == 2 and "already exists" in r.output


def test_recipe_errors_stop_before_any_work(tiny_dirs, tmp_path):
    out = tmp_path / "b"
    bad = tmp_path / "g128.toml"
    # Tiny widths are 64 or 96: a 128-wide group divides none of them.
    bad.write_text('[[rules]]\npattern = "^llm\\\\."\nbits = 4\ngroup_size = 128\n[[rules]]\npattern = "."\nfloat = true\n')
    r = invoke("--target", "android", "--model", tiny_dirs["interactiveomni"], "--quant", bad, "--out", out)
    assert r.exit_code == 2 and "group size does not divide" in r.output and "llm." in r.output
    asym = tmp_path / "asym.toml"
    asym.write_text('[[rules]]\npattern = "^llm\\\\."\nbits = 4\ngroup_size = 32\nsymmetric = false\n[[rules]]\npattern = "."\nfloat = true\n')
    r = invoke("--target", "android", "--model", tiny_dirs["interactiveomni"], "--quant", asym, "--out", out)
    assert r.exit_code == 2 and "symmetric" in r.output
    r = invoke("--target", "android", "--model", tiny_dirs["interactiveomni"], "--quant", "int3", "--out", out)
    assert r.exit_code == 2 and "unknown quantization preset 'int3'" in r.output
    assert not out.exists() and not list(tmp_path.glob(".b*"))


def test_quant_report_ranks_layers_and_writes_a_recipe(tiny_dirs, tmp_path):
    from omni_export.quantize.presets import PRESETS
    from omni_export.quantize.recipe import load_recipe_toml

    proposal = tmp_path / "mixed.toml"
    r = invoke("quant-report", "--model", tiny_dirs["interactiveomni"], "--quant", "int4", "--write-recipe", proposal, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    llm = next(c for c in data["reports"] if c["component"] == "llm")
    scores = [layer["damage"]["kl"] for layer in llm["layers"]]
    # 2 layers x 7 linears; the tied head holds its table's codes (tied_head = "table"): not a candidate
    assert scores == sorted(scores, reverse=True) and len(scores) == 14
    recipe = load_recipe_toml(proposal)
    assert recipe.name == "int4-mixed" and recipe.rules[-3:] == PRESETS.get("int4").rules


def test_quant_report_by_block_ranks_blocks_exactly_and_layers_within_them(tiny_dirs):
    """--ranking block (what auto picks for a large component): one evaluation per decoder layer
    with all its linears quantized; the blocks come worst first, each layer carries its block's
    damage, and the proposal still meets the gate it was made for. The exact ranking's worst
    layer lies in the block ranked worst."""
    from omni_export import api

    (exact,), _ = api.quant_report(tiny_dirs["interactiveomni"], "int4", "android", components=["llm"], ranking="exact")
    (block,), _ = api.quant_report(tiny_dirs["interactiveomni"], "int4", "android", components=["llm"], ranking="block")
    assert (exact.ranking, block.ranking) == ("exact", "block")
    names = [fqn for fqn, *_ in block.layers]
    assert sorted(names) == sorted(fqn for fqn, *_ in exact.layers)
    blocks = [fqn.split(".")[3] for fqn in names]  # llm.model.layers.<i>.<...>
    assert blocks == sorted(blocks, key=blocks.index) and len(set(blocks)) == 2  # each block's layers together
    kl = [d.kl for *_, d, _ in block.layers]
    assert kl[0] == kl[6] != kl[7] == kl[13] and kl[0] > kl[7]
    assert exact.layers[0][0].split(".")[3] == blocks[0]
    assert block.all_quantized == exact.all_quantized
    assert block.proposal_damage is not None and block.proposal_damage.meets(block.threshold)
    with pytest.raises(api.ConfigError, match="ranking must be one of"):
        api.quant_report(tiny_dirs["interactiveomni"], "int4", "android", components=["llm"], ranking="fastest")


def test_the_estimate_before_lowering_ranks_only_what_would_miss_its_gate(tiny_dirs):
    """screen: a component whose whole-recipe estimate meets its gate, tightened by the assumed
    error scale, is not ranked and keeps the recipe; one that misses is ranked and promoted. At
    the int4 default (0.95) every tiny component passes; at 0.995 the LLM (0.9908) and the speech
    LM (0.9949) do not, and their proposals meet the tightened gate."""
    from dataclasses import replace

    from omni_export import api
    from omni_export.profiles import ParityThreshold

    plan = api.plan_export("desktop-cpu", tiny_dirs["interactiveomni"], "int4", 256)
    reports, _ = api.quant_report(plan.model, "int4", plan.profile, screen=1.3)
    assert reports and all(r.screened and not r.layers for r in reports)
    strict = replace(plan.profile, parity={**plan.profile.parity, "int4": ParityThreshold(0.995, 0.8, 0.2)})
    reports, mixed = api.quant_report(plan.model, "int4", strict, screen=1.3)
    missed = {r.component: r for r in reports if not r.screened}
    assert set(missed) == {"llm", "speech_lm"}
    for r in missed.values():
        assert r.threshold.cosine_min == pytest.approx(1 - 0.005 / 1.3) and r.layers
        assert r.proposal_damage is not None and r.proposal_damage.meets(r.threshold)
    assert {rule.pattern.split(r"\.")[0].lstrip("^") for rule in mixed.rules if rule.pattern.startswith("^")} == set(missed)


@pytest.fixture(scope="module")
def mixed_recipe(tiny_dirs, tmp_path_factory):
    proposal = tmp_path_factory.mktemp("mixed") / "mixed.toml"
    r = invoke("quant-report", "--model", tiny_dirs["interactiveomni"], "--quant", "int4", "--write-recipe", proposal)
    assert r.exit_code == 0, r.output
    return proposal


@pytest.mark.slow  # its own tiny int4 build, minutes: the default run holds its budget (run with -m slow)
def test_a_written_recipe_builds_on_onnxruntime(tiny_dirs, mixed_recipe, tmp_path):
    """The documented path: quant-report --write-recipe mixed.toml, then --quant mixed.toml (the
    recipe travels as an object; its name, int4-mixed, is never looked up as a preset)."""
    from omni_export.bundle import read_manifest, verify_bundle

    out = tmp_path / "b"
    r = invoke("--target", "desktop", "--model", tiny_dirs["interactiveomni"], "--quant", mixed_recipe, "--context", 96, "--out", out)
    assert r.exit_code == 0, r.output
    assert verify_bundle(out) == [] and read_manifest(out).quant.recipe == "int4-mixed"


def test_a_written_recipe_plans_on_executorch(tiny_dirs, mixed_recipe):
    from omni_export import api

    plan = api.plan_export("android", tiny_dirs["interactiveomni"], str(mixed_recipe))
    assert plan.recipe.name == "int4-mixed" and plan.fit.fits


@pytest.mark.slow
def test_a_written_recipe_builds_on_executorch(tiny_dirs, mixed_recipe, tmp_path):
    from omni_export.bundle import verify_bundle

    out = tmp_path / "b"
    r = invoke("--target", "android", "--model", tiny_dirs["interactiveomni"], "--quant", mixed_recipe, "--context", 96, "--out", out)
    assert r.exit_code == 0, r.output
    assert verify_bundle(out) == []


@pytest.mark.parametrize("value", ["-5", "0"])
def test_a_context_that_is_not_a_positive_length_is_refused_before_any_work(tiny_dirs, tmp_path, value):
    out = tmp_path / "b"
    r = runner.invoke(app, ["--target", "desktop", "--model", str(tiny_dirs["vita15"]), f"--context={value}", "--out", str(out)])
    assert r.exit_code == 2 and f"--context must be a positive number of tokens, got {value}" in r.output and not out.exists()
    r = runner.invoke(app, ["fit", "--target", "jetson", "--family", "interactiveomni", "--quant", "int4", f"--context={value}"])
    assert r.exit_code == 2 and "--context must be a positive number of tokens" in r.output
    r = runner.invoke(app, ["run", str(tiny_dirs["vita15"]), "--text", "hi", f"--max-context={value}", "--out", str(tmp_path / "r.wav")])
    assert r.exit_code == 2 and "--max-context must be a positive number of tokens" in r.output and not (tmp_path / "r.wav").exists()


def test_a_failing_later_turn_keeps_the_speech_of_the_turns_before_it(tiny_dirs, tmp_path):
    script = tmp_path / "turns.toml"
    script.write_text('[[turn]]\ntext = "Tell me about the weather today please"\nmax_new_tokens = 20\n'
                      '[[turn]]\ntext = "And tomorrow?"\nmax_new_tokens = 20\n'
                      '[[turn]]\ntext = "And the day after tomorrow, and the whole week after that, with every detail you know of?"\n'
                      "max_new_tokens = 40\n")  # fmt: skip
    out = tmp_path / "reply.wav"
    r = runner.invoke(app, ["run", str(tiny_dirs["interactiveomni"]), "--turns", str(script), "--max-context", "150", "--out", str(out)])
    assert r.exit_code == 2 and "turn 3 failed" in r.output and "beyond the KV cache's 150" in r.output, r.output
    assert "the 2 turn(s) before it are in" in r.output
    wav, sr = sf.read(out)
    assert sr == 24000 and len(wav) / sr > 2.0  # two turns of speech and the gap between them
    r = runner.invoke(app, ["run", str(tiny_dirs["interactiveomni"]), "--text", "hi", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "is a folder; give a file name" in r.output


def test_a_run_on_a_bundle_prints_no_library_chatter_and_logs_it(bundles, tmp_path):
    """ExecuTorch's C++ CPU probe lines and the backends' load warnings go to the log file, not
    between the CLI's lines (test_files.py: the redirection itself, and -v)."""
    env = {**os.environ, "OMNI_EXPORT_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "omni_export", "run", str(bundles["vita15"].bundle), "--text", "hi", "--max-new-tokens", "3",
           "--no-speech", "--out", str(tmp_path / "r.wav")]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    log = (tmp_path / "cache" / "logs" / "omni-export.log").read_text()
    assert "cpuinfo" in log and "executorch session" in log
    assert "cpuinfo" not in p.stderr + p.stdout and "Failed to load" not in p.stderr, p.stderr


def test_commands_in_one_process_log_each_record_once_and_keep_torch_trace_out(tmp_path, monkeypatch):
    """The CLI called again in one process (an app, these tests) replaces its handlers: before,
    every call added a pair and each record was written once per call. torch's structured trace
    stays torch's; the file rotates."""
    import logging

    import torch  # noqa: F401  (its loggers exist and are routed)

    from omni_export.cli import LOG_BACKUPS, LOG_BYTES

    monkeypatch.setenv("OMNI_EXPORT_CACHE", str(tmp_path / "cache"))
    for _ in range(3):
        assert invoke("profiles").exit_code == 0
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_omni_export_handler", False)]
    assert sorted(type(h).__name__ for h in ours) == ["RotatingFileHandler", "StreamHandler"]
    file = next(h for h in ours if isinstance(h, logging.FileHandler))
    assert (file.maxBytes, file.backupCount) == (LOG_BYTES, LOG_BACKUPS)
    logging.getLogger("omni_export.test").warning("once")
    file.flush()
    assert (tmp_path / "cache" / "logs" / "omni-export.log").read_text().count("once") == 1
    assert logging.getLogger("torch.__trace").propagate is False and logging.getLogger("torch._dynamo").propagate


@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_an_interrupted_export_leaves_the_old_bundle_intact_and_nothing_that_looks_like_a_bundle(ort_bundles, tiny_dirs, tmp_path, sig):
    """Ctrl-C cleans up after itself; a SIGKILL cannot, but what it leaves is a hidden, uniquely
    named .partial folder beside the bundle, which the next run sweeps."""
    import shutil
    import signal
    import time

    from omni_export.bundle import verify_bundle
    from omni_export.bundle.manifest import sha256_file
    from omni_export.files import sweep_stale

    out = tmp_path / "bundle"
    shutil.copytree(ort_bundles["interactiveomni"].bundle, out)
    before = sha256_file(out / "manifest.json")
    cmd = [sys.executable, "-m", "omni_export", "--target", "desktop-cpu", "--model", str(tiny_dirs["interactiveomni"]),
           "--quant", "fp32", "--context", "320", "--out", str(out), "--overwrite"]  # fmt: skip
    # A terminal's foreground job: SIGINT at its default, so the child's Python turns it into
    # KeyboardInterrupt. A Python started with SIGINT ignored keeps ignoring it, the one way found
    # for what full runs showed (the child ran on to the end); what changes this process's
    # disposition in a full run is not pinned down (the failure message shows it).
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.time() + 120
    while not list(tmp_path.glob(".bundle.*.partial")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    staged = list(tmp_path.glob(".bundle.*.partial"))
    assert staged and proc.poll() is None, "the export never started staging"
    time.sleep(1.0)  # into the work: golden calls and tracing
    proc.send_signal(getattr(signal, sig))
    _, stderr = proc.communicate(timeout=120)
    parent = signal.getsignal(signal.SIGINT)
    assert verify_bundle(out) == [] and sha256_file(out / "manifest.json") == before, (parent, stderr[-1000:])  # the old bundle, untouched
    left = sorted(p.name for p in tmp_path.iterdir())
    if sig == "SIGINT":
        assert proc.returncode == 130 and left == ["bundle"], (left, stderr[-2000:])
    else:
        assert proc.returncode == -signal.SIGKILL and left == sorted(["bundle", staged[0].name])
        assert not (staged[0] / "manifest.json").exists()  # hidden, named .partial, and no manifest: not a bundle
        assert sweep_stale(out) == [staged[0]] and sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


@pytest.mark.parametrize("family", ["interactiveomni", "vita15"])
def test_run_answers_a_clip_and_a_script_takes_one(tiny_dirs, clip, speech_wav, tmp_path, family):
    """`run --video` on a checkpoint, with a spoken question; a --turns script mixes video,
    audio and text in a turn (paths relative to the script)."""
    r = invoke("run", tiny_dirs[family], "--video", clip, "--audio", speech_wav, "--text", "What happens?",
               "--out", tmp_path / "v.wav", "--max-new-tokens", "4", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.output.strip().splitlines()[-1])["tokens"]) == 4
    script = tmp_path / "s.toml"
    (tmp_path / "c.mp4").write_bytes(clip.read_bytes())
    script.write_text('[[turn]]\nvideo = "c.mp4"\ntext = "Describe it."\nmax_new_tokens = 3\n')
    r = invoke("run", tiny_dirs[family], "--turns", script, "--out", tmp_path / "s.wav", "--no-speech")
    assert r.exit_code == 0, r.output
    bad = invoke("run", tiny_dirs[family], "--video", speech_wav, "--out", tmp_path / "b.wav")
    assert bad.exit_code == 2 and "no video stream" in bad.output
