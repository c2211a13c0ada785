"""The main job: load -> trace -> lower -> golden -> parity -> bundle, one component at a time,
with a progress callback per step. The bundle is assembled in a hidden directory beside ``out``
and renamed into place only when it is whole and every component passed parity."""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import omni_export
from omni_export.bundle.golden import write_golden
from omni_export.bundle.manifest import (
    MANIFEST,
    SCHEMA_VERSION,
    ComponentEntry,
    Manifest,
    MethodEntry,
    ProfileEntry,
    QuantEntry,
    QuantSummary,
    RuleEntry,
    RuntimeSettings,
    Source,
    TensorSpec,
    file_entry,
    read_manifest,
    write_manifest,
    write_schema,
)
from omni_export.bundle.readme import render
from omni_export.errors import OmniExportError
from omni_export.export.checkpoint import load_checkpoint
from omni_export.export.components.base import role_of
from omni_export.export.golden import Context, flops_per_position, make_golden, replay
from omni_export.export.trace import trace_component
from omni_export.export.safetensors_io import release_pages, trim_heap
from omni_export.export.trace_specs import Limits
from omni_export.export.widen import cast_floats, computing_in
from omni_export.files import atomic_write_text, check_bundle_out, replace_dir, staged_dir
from omni_export.phases import PhaseMeter
from omni_export.profiles import Profile
from omni_export.profiles.fit import check_context
from omni_export.quantize.cache import quantize_checkpoint
from omni_export.quantize.engine import component_classes, plan
from omni_export.quantize.recipe import QuantRecipe, embedding_kind
from omni_export.quantize.result import QTensor, QuantResult
from omni_export.runtime_py.parity import ComponentParity, judge, not_run, replay_component
from omni_export.targets import TARGETS
from omni_export.targets.base import Artifact, check_plan, recipe_for_target
from omni_export.targets.tables import split_tables, swap_tables
from omni_export.targets.precision import CALLS_PER_METHOD

log = logging.getLogger(__name__)
Progress = Callable[[str, str], None]  # (component, step)


class ParityGateError(OmniExportError):
    """At least one component missed its parity threshold; the bundle was not published."""

    def __init__(self, message: str, result: BuildResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class ComponentBuild:
    name: str
    files: tuple[str, ...]
    bytes: int
    methods: list[str]
    delegated_share: float
    parity: ComponentParity
    precision: str = "fp32"
    seconds: dict[str, float] = field(default_factory=dict)
    # The target's precision measurements (TensorRT: the layers kept in fp32 and why).
    precision_layers: list[dict] | None = None


@dataclass
class BuildResult:
    bundle: Path
    profile: str
    precision: str  # the recipe's name: a label
    components: list[ComponentBuild]
    seconds: float
    notes: list[str] = field(default_factory=list)
    recipe: QuantRecipe | None = None  # as the target built it


def kept_from(carry: BuildResult, recipe: QuantRecipe, components: dict[str, torch.nn.Module]) -> set[str]:
    """The components of ``carry`` (a build that missed its gate; ``carry.bundle`` is the rejected
    bundle) that a build with ``recipe`` (as the target builds it) takes as they are: those that
    passed and whose weights no rule ``recipe`` adds or drops matches. Promotion changes only the
    failed components' layers, so a 4B build's encoders, speech decoder and vocoder (an hour of
    lowering) are not lowered again."""
    from omni_export.quantize.engine import weight_roles, weighted_modules

    if carry.recipe is None or recipe.embeddings != carry.recipe.embeddings or recipe.tied_head != carry.recipe.tied_head:
        return set()
    changed = set(recipe.rules) ^ set(carry.recipe.rules)
    roles = weight_roles(components, weighted_modules(components))
    touched = {fqn.split(".", 1)[0] for fqn, role in roles.items() for r in changed if r.matches(fqn, role)}
    return {b.name for b in carry.components if not b.parity.failures and b.name not in touched}


def _quant_summary(linears: dict[str, QTensor], tables: dict[str, QTensor], activation: str, heads: dict[str, str],
                   once: bool) -> QuantSummary | None:  # fmt: skip
    if not linears and not tables:
        return None
    kinds: dict[str, int] = {}
    for t in linears.values():
        key = f"int{t.config.bits} {f'g{t.config.group_size}' if t.config.group_size else 'per-channel'} {t.config.method}"
        kinds[key] = kinds.get(key, 0) + 1
    return QuantSummary(len(linears), kinds, activation, sum(t.nbytes() for p, t in linears.items() if not (once and p in heads)),
                        {p: embedding_kind(t.config) for p, t in tables.items()},
                        sum(t.nbytes() for t in tables.values()), heads, once and bool(heads))  # fmt: skip


def _versions(backend: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"omni_export": omni_export.__version__, "torch": torch.__version__}
    for pkg in dict.fromkeys(("executorch", "onnx", "onnxruntime", backend)):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:  # not installed: the manifest says so by omission
            pass
    return out


def _methods(traced, artifact: Artifact, script, flops: list[int]) -> dict[str, MethodEntry]:  # type: ignore[no-untyped-def]
    """The bundle's methods: I/O from the traced specs, what runs each from the artifact, and
    operations per position counted on the float module's golden calls (the runtime's compute
    roofline reads them)."""
    methods = {name: MethodEntry(tuple(TensorSpec(t.name, t.dtype, t.shape) for t in spec.inputs),
                                 tuple(TensorSpec(t.name, t.dtype, t.shape) for t in spec.outputs), artifact.entries[name],
                                 enumerated=artifact.enumerated.get(name, {}),
                                 **dict(zip(("compute_units", "compute_units_reason"), artifact.compute_units.get(name, ("", "")), strict=True)))
               for name, spec in traced.specs.items()}  # fmt: skip
    per = flops_per_position(script, flops, methods)
    return {m: replace(e, flops_per_position=per.get(m)) for m, e in methods.items()}


def build_bundle(
    profile: Profile,
    model: Path,
    recipe: QuantRecipe,
    out: Path,
    context: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    carry: BuildResult | None = None,
) -> BuildResult:
    """``carry``: the last build, when this one follows a missed gate (see kept_from)."""
    out = Path(out)
    check_context(context)
    check_bundle_out(out, overwrite)
    target = TARGETS.get(profile.target)
    notes: list[str] = []
    float_class = target.float_class_for(profile, recipe)
    if recipe.float_dtype != float_class:
        notes.append(f"tensors the recipe keeps float are {float_class} on the {target.name} target for {profile.name} (the recipe asks {recipe.float_dtype})")
    meter = PhaseMeter()

    def step(component: str, what: str) -> None:
        trim_heap()  # what the last phase freed goes back to the kernel before the next one grows
        meter.mark(component, what)
        if progress:
            progress(component, what)

    start = time.perf_counter()
    step("checkpoint", "loading")
    # As stored (bf16 for released checkpoints) and memory-mapped: each phase below reads one
    # component's weights and hands their pages back, so nothing is held in fp32 whole.
    ckpt = load_checkpoint(model)
    side_files = ckpt.family.asset_files(ckpt)  # a damaged side file (speaker encoder) is refused before any work
    assets = ckpt.family.assets(ckpt)
    recipe, more = recipe_for_target(target, recipe, ckpt.components)
    notes.extend(more)
    # A float recipe plans nothing (and leaves a tied LM head tied: one table in the artifact).
    configs = {} if recipe.is_float else plan(ckpt.components, recipe)
    classes = component_classes(ckpt.components, configs, float_class)
    # What each component's float part (a quantized one's activations, norms and attention) runs in.
    bodies = {name: target.float_class_for(profile, recipe, role_of(m).value) for name, m in ckpt.components.items()}
    for name, module in ckpt.components.items():  # a role the target keeps wider than the rest
        if (own := bodies[name]) == float_class:
            continue
        quantized = classes[name] != float_class  # keeps its class; its float part runs ``own``
        if not quantized:
            classes[name] = own
        what = f"activations and float layers {own}" if quantized else own
        notes.append(f"{name}: {what} on the {target.name} target for {profile.name} ({role_of(module).value}s stay {own} there)")
    quant: QuantResult | None = None
    quant_where = None
    notes.extend(check_plan(target, ckpt.components, configs, profile))  # refuses what it cannot encode, before any work
    kept = kept_from(carry, recipe, ckpt.components) if carry else set()
    entries = read_manifest(carry.bundle).components if carry and kept else {}
    if kept:
        notes.append(f"kept from the build before, which they passed ({', '.join(sorted(kept))}): the new recipe does not change them")
    if configs:
        step("quantize", f"{recipe.name} (calibrating where the recipe asks)")
        quant, quant_where = quantize_checkpoint(ckpt, recipe, lambda what, i, n: step("quantize", what) if i == 1 else None)
    llm_cfg = ckpt.family.llm_config(ckpt.config)
    max_context = min(context or profile.max_context, llm_cfg.max_position_embeddings)
    limits = Limits(max_context=max_context, prefill_chunk=min(Limits.prefill_chunk, max_context),
                    max_tiles=ckpt.config.max_dynamic_patch + 1, tiles_per_call=profile.tiles_per_call)  # fmt: skip
    gctx = Context(ckpt.tokenizer, limits)
    rc = ckpt.family.runtime_config(ckpt)  # read before the loop below frees each component
    settings = target.runtime_settings(profile)
    # Baked into every artifact that can carry it (ExecuTorch constant methods), so a file alone
    # says how to drive it.
    meta = {"omni_max_context": limits.max_context, "omni_prefill_chunk": limits.prefill_chunk,
            "omni_audio_sample_rate": rc["audio_sample_rate"], "omni_output_sample_rate": rc["output_sample_rate"],
            "omni_eos_id": rc["eos_ids"][0], "omni_image_token_id": rc["image_token_id"],
            "omni_audio_token_id": rc["audio_token_id"]}  # fmt: skip
    components: dict[str, ComponentEntry] = {}
    builds: list[ComponentBuild] = []
    unrun: dict[tuple[str, str], list[str]] = {}  # (why, where it runs) -> components whose parity was not run
    with staged_dir(out) as tmp:  # removed if anything below fails or is interrupted
        for name in list(ckpt.components):
            if name in kept:
                step(name, "kept from the build before")
                components[name] = entries[name]
                _take(carry.bundle, tmp, (*entries[name].files, entries[name].golden))  # type: ignore[union-attr]
                builds.append(next(b for b in carry.components if b.name == name))  # type: ignore[union-attr]
                del ckpt.components[name]
                continue
            module = ckpt.components[name]
            t: dict[str, float] = {}
            # The float module is the reference: golden I/O comes before any weight is encoded.
            step(name, "golden I/O")
            t0 = time.perf_counter()
            calls, _, script, flops = make_golden(module, gctx)
            golden = f"golden/{name}.npz"
            write_golden(tmp / golden, calls)
            t["golden_s"] = time.perf_counter() - t0
            step(name, "encoding")
            qtensors = quant.for_component(name) if quant else {}
            tables, qlinears = split_tables(module, qtensors)
            plan_ = target.precision_plan(module, lambda m=module: _replay_fp32(m, limits, script), set(qtensors), bodies[name])
            release_pages(module.state_dict().values())
            t["precision_s"] = time.perf_counter() - t0 - t["golden_s"]
            # tied heads quantized as their table: head path -> table path
            tied = {h: table[len(name) + 1:] for h in qlinears if quant and (table := quant.shares(f"{name}.{h}"))}
            # What stays float is traced in fp32 (the target casts further where it runs fp16);
            # the weights encoding replaces are never widened.
            cast_floats(module, torch.float32, {f"{p}.weight" for p in qtensors})
            swap_tables(module, tables, {table: h for h, table in tied.items()})
            if qlinears:
                target.encode(module, qlinears, quant.floats_for(name))  # type: ignore[union-attr]
            step(name, "tracing")
            t0 = time.perf_counter()
            # An fp32 component keeps an fp32 cache: its gate is the fp32 reference's, exactly.
            kv_profile = profile if classes[name] != "fp32" else None
            with target.trace_context(module, limits, plan_):
                traced = trace_component(name, module, limits, target.kv_mode_for(module, kv_profile))
            t["trace_s"] = time.perf_counter() - t0
            step(name, f"lowering ({target.name})")
            artifact = target.lower(traced, profile, tmp, meta, qlinears)
            notes.extend(artifact.notes)
            # Lowering leaves its graphs in reference cycles: collected before parity loads the
            # runtime, not after (4B LLM: 12.86 GB resident -> 7.25 GB). Once per component: a
            # full collection is slow in a process that holds many objects.
            gc.collect()
            t["lower_s"] = artifact.build_s
            spec = ckpt.specs[name]
            entry = ComponentEntry(
                backend=artifact.backend, files=artifact.files, methods=_methods(traced, artifact, script, flops),
                role=role_of(module).value, precision=classes[name], golden=golden, parity_backend=target.parity_backend or "",
                description=spec.description, kv_cache=traced.kv, quant=_quant_summary(qlinears, tables, target.quant_activation, tied, not target.no_shared_head),
                delegation=artifact.delegation,
            )  # fmt: skip
            components[name] = entry
            step(name, "parity")
            t0 = time.perf_counter()
            th = profile.threshold(classes[name])
            gate = "fp32" if classes[name] == "fp32" else "fp16"
            got, backend, reason = replay_component(entry, tmp, settings, calls)
            if got is None:
                parity = not_run(name, gate, th.__dict__, reason)
                unrun.setdefault((reason, entry.parity_backend or entry.backend), []).append(name)
            else:
                parity = judge(name, calls, got, gate, th.cosine_min, th.top1_min, th.kl_max)
                parity.backend = backend
            t["parity_s"] = time.perf_counter() - t0
            builds.append(ComponentBuild(name, artifact.files, sum((tmp / f).stat().st_size for f in artifact.files), list(traced.specs),
                                         artifact.delegated_share, parity, classes[name], t,
                                         plan_.report() if plan_ is not None else None))  # fmt: skip
            del traced, module, entry, artifact
            del ckpt.components[name]  # its encoded and widened weights go now, not at the end
            release_pages(x for qt in qtensors.values() for x in (qt.q, qt.scale, qt.zero))
            del qtensors, tables, qlinears
        for (reason, runs_on), names in unrun.items():
            notes.append(f"parity not run on this host for {', '.join(names)} ({reason}): these components are not verified; "
                         f"run `omni-export parity BUNDLE` where {runs_on} runs")  # fmt: skip
        step("bundle", "writing")
        notes.extend(target.finish(tmp, profile, components))
        meter.close()  # the report is written with the bundle: its own writing is not in it
        atomic_write_text(tmp / "reports" / "phases.json", json.dumps(meter.to_list(), indent=1))
        if quant is not None:
            atomic_write_text(tmp / "reports" / "quant.json", json.dumps(
                {"recipe": recipe.name, "cache": str(quant_where), "seconds": round(quant.seconds, 2), "layers": quant.layers}, indent=1))
        _finish(tmp, ckpt, side_files, assets, rc, profile, target, settings, recipe, limits, components, builds, notes)
        result = BuildResult(out, profile.name, recipe.name, builds, time.perf_counter() - start, notes, recipe)
        failed = [b for b in builds if b.parity.failures]
        if failed:
            rejected = out.with_name(f"{out.name}.rejected")
            replace_dir(tmp, rejected)
            result.bundle = rejected
            raise ParityGateError(
                f"parity failed for {', '.join(b.name for b in failed)}; the bundle was not published (kept for inspection at {rejected}). "
                f"See which layers cause it: omni-export quant-report --model {model} --quant {recipe.name} --target {profile.name}",
                result,
            )
        replace_dir(tmp, out)
    return result


def _take(src: Path, dst: Path, files: tuple[str, ...]) -> None:
    """Files of a component kept from an earlier bundle: hard links where the file system allows
    (a 4B LLM's 2.4 GB weights are not copied), copies otherwise."""
    for rel in files:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src / rel, dst / rel)
        except OSError:
            shutil.copyfile(src / rel, dst / rel)


def _replay_fp32(module: torch.nn.Module, limits: Limits, script) -> None:  # type: ignore[no-untyped-def]
    """A target's float measurements (TensorRT's fp16 plan) watch the fp32 reference."""
    with computing_in(module, torch.float32):
        replay(module, limits, script, CALLS_PER_METHOD)


def _finish(tmp: Path, ckpt, side_files: dict[str, Path], assets_np: dict[str, np.ndarray], model_cfg: dict[str, Any], profile: Profile,  # type: ignore[no-untyped-def]
            target, settings: RuntimeSettings, recipe: QuantRecipe, limits: Limits, components: dict[str, ComponentEntry],
            builds: list[ComponentBuild], notes: list[str]) -> None:  # fmt: skip
    tok = tmp / "tokenizer"
    tok.mkdir()
    for fname in ("tokenizer.json", "tokenizer_config.json"):
        if (ckpt.root / fname).is_file():
            shutil.copyfile(ckpt.root / fname, tok / fname)
    assets = {}
    for key, arr in assets_np.items():
        (tmp / "assets").mkdir(exist_ok=True)
        np.save(tmp / "assets" / f"{key}.npy", arr)
        assets[key] = f"assets/{key}.npy"
    asset_files = {}
    for key, src in side_files.items():
        (tmp / "assets").mkdir(exist_ok=True)
        shutil.copyfile(src, tmp / "assets" / src.name)
        asset_files[key] = f"assets/{src.name}"
    parity = [b.parity.to_dict() for b in builds]
    atomic_write_text(tmp / "reports" / "parity.json", json.dumps(parity, indent=2))
    build = [{"component": b.name, "files": list(b.files), "bytes": b.bytes, "methods": b.methods, "precision": b.precision,
              "delegated_share": b.delegated_share, **{k: round(v, 3) for k, v in b.seconds.items()},
              **({"fp32_layers": b.precision_layers} if b.precision_layers is not None else {})} for b in builds]  # fmt: skip
    atomic_write_text(tmp / "reports" / "build.json", json.dumps({"components": build, "notes": notes}, indent=2))
    model_cfg["assets"] = assets
    model_cfg["image"]["tiles_per_call"] = limits.tiles_per_call
    model_cfg["asset_files"] = asset_files
    model_cfg["max_context"] = limits.max_context
    model_cfg["prefill_chunk"] = limits.prefill_chunk
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        toolchain=_versions(target.backend),
        family=ckpt.family.name,
        source=Source(str(ckpt.root), ckpt.fingerprint()),
        profile=ProfileEntry(profile.name, profile.target, profile.description, limits.max_context, profile.bandwidth_gbs, settings),
        quant=QuantEntry(recipe.name, target.float_class_for(profile, recipe),
                         tuple(RuleEntry(r.pattern, r.roles, None if r.config is None else asdict(r.config)) for r in recipe.rules),
                         None if recipe.embeddings is None else asdict(recipe.embeddings)),
        model=model_cfg,
        components=components,
        files={},
    )  # fmt: skip
    write_schema(tmp)
    atomic_write_text(tmp / "README.md", render(manifest, parity, tmp))
    files = {p.relative_to(tmp).as_posix(): file_entry(p) for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != MANIFEST}
    write_manifest(tmp, manifest.replace(files=files))
