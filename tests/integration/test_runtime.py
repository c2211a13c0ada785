"""`omni-export run --turns` and `omni-export profile` on ExecuTorch bundles and eager
checkpoints of both tiny families, and `profile --device ssh://` against an sshd on loopback."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf
from typer.testing import CliRunner

from omni_export.cli import app

runner = CliRunner()
FAMILIES = ["interactiveomni", "vita15"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def script(speech_wav, photo, tmp_path_factory):
    """Three turns: speech + image, speech with a barge-in after the first audio chunk, text."""
    d = tmp_path_factory.mktemp("script")
    shutil.copy(speech_wav, d / "q.wav")
    shutil.copy(photo, d / "photo.png")
    (d / "turns.toml").write_text(
        'chunk_ms = 120\n'
        '[[turn]]\naudio = "q.wav"\nimage = "photo.png"\nimage_max_tiles = 1\nmax_new_tokens = 12\n'
        '[[turn]]\naudio = "q.wav"\nmax_new_tokens = 40\nbarge_in_after_chunks = 1\n'
        '[[turn]]\ntext = "Thanks. And what else?"\nmax_new_tokens = 12\n'
    )
    return d / "turns.toml"


KINDS = {"bundle": "executorch", "ort-bundle": "onnxruntime", "checkpoint": "eager"}


def model_path(kind, family, bundles, tiny_dirs, ort_bundles=None):
    return {"bundle": lambda: bundles[family].bundle, "ort-bundle": lambda: ort_bundles[family].bundle,
            "checkpoint": lambda: tiny_dirs[family]}[kind]()  # fmt: skip


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("family", FAMILIES)
def test_run_a_scripted_conversation(bundles, ort_bundles, tiny_dirs, script, tmp_path, family, kind):
    out = tmp_path / "reply.wav"
    r = invoke("run", model_path(kind, family, bundles, tiny_dirs, ort_bundles), "--turns", script, "--out", out, "--json", "--max-context", 320)
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    t1, t2, t3 = res["turns"]
    assert t2["interrupted"] and not t1["interrupted"] and not t3["interrupted"]
    # Later turns prefill only their own tokens: turn 1 carried the image's and the speech's.
    assert t1["prompt_tokens"] > t2["prompt_tokens"] > t3["prompt_tokens"]
    assert t3["position"] == sum(t["prompt_tokens"] + t["new_tokens"] for t in res["turns"])
    assert t1["ttft_ms"] > 0 and t1["ttfa_ms"] >= t1["ttft_ms"] and t1["audio_s"] > 0
    info = sf.info(out)
    assert info.samplerate == 24000 and info.frames / 24000 == pytest.approx(res["seconds"], abs=1e-3)


@pytest.mark.parametrize("kind,family", [(k, f) for k in KINDS for f in FAMILIES if k != "ort-bundle" or f == "interactiveomni"])
def test_profile_reports_stages_turns_and_floors(bundles, ort_bundles, tiny_dirs, script, tmp_path, family, kind):
    r = invoke("profile", model_path(kind, family, bundles, tiny_dirs, ort_bundles), "--runs", 2, "--script", script, "--out", tmp_path / "p")
    assert r.exit_code == 0, r.output
    assert "TTFA" in r.output and "llm.decode" in r.output and "p50 / floor" in r.output
    report = json.loads((tmp_path / "p" / "reports" / "latency.json").read_text())
    assert report["runs"] == 2 and len(report["turns"]) == 6  # warm-up not counted
    assert report["backends"] == [KINDS[kind]]
    decode = report["stages"]["llm.decode"]
    assert decode["calls"] > 0 and 0 < decode["p50_ms"] <= decode["p90_ms"]
    floor = report["roofline"]["stages"]["llm.decode"]
    assert floor["bound"] == "memory" and 0 < floor["floor_ms"] < decode["p50_ms"]
    vocoder = "vocoder.decode" if family == "interactiveomni" else "codec_decoder.forward"
    assert report["roofline"]["stages"][vocoder]["ops_source"] == "counted"  # from the manifest, or counted on the checkpoint
    assert report["summary"]["ttfa_ms"]["p50"] > 0 and report["peak_rss_bytes"] > 50e6
    png = tmp_path / "p" / "reports" / "latency.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    spans = report["timeline"]["spans"]
    assert {c for c, *_ in spans} >= {"llm", "audio_encoder", "vision_encoder"}
    assert [m for m, _ in report["timeline"]["marks"]].count("audio_end") == 3


def test_profile_rejects_a_bad_script_before_any_work(bundles, tmp_path):
    (tmp_path / "bad.toml").write_text('[[turn]]\naudio = "missing.wav"\n')
    r = runner.invoke(app, ["profile", str(bundles["vita15"].bundle), "--script", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "p")])
    assert r.exit_code == 2 and "does not exist" in r.output and not (tmp_path / "p").exists()
    (tmp_path / "typo.toml").write_text('[[turn]]\ntext = "hi"\nmax_new_tokenz = 3\n')
    r = runner.invoke(app, ["profile", str(bundles["vita15"].bundle), "--script", str(tmp_path / "typo.toml")])
    assert r.exit_code == 2 and "max_new_tokenz" in r.output


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """An OpenSSH server on 127.0.0.1 with a throwaway host key, accepting one throwaway client key."""
    binary = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(binary).exists() or shutil.which("ssh") is None:
        pytest.skip("openssh-server/-client are not installed (the README's test line installs them with apt-get)")
    if os.geteuid() != 0:
        pytest.skip("sshd needs root here to switch to the logged-in user")
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    shutil.copy(d / "client.pub", d / "authorized_keys")
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        f"PidFile {d / 'sshd.pid'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "StrictModes no\nPermitRootLogin prohibit-password\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # its privilege-separation directory
    proc = subprocess.Popen([binary, "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.PIPE)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"sshd exited: {proc.stderr.read().decode()[-1000:]}")
            time.sleep(0.1)
    yield {"port": port, "key": d / "client", "user": os.environ.get("USER") or "root"}
    proc.terminate()
    proc.wait(timeout=10)


@pytest.mark.parametrize("kind", ["bundle", "ort-bundle"])
def test_profile_over_ssh_on_loopback(bundles, ort_bundles, sshd, script, tmp_path, kind):
    """The bundle, the script and the package travel to the 'device'; it profiles there with its
    own Python; the report comes back and the device's copy is removed."""
    before = set(Path("/tmp").glob("omni-export-*"))
    bundle = (bundles if kind == "bundle" else ort_bundles)["interactiveomni"].bundle
    r = invoke("profile", bundle, "--device", f"ssh://{sshd['user']}@127.0.0.1:{sshd['port']}",
               "--runs", 1, "--script", script, "--out", tmp_path / "p", "--identity", sshd["key"],
               "--ssh-opt", "StrictHostKeyChecking=no", "--ssh-opt", "UserKnownHostsFile=/dev/null", "--remote-python", sys.executable)  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "p" / "reports" / "latency.json").read_text())
    assert report["device"].startswith("ssh://") and report["backends"] == [KINDS[kind]]
    assert report["stages"]["llm.decode"]["calls"] > 0 and "llm.decode" in report["roofline"]["stages"]
    assert (tmp_path / "p" / "reports" / "latency.png").is_file()
    assert set(Path("/tmp").glob("omni-export-*")) == before  # cleaned up on the device


def test_profile_over_ssh_unreachable_is_a_clear_error(bundles, tmp_path):
    r = runner.invoke(app, ["profile", str(bundles["vita15"].bundle), "--device", f"ssh://nobody@127.0.0.1:{_free_port()}",
                            "--ssh-opt", "ConnectTimeout=5", "--out", str(tmp_path / "p")])  # fmt: skip
    assert r.exit_code == 2 and "ssh nobody@127.0.0.1 failed" in r.output
    r = runner.invoke(app, ["profile", str(bundles["vita15"].bundle), "--device", "telnet://x"])
    assert r.exit_code == 2 and "neither 'local' nor ssh://" in r.output


def test_memory_says_what_each_component_holds_in_its_runtime(bundles):
    """`omni-export memory` in a fresh process: every component of the manifest, its file bytes
    as the manifest says, the memory plan read from the program, and resident growth that
    follows the plan (the audio encoder's 30 s window is the largest plan of the tiny bundle:
    ExecuTorch allocates it when the method loads)."""
    from omni_export.bundle import read_manifest

    root = bundles["interactiveomni"].bundle
    out = subprocess.run([sys.executable, "-m", "omni_export", "memory", str(root), "--json"], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    m = read_manifest(root)
    rows = {c["component"]: c for c in report["components"]}
    assert list(rows) == list(m.components)
    for name, c in rows.items():
        assert c["file_bytes"] == sum(m.files[f].bytes for f in m.components[name].files)
        assert c["planned_bytes"] > 0 and c["backend"] == "executorch"
    biggest = max(rows.values(), key=lambda c: c["planned_bytes"])
    assert biggest["total_bytes"] >= 0.5 * biggest["planned_bytes"], biggest
    assert report["final_bytes"] > report["runtime_bytes"] > 0
