"""`omni-export run` and `omni-export profile`: the streaming runtime from the command line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.table import Table

from omni_export.cli import EXIT_ERROR, _fail, _gb, _spinner, _with_progress, app, console, err
from omni_export.errors import OmniExportError
from omni_export.files import check_output_file

GAP_S = 0.3  # silence between turns in the written reply


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f}"


@app.command()
def run(
    path: Path = typer.Argument(..., metavar="BUNDLE_OR_CHECKPOINT", help="a bundle (runs its artifacts) or a checkpoint (eager reference)"),
    audio: Optional[Path] = typer.Option(None, "--audio", "-a", help="question as a sound file (resampled as needed), fed in real-time-sized chunks"),
    image: Optional[Path] = typer.Option(None, "--image", "-i"),
    video: Optional[Path] = typer.Option(None, "--video", help="a clip (MP4, MKV, WebM, MOV); frames picked as the family's release does"),
    text: Optional[str] = typer.Option(None, "--text"),
    voice: Optional[Path] = typer.Option(None, "--voice", help="a reference recording: the reply speaks in that voice "
                                         "(InteractiveOmni, with the release's campplus.onnx speaker encoder)"),
    turns: Optional[Path] = typer.Option(None, "--turns", help="a multi-turn script (TOML, see runtime_py/script.py) instead of --audio/--image/--video/--text"),
    out: Path = typer.Option(Path("reply.wav"), "--out", "-o", help="the spoken reply (24 kHz wav; turns joined by short silences)"),
    dtype: str = typer.Option("fp32", "--dtype", help="checkpoints: fp32 or fp16"),
    torch_device: str = typer.Option("cpu", "--torch-device", help="checkpoints: cpu or cuda (the eager reference on a GPU)"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
    max_context: int = typer.Option(4096, "--max-context", help="checkpoints: KV cache length"),
    chunk_ms: float = typer.Option(160.0, "--chunk-ms", help="microphone chunk size"),
    context_policy: str = typer.Option("error", "--context-policy", help="when the conversation outgrows the KV cache: error, or reset (drop the history)"),
    seed: int = typer.Option(0, "--seed"),
    no_speech: bool = typer.Option(False, "--no-speech", help="text only"),
    as_json: bool = typer.Option(False, "--json", help="print the turns' results as JSON"),
    backend: Optional[str] = typer.Option(None, "--backend", help="bundles: run every component on this backend; 'parity': on "
                                          "each component's host replay backend (a TensorRT bundle's graphs on ONNX Runtime)"),
) -> None:
    """Hold a conversation: audio is fed in chunks as a microphone would, text prints as it is
    decoded, speech is written to --out. A bundle runs through its own backend (ExecuTorch here);
    a checkpoint runs the eager fp32/fp16 reference through the same pipeline."""
    from omni_export import api
    from omni_export.runtime_py.audio import write_wav
    from omni_export.runtime_py.events import AudioChunk, TextDelta
    from omni_export.runtime_py.script import (
        Script,
        TurnSpec,
        load_script,
        play,
        silence,
    )

    if dtype not in ("fp32", "fp16"):
        _fail(ValueError(f"--dtype must be fp32 or fp16, got {dtype!r}"))
    if turns is not None and (audio or image or video or text):
        _fail(ValueError("give either --turns or --audio/--image/--video/--text, not both"))
    pcm: list[np.ndarray] = []
    tokens: list[list[int]] = []
    results: list[dict] = []
    kept = 0  # pcm pieces of the turns that finished
    failed: OmniExportError | None = None
    try:
        check_output_file(out)  # before any model work
    except OmniExportError as exc:
        _fail(exc)

    def show(i: int, ev) -> None:  # type: ignore[no-untyped-def]
        if isinstance(ev, TextDelta):
            if len(tokens) <= i:
                tokens.append([])
                if not as_json:
                    console.print(f"[bold]turn {i + 1} text:[/] ", end="")
            tokens[i].append(ev.token_id)
            if not as_json:
                console.print(ev.text, end="", soft_wrap=True, markup=False, highlight=False)
        elif isinstance(ev, AudioChunk):
            pcm.append(ev.pcm)

    try:
        if turns is not None:
            script = load_script(turns)
        else:
            script = Script(turn=(TurnSpec(audio=str(audio) if audio else None, image=str(image) if image else None,
                                           video=str(video) if video else None, text=text,
                                           max_new_tokens=max_new_tokens),), chunk_ms=chunk_ms, seed=seed).resolve(Path.cwd())  # fmt: skip
        if voice is not None:
            script = replace(script, voice=str(voice)).resolve(Path.cwd())
        script = replace(script, speech=script.speech and not no_speech)
        pipeline = _with_progress("loading", lambda cb: api.open_runtime(path, dtype, max_context, progress=cb, device=torch_device,
                                                                          backend=backend, context_policy=context_policy)).pipeline  # fmt: skip
        for stats in play(pipeline, script, show):
            sr = pipeline.config["output_sample_rate"]
            if not as_json:
                console.print()
                console.print(f"[dim]turn {stats.turn + 1}: prompt {stats.prompt_tokens} new tokens (cache {stats.position}), "
                              f"{stats.new_tokens} tokens, TTFT {_ms(stats.ttft_ms)} ms, TTFA {_ms(stats.ttfa_ms)} ms, "
                              f"{stats.audio_s:.2f} s speech, RTF " + ("-" if stats.rtf is None else f"{stats.rtf:.3f}")
                              + (", interrupted" if stats.interrupted else "") + (", history dropped" if stats.context_reset else "") + "[/]")  # fmt: skip
            while len(tokens) <= stats.turn:  # a turn that said nothing
                tokens.append([])
            results.append({**stats.to_dict(), "tokens": tokens[stats.turn]})
            pcm.append(silence(GAP_S, sr))
            kept = len(pcm)
    except OmniExportError as exc:
        if not results:
            _fail(exc)
        failed = exc  # a later turn failed: the turns before it are still written
        del pcm[kept:]
    sr = pipeline.config["output_sample_rate"]
    audio_out = np.concatenate(pcm[:-1]) if len(pcm) > 1 else np.zeros(0, dtype=np.float32)
    write_wav(out, audio_out, sr)
    if failed is not None:
        err.print(f"[bold red]error:[/] turn {len(results) + 1} failed: {failed}", soft_wrap=True)
        err.print(f"the {len(results)} turn(s) before it are in {out} ({len(audio_out) / sr:.2f} s)", soft_wrap=True)
        raise typer.Exit(EXIT_ERROR)
    if as_json:
        last = results[-1]  # the last turn's figures at the top level, for one-turn use
        print(json.dumps({"text": last["text"], "tokens": last["tokens"], "prompt_tokens": last["prompt_tokens"], "turns": results,
                          "wav": str(out), "seconds": len(audio_out) / sr, "sample_rate": sr}))  # fmt: skip
        return
    console.print(f"speech: {out} ({len(audio_out) / sr:.2f} s at {sr} Hz)")


@app.command()
def profile(
    path: Path = typer.Argument(..., metavar="BUNDLE_OR_CHECKPOINT"),
    device: str = typer.Option("local", "--device", "-d", help="local, or ssh://[user@]host[:port] to measure on the device"),
    runs: int = typer.Option(3, "--runs", "-n", min=1, help="measured runs of the script (after one warm-up)"),
    script: Optional[Path] = typer.Option(None, "--script", help="turn script (TOML); default: the built-in three-turn conversation"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="directory for reports/latency.json and .png (default: profile-<name>)"),
    profile_name: Optional[str] = typer.Option(None, "--profile", help="device profile for the roofline (default: the bundle's)"),
    dtype: str = typer.Option("fp32", "--dtype", help="checkpoints: fp32 or fp16"),
    torch_device: str = typer.Option("cpu", "--torch-device", help="checkpoints: cpu or cuda"),
    identity: Optional[Path] = typer.Option(None, "--identity", help="ssh: private key"),
    ssh_opt: list[str] = typer.Option([], "--ssh-opt", help="ssh: an -o option (repeatable), e.g. StrictHostKeyChecking=accept-new"),
    remote_python: str = typer.Option("python3", "--remote-python", help="ssh: the device's Python (with torch and the backend runtime)"),
    as_json: bool = typer.Option(False, "--json"),
    quiet: bool = typer.Option(False, "--quiet", help="write the reports, print nothing"),
    backend: Optional[str] = typer.Option(None, "--backend", help="local bundles: as for run (parity: a TensorRT bundle's graphs on ONNX Runtime)"),
) -> None:
    """Latency of a scripted multi-turn conversation: per-stage p50/p90 with roofline floors, TTFT,
    TTFA, decode tokens/s, speech real-time factor, peak RSS; a JSON report and a PNG timeline."""
    from omni_export import api
    from omni_export.remote import SSHOptions

    ssh = SSHOptions(identity=identity, options=tuple(ssh_opt), python=remote_python)
    out = out or Path(f"profile-{path.resolve().name}")
    try:
        if quiet:
            report = api.profile(path, device, runs, script, profile_name, dtype, ssh, torch_device=torch_device, backend=backend)
        else:
            with _spinner("profiling") as prog:
                task = prog.add_task("starting")
                report = api.profile(path, device, runs, script, profile_name, dtype, ssh, lambda s: prog.update(task, description=s),
                                     torch_device, backend)  # fmt: skip
        js, png = api.write_latency_report(report, out)
    except OmniExportError as exc:
        _fail(exc)
    if quiet:
        return
    if as_json:
        print(json.dumps(report))
        return
    console.print(latency_table(report))
    console.print(summary_table(report))
    console.print(f"report: {js}\ntimeline: {png}")


def latency_table(report: dict) -> Table:
    roof = report.get("roofline", {})
    floors = roof.get("stages", {})
    t = Table(title=f"per-stage latency, {report['runs']} runs on {report.get('device', 'local')} "
                    f"(floors: {roof.get('profile', '-')}, {roof.get('bandwidth_gbs', '-')} GB/s)")  # fmt: skip
    for col in ("stage", "calls/run", "positions", "p50 ms", "p90 ms", "floor ms", "bound", "p50 / floor"):
        t.add_column(col, justify="left" if col in ("stage", "bound") else "right")
    for name, s in report["stages"].items():
        f = floors.get(name, {})
        ratio = f.get("measured_over_floor")
        t.add_row(name, f"{s['calls_per_run']:g}", f"{s['positions_p50']:g}", _ms(s["p50_ms"]), _ms(s["p90_ms"]),
                  "-" if not f else f"{f['floor_ms']:.3f}", f.get("bound", "-"), "-" if ratio is None else f"{ratio:,.1f}x")  # fmt: skip
    return t


def summary_table(report: dict) -> Table:
    s, roof = report["summary"], report.get("roofline", {})
    t = Table(title=f"conversation ({report['turns_per_run']} turns x {report['runs']} runs), from the end of the user's audio")
    for col in ("figure", "p50", "p90", "limit"):
        t.add_column(col, justify="left" if col == "figure" else "right")
    ceiling = roof.get("decode_tok_s_ceiling")
    t.add_row("TTFT (first text token) ms", _ms(s["ttft_ms"]["p50"]), _ms(s["ttft_ms"]["p90"]), "")
    t.add_row("TTFA (first audio out) ms", _ms(s["ttfa_ms"]["p50"]), _ms(s["ttfa_ms"]["p90"]), "")
    t.add_row("LLM decode tokens/s", _ms(s["decode_tok_s"]["p50"]), _ms(s["decode_tok_s"]["p90"]),
              "-" if ceiling is None else f"<= {ceiling:,.0f} (bandwidth)")  # fmt: skip
    rtf = s["rtf"]
    t.add_row("speech real-time factor", "-" if rtf["p50"] is None else f"{rtf['p50']:.3f}", "-" if rtf["p90"] is None else f"{rtf['p90']:.3f}", "< 1 keeps up")
    t.add_row("peak RSS", _gb(report["peak_rss_bytes"]), "", "")
    return t
