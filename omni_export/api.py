"""The Python API the CLI is a thin layer over."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from omni_export.errors import ConfigError, OmniExportError
from omni_export.export.checkpoint import Checkpoint, load_checkpoint
from omni_export.export.synthetic import write_synthetic
from omni_export.files import cache_dir, check_bundle_out
from omni_export.profiles import Profile, get_profile
from omni_export.profiles.fit import FitResult, fit_check
from omni_export.quantize.presets import resolve_recipe
from omni_export.quantize.recipe import QuantRecipe

log = logging.getLogger(__name__)

DEMO_FAMILY, DEMO_SIZE, DEMO_SEED = "interactiveomni", "small", 0
# The demo's LLM is trained this long on pydoc's text: with random weights no quantizer's damage
# is measurable (near-uniform logits), so the int4 parity gate would judge noise.
DEMO_TRAIN_S = 300
# Bump when the synthetic writer changes what a demo checkpoint holds (2: Qwen2's pre-tokenizer).
DEMO_VERSION = 4
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def demo_checkpoint(progress: Callable[[str], None] | None = None) -> Path:
    """The built-in demo checkpoint (small InteractiveOmni, its LLM trained for DEMO_TRAIN_S on
    pydoc's text), generated once and cached."""
    from omni_export.files import replace_dir, staged_dir
    from omni_export.quantize.fixture import train_in_place

    path = cache_dir() / f"demo-{DEMO_FAMILY}-{DEMO_SIZE}-seed{DEMO_SEED}-trained{DEMO_TRAIN_S}s-v{DEMO_VERSION}"
    if not (path / "config.json").is_file():
        log.info("writing the demo checkpoint to %s (once)", path)
        with staged_dir(path) as stage:
            tmp = stage / "checkpoint"
            write_synthetic(DEMO_FAMILY, DEMO_SIZE, tmp, seed=DEMO_SEED, progress=progress)
            step = progress or (lambda what: None)
            train_in_place(tmp, DEMO_TRAIN_S, lambda i, loss: step(f"training the demo LLM ({DEMO_TRAIN_S} s, once): step {i}, loss {loss:.2f}"))
            replace_dir(tmp, path)
    return path


def load(path: str | Path, dtype: str = "fp32", progress: Callable[[str], None] | None = None) -> Checkpoint:
    return load_checkpoint(path, DTYPES[dtype], progress=progress)


def eager_pipeline(ckpt: Checkpoint, max_context: int = 4096, device: str = "cpu", **pipeline_kwargs):  # type: ignore[no-untyped-def]  # -> Pipeline
    """The reference: the checkpoint's eager modules (on ``device``: cpu or cuda) behind the same
    Pipeline a bundle uses."""
    if device != "cpu":
        if not torch.cuda.is_available():
            raise OmniExportError(f"--torch-device {device}: this machine has no CUDA device; use cpu")
        for module in ckpt.components.values():
            module.to(device)
    from omni_export.export.golden import eager_methods
    from omni_export.export.trace_specs import Limits
    from omni_export.runtime_py.pipeline import Pipeline

    context = min(max_context, ckpt.family.llm_config(ckpt.config).max_position_embeddings)
    limits = Limits(max_context=context, prefill_chunk=min(Limits.prefill_chunk, context))
    sessions, components = {}, {}
    for name, module in ckpt.components.items():
        sessions[name], specs = eager_methods(module, limits)
        components[name] = eager_entry(module, specs)
    config = ckpt.family.runtime_config(ckpt)
    config.update(max_context=limits.max_context, prefill_chunk=limits.prefill_chunk)
    return Pipeline(sessions, components, config, ckpt.tokenizer, ckpt.family.assets(ckpt), asset_files=ckpt.family.asset_files(ckpt),
                    **pipeline_kwargs)  # fmt: skip


def eager_entry(module, specs):  # type: ignore[no-untyped-def]  # -> ComponentEntry
    """What the pipeline reads about an eager component, in the manifest's terms."""
    from omni_export.bundle.manifest import ComponentEntry, MethodEntry, TensorSpec
    from omni_export.export.components.base import role_of

    def entry(s) -> MethodEntry:  # type: ignore[no-untyped-def]
        return MethodEntry(tuple(TensorSpec(t.name, t.dtype, t.shape) for t in s.inputs),
                           tuple(TensorSpec(t.name, t.dtype, t.shape) for t in s.outputs), s.name)  # fmt: skip

    return ComponentEntry("eager", (), {s.name: entry(s) for s in specs}, role_of(module).value, "fp32", "")


@dataclass(frozen=True)
class ExportPlan:
    profile: Profile
    model: Path
    recipe: QuantRecipe  # the recipe itself travels; its name is a label, never looked up again
    fit: FitResult

    @property
    def quant(self) -> str:
        return self.recipe.name


def plan_export(target: str, model: str | Path | None = None, quant: str | None = None, context: int | None = None,
                progress: Callable[[str], None] | None = None) -> ExportPlan:  # fmt: skip
    """Resolve profile, checkpoint and recipe; validate every tensor of the checkpoint against its
    config (without materialising weights); check the memory fit. Everything before tracing."""
    from omni_export.profiles.fit import check_context

    check_context(context)  # before the demo checkpoint is written or anything is read
    profile = get_profile(target)
    path = Path(model) if model is not None else demo_checkpoint(progress)
    recipe = resolve_recipe(quant or profile.default_quant)
    ckpt = load_checkpoint(path, components=[])  # name/shape/dtype check of every tensor, no weights read
    as_built = check_recipe(ckpt, recipe, profile)
    # The preset travels (the build adapts it again and says how); the fit counts it as built.
    return ExportPlan(profile, path, recipe, fit_check(profile, ckpt.family, ckpt.config, as_built, context))


def check_recipe(ckpt: Checkpoint, recipe: QuantRecipe, profile: Profile) -> QuantRecipe:
    """Every recipe error (dead rule, group size that does not divide a width, something the
    target cannot encode) on weightless modules, before any weight is read. Returns the recipe
    as the target will build it (a preset adapted to what it encodes)."""
    from omni_export.quantize.engine import plan
    from omni_export.targets import TARGETS
    from omni_export.targets.base import check_plan, recipe_for_target

    target = TARGETS.get(profile.target)
    with torch.device("meta"):
        modules = {name: spec.build() for name, spec in ckpt.specs.items()}
    recipe, _ = recipe_for_target(target, recipe, modules)
    check_plan(target, modules, plan(modules, recipe), profile)
    return recipe


def quant_report(model: str | Path, quant: str | QuantRecipe, target: str | Profile = "android", progress=None,  # type: ignore[no-untyped-def]
                 components: list[str] | None = None, measured: dict[str, float] | None = None, ranking: str = "auto",
                 screen: float | None = None):  # fmt: skip
    """Sensitivity of every quantized layer (of ``components``, default all) and a mixed-precision
    proposal meeting the profile's parity threshold for ``quant`` (see quantize/sensitivity.py;
    ``measured``: the artifacts' worst cosines, which calibrate the estimate; ``ranking``: exact,
    block or auto; ``screen``: see sensitivity.analyze). The checkpoint stays as stored and
    memory-mapped; it computes in fp32 a layer at a time. Returns (reports, proposed recipe)."""
    from omni_export.quantize.sensitivity import analyze, proposal_recipe

    profile = get_profile(target) if isinstance(target, str) else target
    recipe = resolve_recipe(quant) if isinstance(quant, str) else quant
    ckpt = load_checkpoint(model, components=[])
    recipe = check_recipe(ckpt, recipe, profile)  # as the target builds it
    ckpt = load_checkpoint(model)
    reports = analyze(ckpt.components, recipe, ckpt.tokenizer, profile.threshold, progress,
                      None if components is None else set(components), measured, ranking, screen)  # fmt: skip
    return reports, proposal_recipe(recipe, reports)


def export(target: str, model: str | Path | None = None, quant: str | None = None, out: str | Path | None = None,
           context: int | None = None, overwrite: bool = False, progress=None, plan: ExportPlan | None = None,  # type: ignore[no-untyped-def]
           promote: bool = True, size_budget: float = 1.5, host_check: bool = True, estimate_first: bool = True):  # fmt: skip
    """The main job: fit check, then load -> trace -> lower -> golden -> parity -> bundle.

    ``plan``: a plan_export result already shown to the user (skips checking again).
    ``promote``: when a quantized component misses its gate, rank its layers by the damage each
    does (quantize/sensitivity.py), promote the worst to 8-bit until the estimate meets the gate,
    and build once more with that recipe, if its quantized weights stay within ``size_budget``
    times the recipe's (the manifest then records the mixed recipe). That build lowers only the
    failed components; those that passed come from the rejected bundle as they are.
    ``estimate_first`` (with ``promote``): before lowering, promote the layers of components
    whose estimated error would miss the gate (estimated_recipe), so the first build is the one
    that passes as often as the estimate knows.
    Returns (ExportPlan, BuildResult); raises DoesNotFitError before any work when the model does
    not fit the device, HostMemoryError when this host cannot hold the job (``host_check``), ParityGateError (with the result) when a component misses its threshold,
    PromotionError when promoting cannot help within the budget."""
    from omni_export.compiler import ParityGateError, build_bundle
    from omni_export.targets import TARGETS

    profile = get_profile(target)
    TARGETS.get(profile.target)  # an unavailable target fails before any work
    out = Path(out) if out is not None else Path(f"{profile.name}-bundle")
    check_bundle_out(out, overwrite)  # and so does an --out that cannot take the bundle
    plan = plan or plan_export(target, model, quant, context)
    if not plan.fit.fits:
        raise DoesNotFitError(plan)
    check_host(plan, host_check)
    recipe, notes, base_bytes, before, carry = plan.recipe, [], {}, {}, None
    if promote and estimate_first and not recipe.is_float:
        recipe, why = estimated_recipe(plan, size_budget, base_bytes, progress)
        notes.append(why)
    for round_ in range(PROMOTION_ROUNDS + 1):
        try:
            result = build_bundle(plan.profile, plan.model, recipe, out, context, overwrite, progress, carry)
            break
        except ParityGateError as exc:
            if not promote or recipe.is_float or round_ == PROMOTION_ROUNDS:
                raise
            measured = {b.name: b.parity.worst(b.parity.gate_reference)["cosine"] for b in exc.result.components if b.parity.failures}
            stuck = [f"{n} ({before[n]:.6f} -> {c:.6f})" for n, c in measured.items() if n in before and c <= before[n] + 1e-5]
            if stuck:
                raise PromotionError(
                    f"promoting layers to 8-bit did not lower the artifact's error for {', '.join(stuck)}: the rest of it does not "
                    f"come from quantized weights (the gate's fp16 reference, layers kept float, the target's kernels). The bundle "
                    f"is at {exc.result.bundle}; build with --quant int8 or fp16.") from exc  # fmt: skip
            before = measured
            carry = exc.result  # what passed is taken as it is: only the failed components build again
            recipe, why = promoted_recipe(replace(plan, recipe=recipe), measured, size_budget, base_bytes, progress)
            notes.append(why)
    result.notes.extend(notes)
    return replace(plan, recipe=recipe), result


# Builds after the first that promotion may ask for: each measures the artifact again, and the
# next proposal aims by what it measured.
PROMOTION_ROUNDS = 3


class PromotionError(OmniExportError):
    """A component missed its gate and promoting its layers to 8-bit cannot fix it within the budget."""


def promoted_recipe(plan: ExportPlan, measured: dict[str, float], size_budget: float, base_bytes: dict[str, int],  # type: ignore[no-untyped-def]
                    progress=None) -> tuple[QuantRecipe, str]:  # fmt: skip
    """The plan's recipe with the layers of each failed component (``measured``: its artifact's
    worst cosine) that do the most damage per byte added promoted to 8-bit (sensitivity.analyze's
    proposal, calibrated by what the artifact measured), and a sentence saying what it cost.
    ``base_bytes``: each component's quantized weight bytes under the user's recipe (filled on
    the first round), what the size budget is a multiple of."""
    step = progress or (lambda component, what: None)
    reports, mixed = quant_report(plan.model, plan.recipe, plan.profile, lambda what, i, n: step(what, f"sensitivity {i}/{n}"),
                                  list(measured), measured)  # fmt: skip
    parts = _promotions(plan, reports, size_budget, base_bytes, "the target's error")
    return mixed, (f"{plan.recipe.name} missed the parity gate for {', '.join(measured)}; promoted by sensitivity and built "
                   f"again as {mixed.name!r}: " + "; ".join(parts))


# The error scale the estimate before lowering assumes for the target (its artifact's error over
# the weights-only estimate's). Measured after a first build: 1.3 for the small InteractiveOmni
# LLM at int4 on ExecuTorch (8-bit dynamic activations), 1.0 for the 4B one.
ESTIMATE_ERROR_SCALE = 1.3


def estimated_recipe(plan: ExportPlan, size_budget: float, base_bytes: dict[str, int],  # type: ignore[no-untyped-def]
                     progress=None) -> tuple[QuantRecipe, str]:  # fmt: skip
    """Before anything is lowered: every quantized component's error estimated from its weights
    (two evaluations each); the layers of those that would miss their gate (at
    ESTIMATE_ERROR_SCALE) promoted to 8-bit as promoted_recipe does, so that a build that would
    be rejected is not lowered first. The gate on the artifact still decides. A proposal that
    cannot be made (over the budget, or no layer helps) leaves the recipe as asked, for the
    artifact to measure. Returns (recipe, a sentence for the notes)."""
    step = progress or (lambda component, what: None)
    reports, mixed = quant_report(plan.model, plan.recipe, plan.profile, lambda what, i, n: step(what, f"estimate {i}/{n}"),
                                  screen=ESTIMATE_ERROR_SCALE)  # fmt: skip
    for r in reports:
        base_bytes.setdefault(r.component, r.bytes_recipe)
    missing = [r for r in reports if not r.screened]
    if not missing:
        est = ", ".join(f"{r.component} {r.all_quantized.cosine:.4f}" for r in reports)
        return plan.recipe, f"before lowering, the estimate put every quantized component within its gate (cosine: {est})"
    names = ", ".join(r.component for r in missing)
    try:
        parts = _promotions(plan, missing, size_budget, base_bytes, "the error assumed for the target")
    except PromotionError as exc:
        return plan.recipe, f"before lowering, the estimate put {names} under the gate and promoting could not help ({exc}); built as asked"
    return mixed, (f"before lowering, {plan.recipe.name}'s estimate missed the parity gate for {names}; promoted by "
                   f"sensitivity and built as {mixed.name!r}: " + "; ".join(parts))


def _promotions(plan: ExportPlan, reports, size_budget: float, base_bytes: dict[str, int], scale_is: str) -> list[str]:  # type: ignore[no-untyped-def]
    """A sentence per report on what its proposal promotes and costs; PromotionError when a
    proposal cannot help or would pass the size budget."""
    run_next = f"omni-export quant-report --model {plan.model} --quant {plan.recipe.name} --target {plan.profile.name}"
    parts = []
    for r in reports:
        th = r.threshold
        worst = ", ".join(fqn for fqn, *_ in r.layers[:3])
        if r.all_quantized.meets(th):
            raise PromotionError(
                f"{r.component} missed its gate on the target, but quantizing its weights alone (round-to-nearest, "
                f"no activation quantization) meets it, so promoting layers cannot be trusted to help: the error comes "
                f"from how the target runs them. Build with --quant int8 or fp16, or see `{run_next}`.")  # fmt: skip
        if r.proposal_damage is None or not r.proposal_damage.meets(th):
            raise PromotionError(f"{r.component} misses its gate even with every quantized layer at 8-bit; build with "
                                 f"--quant fp16 (worst layers: {worst}).")  # fmt: skip
        base = base_bytes.setdefault(r.component, r.bytes_recipe)
        ratio = r.bytes_proposal / max(base, 1)
        if ratio > size_budget:
            raise PromotionError(f"{r.component} meets its gate with the worst layers at 8-bit, at {ratio:.2f}x its "
                                 f"{plan.recipe.name} weight bytes, over the size budget of {size_budget:.2f}x; allow it "
                                 f"with --size-budget {ratio:.2f} or build with --quant int8 (worst layers: {worst}).")  # fmt: skip
        promoted = sum(1 for c in r.proposal.values() if c.bits == 8) - sum(1 for _, c, *_ in r.layers if c.bits == 8)
        if promoted <= 0:
            raise PromotionError(f"{r.component} still misses its gate and the estimate finds no layer left to promote; "
                                 f"build with --quant int8 or fp16, or see `{run_next}`.")  # fmt: skip
        parts.append(f"{r.component}: {promoted} of {len(r.layers)} layers to 8-bit (worst: {worst}; {scale_is} "
                     f"{r.error_scale:.1f}x the estimate's, aimed at cosine {th.cosine_min:.4f}), weights "
                     f"{base / 1e6:.2f} -> {r.bytes_proposal / 1e6:.2f} MB ({ratio:.2f}x the first recipe's)")  # fmt: skip
    return parts


class HostMemoryError(OmniExportError):
    """The export itself cannot fit the build host's memory (the bundle may well fit the device)."""


def check_host(plan: ExportPlan, enabled: bool = True) -> None:
    """Refuse before any weight is read when this host cannot hold what the job must (see
    profiles/host.py); ``enabled=False`` (CLI ``--no-host-check``) runs it anyway, e.g. with swap."""
    from omni_export.profiles.host import host_fit

    fit = host_fit(plan.fit.plan)
    if enabled and not fit.fits:
        raise HostMemoryError(f"{fit.explain()}. Run the export on a machine with more memory (the bundle itself "
                              f"fits {plan.profile.name}: {plan.fit.plan.total_bytes / 1e9:.2f} GB), or pass --no-host-check to try anyway.")  # fmt: skip


class DoesNotFitError(OmniExportError):
    def __init__(self, plan: ExportPlan) -> None:
        super().__init__(f"the model needs {plan.fit.plan.total_bytes / 1e9:.2f} GB on {plan.profile.name}, "
                         f"{plan.fit.available_bytes / 1e9:.2f} GB usable; try a lower-bit --quant or a shorter --context")  # fmt: skip
        self.plan = plan


# -- the runtime: run and profile -----------------------------------------------------------------
PROFILE_SCRIPT_VERSION = 1
PROFILE_TURNS = (
    ("What do you see in this picture?", True),
    ("Tell me more about her work.", False),
    ("Thank you. Goodbye.", False),
)


def profile_script(max_new_tokens: int = 24) -> Path:
    """The fixed three-turn conversation ``profile`` measures: espeak-ng questions (real speech),
    the first with matplotlib's photo of Grace Hopper. Written once to the cache, as a directory
    that can travel to a device (the device needs no espeak)."""
    import shutil

    from omni_export.files import atomic_write_text, replace_dir, staged_dir
    from omni_export.quantize.calibrate import photo_path, say
    from omni_export.runtime_py.script import Script, TurnSpec, script_toml

    path = cache_dir() / f"profile-script-v{PROFILE_SCRIPT_VERSION}-{max_new_tokens}"
    if not (path / "script.toml").is_file():
        with staged_dir(path) as tmp:
            shutil.copy(photo_path(), tmp / "photo.jpg")
            turns = []
            for i, (sentence, with_photo) in enumerate(PROFILE_TURNS, 1):
                say(sentence, tmp / f"turn{i}.wav")
                turns.append(TurnSpec(audio=str(tmp / f"turn{i}.wav"), image=str(tmp / "photo.jpg") if with_photo else None,
                                      image_max_tiles=1 if with_photo else None, max_new_tokens=max_new_tokens, end_of_turn="eof"))  # fmt: skip
            atomic_write_text(tmp / "script.toml", script_toml(Script(turn=tuple(turns)), tmp))
            replace_dir(tmp, path)
    return path / "script.toml"


class Runtime(NamedTuple):
    pipeline: Any  # runtime_py.pipeline.Pipeline
    weights: dict  # component -> roofline Weights
    profile: str  # the device profile its floors default to
    checkpoint: Checkpoint | None  # the eager modules behind the pipeline; None for a bundle


def open_runtime(path: str | Path, dtype: str = "fp32", max_context: int = 4096, progress=None, device: str = "cpu",  # type: ignore[no-untyped-def]
                 backend: str | None = None, **pipeline_kwargs) -> Runtime:  # fmt: skip
    """A bundle (its artifacts, verified; ``backend``: see Pipeline.from_bundle) or a checkpoint
    (the eager reference), ready to talk."""
    from omni_export.bundle import MANIFEST, read_manifest
    from omni_export.profiles.roofline import bundle_weights, module_weights
    from omni_export.runtime_py.pipeline import Pipeline

    from omni_export.profiles.fit import check_context

    check_context(max_context, "--max-context")
    path = Path(path)
    if (path / MANIFEST).is_file():
        pipeline = Pipeline.from_bundle(path, backend, **pipeline_kwargs)
        m = read_manifest(path)
        return Runtime(pipeline, bundle_weights(path, m), m.profile.name, None)
    if backend is not None:
        raise ConfigError("--backend applies to bundles; a checkpoint runs the eager reference")
    ckpt = load(path, dtype, progress)
    pipeline = eager_pipeline(ckpt, max_context, device, **pipeline_kwargs)
    return Runtime(pipeline, module_weights(ckpt.components), "host-cpu", ckpt)


def count_flops(pipeline, ckpt: Checkpoint) -> None:  # type: ignore[no-untyped-def]
    """Put each eager method's flops_per_position into the pipeline's components, as the compiler
    does into a bundle's manifest (one pass of every component's golden script, on the
    pipeline's own modules and limits)."""
    from omni_export.export.golden import Context, method_flops
    from omni_export.export.trace_specs import Limits

    cfg = pipeline.config
    ctx = Context(ckpt.tokenizer, Limits(max_context=cfg["max_context"], prefill_chunk=cfg["prefill_chunk"]))
    for name, module in ckpt.components.items():
        per = method_flops(module, ctx)
        entry = pipeline.components[name]
        methods = {m: replace(e, flops_per_position=per.get(m, e.flops_per_position)) for m, e in entry.methods.items()}
        pipeline.components[name] = replace(entry, methods=methods)


def profile(path: str | Path, device: str = "local", runs: int = 3, script: str | Path | None = None, profile_name: str | None = None,
            dtype: str = "fp32", ssh=None, progress=None, torch_device: str = "cpu", backend: str | None = None) -> dict:  # type: ignore[no-untyped-def]  # fmt: skip
    """Measure the latency of a scripted conversation on ``device`` (``local`` or
    ``ssh://user@host[:port]``, see remote.py); the report gets roofline floors for
    ``profile_name`` (default: the bundle's profile; host-cpu for a checkpoint). ``backend``
    (local bundles): as in Pipeline.from_bundle."""
    from omni_export.profiles.roofline import add_floors
    from omni_export.remote import parse_device, remote_profile
    from omni_export.runtime_py.profiler import measure
    from omni_export.runtime_py.script import load_script

    script_path = Path(script) if script is not None else profile_script()
    parsed = load_script(script_path)  # bad scripts fail here, before anything is copied
    target = parse_device(device)
    if target is not None:
        if backend is not None:
            raise ConfigError("--backend is for local runs; on a device the bundle runs its own backend")
        report = remote_profile(target, Path(path), script_path.parent, script_path.name, runs, profile_name, dtype, ssh, progress, torch_device)
        report["device"] = device
        return report
    rt = open_runtime(path, dtype, progress=progress, device=torch_device, backend=backend)
    report = measure(rt.pipeline, parsed, runs, progress=progress)
    report["device"], report["source"] = "local", str(path)
    if backend is not None:
        report["backend"] = backend
    if rt.checkpoint is not None:  # a bundle's manifest carries the counts; a checkpoint is counted now,
        count_flops(rt.pipeline, rt.checkpoint)  # after measuring, so the counting pass warms nothing
    return add_floors(report, get_profile(profile_name or rt.profile), rt.weights, rt.pipeline.components)


def write_latency_report(report: dict, out: str | Path) -> tuple[Path, Path]:
    """reports/latency.json and reports/latency.png under ``out``."""
    import json

    from omni_export.files import atomic_write_text
    from omni_export.runtime_py.timeline import draw_timeline

    reports = Path(out) / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    js = reports / "latency.json"
    atomic_write_text(js, json.dumps(report, indent=2))
    title = f"{Path(report.get('source', '')).name or 'pipeline'} on {report.get('device', 'local')}"
    return js, draw_timeline(report, reports / "latency.png", title)
