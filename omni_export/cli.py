"""`omni-export`: a thin typer layer over omni_export.api. Heavy imports happen inside commands."""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from omni_export.errors import OmniExportError

app = typer.Typer(add_completion=False, invoke_without_command=True, no_args_is_help=False,
                  help="Compile omni-modal checkpoints into verified per-device bundles.")  # fmt: skip
# Piped output (CI logs, files) gets a width that keeps the tables readable.
console = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True)

EXIT_ERROR, EXIT_DOES_NOT_FIT, EXIT_PARITY, EXIT_VERIFY, EXIT_NOT_RUN = 2, 3, 4, 1, 5


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
    raise typer.Exit(EXIT_ERROR)


def _gb(n: float) -> str:
    """Human-readable decimal bytes (the unit device memory is sold in)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _spinner(title: str):  # type: ignore[no-untyped-def]
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn(f"{title}: {{task.description}}"), TimeElapsedColumn(), console=err, transient=True)


def _with_progress(title: str, fn):  # type: ignore[no-untyped-def]
    with _spinner(title) as prog:
        task = prog.add_task("starting")
        return fn(lambda step: prog.update(task, description=step))


def _fit_table(fit) -> Table:  # type: ignore[no-untyped-def]
    p, plan = fit.profile, fit.plan
    t = Table(title=f"memory fit on {p.name} ({p.description}), {plan.recipe}, context {plan.context}")
    t.add_column("item")
    t.add_column("precision")
    t.add_column("params", justify="right")
    t.add_column("bytes", justify="right")
    for c in plan.components:
        t.add_row(c.name, c.precision, f"{c.params / 1e6:,.1f} M", _gb(c.weight_bytes))
    t.add_row("KV cache", plan.kv_dtype or plan.float_dtype, "", _gb(plan.kv_bytes))
    if plan.stream_bytes:
        t.add_row("streaming state (flow windows, vocoder source)", plan.stream_dtype or plan.float_dtype, "", _gb(plan.stream_bytes))
    t.add_row("activations (peak, est.)", "", "", _gb(plan.activation_bytes))
    t.add_row("runtime overhead", "", "", _gb(plan.overhead_bytes))
    t.add_row("[bold]total[/]", "", "", f"[bold]{_gb(plan.total_bytes)}[/]")
    t.add_row("usable on device", "", "", _gb(fit.available_bytes))
    verdict = "[green]fits[/]" if fit.fits else "[red]does NOT fit[/]"
    t.add_row(f"[bold]{verdict}[/]", "", "", f"margin {_gb(fit.margin_bytes)}")
    return t


LOG_FILE = "omni-export.log"
LOG_BYTES, LOG_BACKUPS = 50_000_000, 2  # the log and two older ones: at most 150 MB
_OURS = "_omni_export_handler"


def _logging(verbose: bool) -> None:
    """The terminal gets warnings (everything with -v); the log file under the cache folder gets
    everything, library and native chatter included, so a run's details are there after it."""
    from omni_export.files import cache_dir

    from logging.handlers import RotatingFileHandler

    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    # Called once per command: in one process (an app or a test calling the CLI again) the
    # handlers of the call before are replaced, not added to (each added one wrote every record again).
    for h in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(h)
        h.close()
    term = logging.StreamHandler()
    setattr(term, _OURS, True)
    term.setLevel(logging.INFO if verbose else logging.WARNING)
    term.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if not verbose:  # libraries' warnings (deprecations, their own chatter) are for the log; ours and errors for the user
        term.addFilter(lambda r: r.name.startswith("omni_export") or r.levelno >= logging.ERROR)
    root.addHandler(term)
    logging.captureWarnings(True)
    _route_torch_logs_on_import()
    try:
        (cache_dir() / "logs").mkdir(parents=True, exist_ok=True)
        # rotated: a 4B export's library chatter is hundreds of MB, and the log lives in the user's cache
        file = RotatingFileHandler(cache_dir() / "logs" / LOG_FILE, maxBytes=LOG_BYTES, backupCount=LOG_BACKUPS)
        setattr(file, _OURS, True)
        file.setLevel(logging.DEBUG)
        file.setFormatter(fmt)
        root.addHandler(file)
    except OSError:  # a read-only home: the terminal still gets what matters
        pass


class _AfterTorchImport(importlib.abc.MetaPathFinder):
    """Finds torch as usual, then routes its loggers once its module has run."""

    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            run = spec.loader.exec_module

            def exec_module(module):  # type: ignore[no-untyped-def]
                run(module)
                _route_torch_logs()

            spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _route_torch_logs_on_import() -> None:
    """torch gives its loggers their own stderr handlers and stops them propagating: they are
    routed through ours instead, so its warnings (a deprecation raised while torchao loads) reach
    the log file, not the terminal. Done when torch is first imported, not here: importing it
    costs 1.4 s that commands which never need it (``profiles``) should not pay."""
    if "torch" in sys.modules:
        _route_torch_logs()
    elif not any(isinstance(f, _AfterTorchImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTorchImport())


def _route_torch_logs() -> None:
    for name, logger in list(logging.root.manager.loggerDict.items()):
        # torch.__trace is torch's structured trace (TORCH_TRACE files), always at DEBUG: routed to
        # our handlers it wrote graph metadata into the log, once per handler
        if isinstance(logger, logging.Logger) and name.split(".")[0] == "torch" and name != "torch.__trace":
            for h in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
                logger.removeHandler(h)
            logger.propagate = True


@app.callback()
def main_job(
    ctx: typer.Context,
    target: Optional[str] = typer.Option(None, "--target", "-t", help="device profile or alias (see `omni-export profiles`)"),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="checkpoint directory; default: the built-in demo"),
    quant: Optional[str] = typer.Option(None, "--quant", "-q", help="preset (fp32, fp16, int8, w8a8, int4, int4-awq, int4-gptq, int4-own-head, int4-all) or recipe .toml"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="bundle directory (default: ./PROFILE-bundle)"),
    context: Optional[int] = typer.Option(None, "--context", help="max context (default: the profile's)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing bundle at --out"),
    promote: bool = typer.Option(True, "--promote/--no-promote", help="when a quantized component misses its parity gate, "
                                 "promote to 8-bit the layers doing the most damage per byte added, and build again"),
    size_budget: float = typer.Option(1.5, "--size-budget", help="promotion may grow a component's quantized weights to this "
                                      "many times the recipe's"),
    host_check: bool = typer.Option(True, "--host-check/--no-host-check", help="refuse before any work when this host's "
                                    "memory cannot hold the job (the fp32 reference of every component)"),
    estimate_first: bool = typer.Option(True, "--estimate-first/--no-estimate-first", help="with --promote: before lowering, "
                                        "estimate each quantized component's error from its weights and promote the layers of "
                                        "any that would miss its gate, rather than lower a build the gate then rejects"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Main job: omni-export --target PROFILE [--model DIR] [--quant PRESET] [--out DIR]."""
    _logging(verbose)
    if not verbose:
        # Import-time chatter of the backends (missing CUDA kernels, deprecations) says nothing about this run.
        for noisy in ("torchao", "torch", "executorch"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    if ctx.invoked_subcommand is not None:
        return
    if target is None:
        console.print(ctx.get_help())
        raise typer.Exit(0)
    from omni_export import api
    from omni_export.compiler import ParityGateError

    try:
        result = _run_main_job(api, target, model, quant, out, context, overwrite, promote, size_budget, host_check, estimate_first)
    except api.HostMemoryError as exc:
        err.print(f"[red]{exc}[/]", soft_wrap=True)
        raise typer.Exit(EXIT_DOES_NOT_FIT)
    except api.DoesNotFitError as exc:
        console.print(_fit_table(exc.plan.fit))
        err.print(f"[red]{exc}[/]", soft_wrap=True)
        raise typer.Exit(EXIT_DOES_NOT_FIT)
    except ParityGateError as exc:
        console.print(_build_table(exc.result))
        for b in exc.result.components:
            for f in b.parity.failures:
                err.print(f"[red]{b.name}: {f}[/]", soft_wrap=True)
        err.print(f"[red]{exc}[/]", soft_wrap=True)
        raise typer.Exit(EXIT_PARITY)
    except api.PromotionError as exc:
        err.print(f"[red]{exc}[/]", soft_wrap=True)
        raise typer.Exit(EXIT_PARITY)
    except OmniExportError as exc:
        _fail(exc)
    console.print(_build_table(result))
    for note in result.notes:
        err.print(f"[yellow]note:[/] {note}", soft_wrap=True)
    console.print(f"bundle: [bold]{result.bundle}[/] ({result.seconds:.0f} s). Check it with `omni-export verify {result.bundle}`.")


def _run_main_job(api, target, model, quant, out, context, overwrite, promote=True, size_budget=1.5, host_check=True,  # type: ignore[no-untyped-def]
                  estimate_first=True):  # fmt: skip
    from rich.progress import (
        BarColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    from omni_export.files import check_bundle_out
    from omni_export.profiles import get_profile
    from omni_export.targets import TARGETS

    profile = get_profile(target)
    TARGETS.get(profile.target)  # an unavailable target fails before any work
    check_bundle_out(out or Path(f"{profile.name}-bundle"), overwrite)  # so does an --out that cannot take it
    plan = _with_progress("preparing", lambda cb: api.plan_export(target, model, quant, context, progress=cb))
    console.print(f"checkpoint: {plan.model}")
    console.print(_fit_table(plan.fit))
    if not plan.fit.fits:
        raise api.DoesNotFitError(plan)
    api.check_host(plan, host_check)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, transient=True) as prog:  # fmt: skip
        n = len(plan.fit.plan.components)
        task = prog.add_task("building", total=5 * n + 2)
        return api.export(target, plan.model, quant, out, context, overwrite, plan=plan, promote=promote, size_budget=size_budget,
                          host_check=False, estimate_first=estimate_first, progress=lambda comp, step: prog.update(task, advance=1, description=f"{comp}: {step}"))[1]  # fmt: skip


def _build_table(result) -> Table:  # type: ignore[no-untyped-def]
    t = Table(title=f"bundle for {result.profile} ({result.precision})")
    for col in ("component", "methods", "precision", "file size", "delegated", "parity (gate ref)", "worst cosine", "LLM top-1", "build s"):
        t.add_column(col, justify="left" if col in ("component", "methods", "precision") else "right")
    for b in result.components:
        w = b.parity.worst(b.parity.gate_reference)
        status = {"pass": "[green]pass[/]", "FAIL": "[red]FAIL[/]"}.get(b.parity.status, f"[yellow]{b.parity.status}[/]")
        top1 = f"{w['top1'] * 100:.1f}%" if "top1" in w else "-"
        cos = f"{w['cosine']:.6f}" if b.parity.results else "-"
        t.add_row(b.name, ", ".join(b.methods), b.precision, _gb(b.bytes), f"{b.delegated_share * 100:.0f}%",
                  f"{status} (vs {b.parity.gate_reference})", cos, top1, f"{sum(b.seconds.values()):.1f}")  # fmt: skip
    return t


@app.command()
def synth(
    family: str = typer.Option(..., "--family", "-f", help="interactiveomni or vita15"),
    size: str = typer.Option("tiny", "--size", "-s", help="tiny, small, full (interactiveomni also full-8b)"),
    out: Path = typer.Option(..., "--out", "-o"),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Write a synthetic checkpoint in the family's exact on-disk layout."""
    from omni_export.export.synthetic import write_synthetic

    try:
        path = _with_progress("writing", lambda cb: write_synthetic(family, size, out, seed, progress=cb, overwrite=overwrite))
    except OmniExportError as exc:
        _fail(exc)
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    console.print(f"wrote {family} {size} checkpoint to {path} ({_gb(total)})")


@app.command("quant-report")
def quant_report(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="checkpoint directory; default: the built-in demo"),
    quant: str = typer.Option("int4", "--quant", "-q", help="preset or recipe .toml to analyse"),
    target: str = typer.Option("android", "--target", "-t", help="profile whose parity threshold the proposal must meet"),
    top: int = typer.Option(10, "--top", help="layers to list per component"),
    write_recipe: Optional[Path] = typer.Option(None, "--write-recipe", help="write the proposed mixed-precision recipe here (TOML)"),
    ranking: str = typer.Option("auto", "--ranking", help="exact: the component's output with each layer alone quantized (an "
                                "evaluation per layer); block: with each block (decoder layer) quantized, then each layer's own "
                                "output; auto: block for large components"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Rank quantized layers by the damage each does alone and propose the smallest recipe that meets the parity target."""
    from omni_export import api
    from omni_export.files import atomic_write_text
    from omni_export.quantize.recipe import recipe_toml

    try:
        path = model or api.demo_checkpoint()
        with _spinner("sensitivity") as prog:
            task = prog.add_task("starting")
            reports, proposal = api.quant_report(path, quant, target, lambda what, i, n: prog.update(task, description=f"{what} {i}/{n}"),
                                                 ranking=ranking)  # fmt: skip
    except OmniExportError as exc:
        _fail(exc)
    if write_recipe:
        atomic_write_text(write_recipe, recipe_toml(proposal))
    if as_json:
        console.print_json(json.dumps({"reports": [_sens_dict(r) for r in reports], "proposal_toml": recipe_toml(proposal)}))
        return
    for r in reports:
        alone = "alone" if r.ranking == "exact" else "by the damage of their block, then their own output"
        t = Table(title=f"{r.component}: {quant} all layers -> {_damage_str(r.all_quantized)}; worst layers {alone}")
        for col in ("layer", "precision", "damage alone" if r.ranking == "exact" else "block's damage", "bytes"):
            t.add_column(col, justify="left" if col == "layer" else "right")
        for fqn, cfg, d, nbytes in r.layers[:top]:
            t.add_row(fqn, f"int{cfg.bits} g{cfg.group_size or 'ch'}", _damage_str(d), _gb(nbytes))
        console.print(t)
    t = Table(title=f"proposal for {target} (meets its {quant} parity threshold?)")
    for col in ("component", "recipe size", "proposal size", "int8 layers", "int4 layers", "damage", "meets"):
        t.add_column(col, justify="left" if col == "component" else "right")
    profile = api.get_profile(target)
    for r in reports:
        th = profile.threshold(r.precision_class)
        d = r.proposal_damage or r.all_quantized
        bits = [c.bits for c in r.proposal.values()]
        t.add_row(r.component, _gb(r.bytes_recipe), _gb(r.bytes_proposal), str(bits.count(8)), str(bits.count(4)), _damage_str(d),
                  "[green]yes[/]" if d.meets(th) else "[red]no[/]")  # fmt: skip
    console.print(t)
    changed = len(proposal.rules) - len(api.resolve_recipe(quant).rules)
    console.print(f"proposed recipe {proposal.name!r}: {changed} per-layer rule(s) before the {quant} rules"
                  + (f", written to {write_recipe}" if write_recipe else "; pass --write-recipe FILE to save it"))  # fmt: skip


def _damage_str(d) -> str:  # type: ignore[no-untyped-def]
    if d.kl is not None:
        return f"KL {d.kl:.4f}, top-1 {'n/a' if d.top1 is None else f'{d.top1 * 100:.1f}%'}"
    return f"cosine {d.cosine:.5f}"


def _sens_dict(r) -> dict:  # type: ignore[no-untyped-def]
    from dataclasses import asdict

    return {"component": r.component, "ranking": r.ranking, "all_quantized": asdict(r.all_quantized), "bytes_recipe": r.bytes_recipe,
            "bytes_proposal": r.bytes_proposal, "proposal_damage": asdict(r.proposal_damage) if r.proposal_damage else None,
            "layers": [{"layer": f, "bits": c.bits, "group_size": c.group_size, "damage": asdict(d), "bytes": b} for f, c, d, b in r.layers],
            "proposal": {p: {"bits": c.bits, "group_size": c.group_size} for p, c in r.proposal.items()}}  # fmt: skip


@app.command()
def profiles(as_json: bool = typer.Option(False, "--json")) -> None:
    """List the device profiles."""
    from omni_export.configs import to_dict
    from omni_export.profiles import all_profiles

    profs = all_profiles()
    if as_json:
        print(json.dumps({n: to_dict(p) for n, p in profs.items()}, indent=2))
        return
    t = Table(title="device profiles")
    for col in ("name", "aliases", "target", "memory", "usable", "bandwidth", "peak fp16", "default quant", "max ctx"):
        t.add_column(col)
    for p in profs.values():
        t.add_row(p.name, ", ".join(p.aliases), p.target, f"{p.memory_gb:g} GB", f"{p.usable_memory_gb:g} GB",
                  f"{p.bandwidth_gbs:g} GB/s", f"{p.peak_fp16_tflops:g} TFLOPS", p.default_quant, str(p.max_context))  # fmt: skip
    console.print(t)


@app.command()
def fit(
    target: str = typer.Option(..., "--target", "-t"),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="checkpoint directory"),
    family: Optional[str] = typer.Option(None, "--family", "-f", help="instead of --model: a family preset ..."),
    size: str = typer.Option("full", "--size", help="... at this size (no checkpoint needed)"),
    quant: Optional[str] = typer.Option(None, "--quant", "-q"),
    context: Optional[int] = typer.Option(None, "--context"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Will the model fit the device? Weights + KV cache + activations vs usable memory."""
    from omni_export.configs import to_dict
    from omni_export.export.checkpoint import read_family_config
    from omni_export.export.families import FAMILIES
    from omni_export.profiles import get_profile
    from omni_export.profiles.fit import fit_check
    from omni_export.profiles.host import host_fit
    from omni_export.quantize.presets import resolve_recipe

    try:
        profile = get_profile(target)
        if model is not None:
            fam, cfg = read_family_config(model)
        elif family is not None:
            fam = FAMILIES.get(family)
            cfg = fam.preset(size)
        else:
            raise OmniExportError("give --model DIR or --family NAME [--size SIZE]")
        result = fit_check(profile, fam, cfg, resolve_recipe(quant or profile.default_quant), context)
    except OmniExportError as exc:
        _fail(exc)
    host = host_fit(result.plan)
    if as_json:
        plan = result.plan
        print(json.dumps({"profile": profile.name, "fits": result.fits, "margin_bytes": result.margin_bytes,
                          "host": {"fits": host.fits, "floor_bytes": host.floor_bytes, "available_bytes": host.available_bytes},
                          "available_bytes": result.available_bytes, "total_bytes": plan.total_bytes,
                          "weight_bytes": plan.weight_bytes, "kv_bytes": plan.kv_bytes, "kv_dtype": plan.kv_dtype or plan.float_dtype,
                          "stream_bytes": plan.stream_bytes, "stream_dtype": plan.stream_dtype or plan.float_dtype, "activation_bytes": plan.activation_bytes, "overhead_bytes": plan.overhead_bytes,
                          "recipe": plan.recipe, "context": plan.context,
                          "components": [to_dict(c) for c in plan.components]}, indent=2))  # fmt: skip
    else:
        console.print(_fit_table(result))
        console.print(("export on this host: " if host.fits else "[red]export on this host refused:[/] ") + host.explain())
    if not result.fits:
        raise typer.Exit(EXIT_DOES_NOT_FIT)


@app.command()
def verify(bundle: Path = typer.Argument(..., help="bundle directory")) -> None:
    """Check a bundle: manifest schema, every file present, every sha256, nothing unlisted."""
    from omni_export.bundle.verify import check_bundle_files

    checked = check_bundle_files(bundle)
    if checked.problems:
        for p in checked.problems:
            err.print(f"[red]problem:[/] {p}", soft_wrap=True)
        err.print(f"[red]{bundle}: {len(checked.problems)} problem(s); do not ship this bundle.[/]", soft_wrap=True)
        raise typer.Exit(EXIT_VERIFY)
    console.print(f"[green]{bundle}: OK[/] (every file matches manifest.json)")
    for note in checked.notes:
        console.print(note)


@app.command()
def inspect(bundle: Path = typer.Argument(..., help="bundle directory"), as_json: bool = typer.Option(False, "--json")) -> None:
    """Print a readable summary of a bundle."""
    from omni_export.bundle import read_manifest

    try:
        m = read_manifest(bundle)
    except OmniExportError as exc:
        _fail(exc)
    if as_json:
        print(m.to_json())
        return
    console.print(f"[bold]{m.family}[/] for [bold]{m.profile.name}[/] ({m.profile.target}), recipe "
                  f"{m.quant.recipe}, max context {m.profile.max_context}, omni-export {m.toolchain['omni_export']}")  # fmt: skip
    parity = {}
    report = bundle / "reports" / "parity.json"
    if report.is_file():
        parity = {r["component"]: r for r in json.loads(report.read_text())}
    t = Table(title="components")
    for col in ("component", "role", "files", "size", "methods", "weights", "KV cache", "delegated", "parity"):
        t.add_column(col)
    for name, c in m.components.items():
        kv = c.kv_cache
        kv_s = f"{kv.layers}L x {kv.kv_heads}h x {kv.max_len} ({kv.held_as})" if kv else "-"
        shares = [d.share for d in c.delegation.values()]
        size = sum(m.files[f].bytes for f in c.files if f in m.files)
        p = parity.get(name)
        q = c.quant
        weights = c.precision + (" (" + ", ".join(f"{k} x{v}" for k, v in q.kinds.items()) + ")" if q else "")
        t.add_row(name, c.role, "\n".join(c.files), _gb(size), ", ".join(c.methods), weights, kv_s,
                  f"{min(shares) * 100:.0f}-{max(shares) * 100:.0f}%" if shares else "-",
                  "-" if p is None else p.get("status", "pass" if p["passed"] else "FAIL"))  # fmt: skip
    console.print(t)
    model = m.model
    console.print(f"audio in {model['audio_sample_rate']} Hz, speech out {model['output_sample_rate']} Hz, "
                  f"eos ids {model['eos_ids']}, image token {model['image_token_id']}, audio token {model['audio_token_id']}")  # fmt: skip
    if m.device_files:
        console.print(f"built on the device: {', '.join(m.device_files)}")


@app.command()
def memory(bundle: Path = typer.Argument(..., help="bundle directory"), as_json: bool = typer.Option(False, "--json"),
           backend: str | None = typer.Option(None, help="open every component on this runtime instead of its own")) -> None:  # fmt: skip
    """Resident memory of a bundle in its runtime: what each component's session adds when it
    loads and when its golden calls first run (memory plan, activations, KV cache), all kept open."""
    from omni_export.runtime_py.memory import measure_bundle

    try:
        report = _with_progress("memory", lambda step: measure_bundle(bundle, backend, lambda name, i, n: step(f"{name} ({i + 1}/{n})")))
    except OmniExportError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(report.to_dict(), indent=1))
        return
    t = Table(title=f"resident memory of {bundle}")
    for col in ("component", "backend", "file", "memory plan", "after load", "after first calls", "total", "total / file"):
        t.add_column(col, justify="left" if col in ("component", "backend") else "right")
    for c in report.components:
        t.add_row(c.component, c.backend, _gb(c.file_bytes), "-" if c.planned_bytes is None else _gb(c.planned_bytes),
                  f"+{_gb(c.load_bytes)}", f"+{_gb(c.run_bytes)}", _gb(c.total_bytes),
                  f"{c.total_bytes / c.file_bytes:.2f}x" if c.file_bytes else "-")  # fmt: skip
    files = sum(c.file_bytes for c in report.components)
    t.add_row("all components", "", _gb(files), "", "", "", _gb(report.final_bytes - report.runtime_bytes),
              f"{(report.final_bytes - report.runtime_bytes) / files:.2f}x" if files else "-", end_section=True)  # fmt: skip
    t.add_row("runtime libraries", "", "", "", "", "", _gb(report.runtime_bytes), "")
    t.add_row("process", "", "", "", "", "", f"{_gb(report.final_bytes)} (peak {_gb(report.peak_bytes)})", "")
    console.print(t)


@app.command()
def parity(bundle: Path = typer.Argument(..., help="bundle directory"), as_json: bool = typer.Option(False, "--json"),
           backend: Optional[str] = typer.Option(None, "--backend", help="run on this backend (tensorrt: the built engines) "
                                                 "instead of each component's parity backend")) -> None:  # fmt: skip
    """Re-run every component's golden I/O on this host's backend and compare with the reference."""
    _parity(bundle, as_json, backend)


@app.command("build-engines")
def build_engines(
    bundle: Path = typer.Argument(..., help="a TensorRT bundle (exported for a jetson-* or rtx-4090 profile)"),
    only: Optional[list[str]] = typer.Option(None, "--only", help="build only this component (repeatable)"),
    force: bool = typer.Option(False, "--force", help="build even on a GPU other than the one the bundle was exported for"),
) -> None:
    """On the device: build the bundle's TensorRT engines (tensorrt/build_engines.py), record them in
    the manifest, then check their parity against the golden data."""
    from omni_export.targets import tensorrt_build

    if not (bundle / tensorrt_build.PLAN).is_file():
        _fail(OmniExportError(f"{bundle} has no {tensorrt_build.PLAN}: it is not a TensorRT bundle (export with --target jetson or desktop-gpu)"))
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        err.print(f"[yellow]TensorRT's Python package is not importable here ({exc}). Engines are built on the device that runs "
                  f"them: copy the bundle there and run this command (or python {bundle / 'tensorrt' / 'build_engines.py'}).[/]", soft_wrap=True)  # fmt: skip
        raise typer.Exit(EXIT_NOT_RUN) from None
    try:
        built = tensorrt_build.build_all(bundle, set(only) if only else None, force, say=console.print)
    except tensorrt_build.BuildError as exc:
        _fail(exc)
    console.print(f"[green]built {len(built)} engine(s)[/]; checking their parity on TensorRT")
    _parity(bundle, False, "tensorrt")


def _parity(bundle: Path, as_json: bool, backend: str | None) -> None:
    from omni_export.runtime_py.parity import check_bundle

    try:
        results = _with_progress("parity", lambda cb: check_bundle(bundle, backend))
    except OmniExportError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        t = Table(title=f"parity of {bundle}")
        for col in ("component", "method.output", "ref", "cosine", "rel L2", "max abs", "PSNR dB", "top-1", "KL"):
            t.add_column(col)
        for r in results:
            for row in r.results:
                t.add_row(r.component, f"{row.method}.{row.output}", row.reference, f"{row.cosine:.6f}", f"{row.rel_l2:.2e}",
                          f"{row.max_abs:.2e}", f"{row.psnr:.1f}", "-" if row.top1 is None else f"{row.top1 * 100:.1f}%",
                          "-" if row.kl is None else f"{row.kl:.2e}")  # fmt: skip
        console.print(t)
    for r in results:
        if r.not_run:
            err.print(f"[yellow]{r.component}: not run on this host ({r.not_run}); it is not counted as a pass[/]", soft_wrap=True)
    failed = [r for r in results if r.failures]
    for r in failed:
        err.print(f"[red]{r.component}: {'; '.join(r.failures)}[/]", soft_wrap=True)
    if failed:
        err.print("[red]the artifact disagrees with its golden reference: rebuild the bundle, or run `omni-export quant-report` to find the layers that cause it[/]", soft_wrap=True)
        raise typer.Exit(EXIT_PARITY)
    if any(r.not_run for r in results):
        raise typer.Exit(EXIT_NOT_RUN)


# The runtime's commands (run, profile) live in their own module; importing it registers them.
from omni_export import cli_runtime as _cli_runtime  # noqa: E402,F401


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
