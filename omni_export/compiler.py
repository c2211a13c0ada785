"""The main job: load -> trace -> lower -> golden -> parity -> bundle, one component at a time,
with a progress callback per step. The bundle is assembled in a hidden directory beside ``out``
and renamed into place only when it is whole and every component passed parity."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import omni_export
from omni_export.bundle.golden import write_golden
from omni_export.bundle.manifest import MANIFEST, SCHEMA_VERSION, file_entry
from omni_export.bundle.readme import render
from omni_export.errors import OmniExportError
from omni_export.export.checkpoint import load_checkpoint
from omni_export.export.components.qwen import QwenModel
from omni_export.export.golden import Context, flops_per_position, make_golden
from omni_export.export.trace import prepare, trace_component
from omni_export.export.trace_specs import Limits
from omni_export.files import atomic_write_text, replace_dir
from omni_export.profiles import Profile
from omni_export.quantize.cache import quantize_checkpoint
from omni_export.quantize.engine import plan
from omni_export.quantize.recipe import QuantRecipe
from omni_export.quantize.result import QTensor, QuantResult
from omni_export.runtime_py.backends import open_session
from omni_export.runtime_py.parity import ComponentParity, judge, replay
from omni_export.targets import TARGETS

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
    file: str
    bytes: int
    methods: list[str]
    delegated_share: float
    parity: ComponentParity
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class BuildResult:
    bundle: Path
    profile: str
    precision: str
    components: list[ComponentBuild]
    seconds: float
    notes: list[str] = field(default_factory=list)


def _kv_layout(module: torch.nn.Module, layout: str) -> dict[str, Any] | None:
    stacks = [m for m in module.modules() if isinstance(m, QwenModel) and m.cache_len]
    if not stacks:
        return None
    c = stacks[0].cfg
    return {"layers": c.num_hidden_layers, "kv_heads": c.num_key_value_heads, "head_dim": c.head_dim,
            "max_len": stacks[0].cache_len, "dtype": "float32", "held_as": "mutable_buffers",
            "layout": layout}  # fmt: skip


def _quant_summary(tensors: dict[str, QTensor], activation: str) -> dict[str, Any] | None:
    if not tensors:
        return None
    kinds: dict[str, int] = {}
    for t in tensors.values():
        key = f"int{t.config.bits} {f'g{t.config.group_size}' if t.config.group_size else 'per-channel'} {t.config.method}"
        kinds[key] = kinds.get(key, 0) + 1
    return {"linears": len(tensors), "kinds": kinds, "activations": activation,
            "weight_bytes": sum(t.nbytes() for t in tensors.values())}  # fmt: skip


def _versions() -> dict[str, str]:
    out = {"omni_export": omni_export.__version__, "torch": torch.__version__}
    try:
        from importlib.metadata import version

        out["executorch"] = version("executorch")
    except Exception:  # not installed: the manifest says so by omission
        pass
    return out


def build_bundle(
    profile: Profile,
    model: Path,
    recipe: QuantRecipe,
    out: Path,
    context: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> BuildResult:
    out = Path(out)
    if out.exists() and not overwrite:
        raise OmniExportError(f"{out} already exists; remove it or pass --overwrite.")
    notes: list[str] = []
    precision = recipe.name
    if recipe.is_float and recipe.float_dtype != "fp32":
        notes.append(f"{recipe.float_dtype} lowering is not implemented yet: lowered at fp32; the manifest says fp32")
        precision = "fp32"
    elif not recipe.is_float and recipe.float_dtype != "fp32":
        notes.append(f"unquantized tensors stay fp32 on this target (recipe asks {recipe.float_dtype})")
    target = TARGETS.get(profile.target)
    step = progress or (lambda c, s: None)
    start = time.perf_counter()
    step("checkpoint", "loading")
    ckpt = load_checkpoint(model, dtype=torch.float32)
    quant: QuantResult | None = None
    quant_where = None
    if not recipe.is_float:
        notes.extend(target.check_quant(plan(ckpt.components, recipe)))
        step("quantize", f"{recipe.name} (calibrating where the recipe asks)")
        quant, quant_where = quantize_checkpoint(ckpt, recipe, lambda what, i, n: step("quantize", what) if i == n else None)
    llm_cfg = ckpt.family.llm_config(ckpt.config)
    max_context = min(context or profile.max_context, llm_cfg.max_position_embeddings)
    limits = Limits(max_context=max_context, prefill_chunk=min(Limits.prefill_chunk, max_context),
                    max_tiles=ckpt.config.max_dynamic_patch + 1)  # fmt: skip
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    gctx = Context(ckpt.tokenizer, limits)
    rc = ckpt.family.runtime_config(ckpt)
    # Baked into every artifact as constant methods, so a .pte alone says how to drive it.
    meta = {"omni_max_context": limits.max_context, "omni_prefill_chunk": limits.prefill_chunk,
            "omni_audio_sample_rate": rc["audio_sample_rate"], "omni_output_sample_rate": rc["output_sample_rate"],
            "omni_eos_id": rc["eos_ids"][0], "omni_image_token_id": rc["image_token_id"],
            "omni_audio_token_id": rc["audio_token_id"]}  # fmt: skip
    components: dict[str, Any] = {}
    builds: list[ComponentBuild] = []
    try:
        for name, module in ckpt.components.items():
            t: dict[str, float] = {}
            # The float module is the reference: golden I/O comes before any weight is encoded.
            step(name, "golden I/O")
            t0 = time.perf_counter()
            calls, io, script, flops = make_golden(module, gctx)
            write_golden(tmp / "golden" / f"{name}.npz", calls)
            t["golden_s"] = time.perf_counter() - t0
            qtensors = quant.for_component(name) if quant else {}
            if qtensors:
                target.encode(module, qtensors, quant.floats_for(name))  # type: ignore[union-attr]
            step(name, "tracing")
            t0 = time.perf_counter()
            prepare(module, limits)
            with target.trace_context(module, limits):
                traced = trace_component(name, module, limits)
            t["trace_s"] = time.perf_counter() - t0
            step(name, f"lowering ({target.name})")
            artifact = target.lower(traced, profile, tmp, meta)
            t["lower_s"] = artifact.build_s
            step(name, "parity")
            t0 = time.perf_counter()
            session = open_session(target.backend, tmp / artifact.file)
            got = replay(session, calls, lambda meth: io[meth])
            th = profile.threshold(precision)
            gate = "fp32" if precision == "fp32" else "fp16"
            parity = judge(name, calls, got, gate, th.cosine_min, th.top1_min, th.kl_max)
            t["parity_s"] = time.perf_counter() - t0
            spec = ckpt.specs[name]
            components[name] = {
                "file": artifact.file, "backend": artifact.backend, "description": spec.description,
                "methods": _with_flops({s.name: s.manifest() for s in traced.specs.values()}, script, flops),
                "kv_cache": _kv_layout(module, target.kv_layout()), "golden": f"golden/{name}.npz", "precision": precision if qtensors else "fp32",
                "quant": _quant_summary(qtensors, target.quant_activation),
                "delegation": {m: {"delegated_nodes": d.delegated_nodes, "portable_nodes": d.portable_nodes, "subgraphs": d.subgraphs,
                                   "share": round(d.share, 4), "portable_ops": d.fallback_ops} for m, d in artifact.delegation.items()},
            }  # fmt: skip
            builds.append(ComponentBuild(name, artifact.file, (tmp / artifact.file).stat().st_size, list(traced.specs),
                                         artifact.delegated_share, parity, t))  # fmt: skip
            del traced, session
        step("bundle", "writing")
        if quant is not None:
            atomic_write_text(tmp / "reports" / "quant.json", json.dumps(
                {"recipe": recipe.name, "cache": str(quant_where), "seconds": round(quant.seconds, 2), "layers": quant.layers}, indent=1))
        _finish(tmp, ckpt, profile, recipe, precision, limits, components, builds, notes)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = BuildResult(out, profile.name, precision, builds, time.perf_counter() - start, notes)
    failed = [b for b in builds if not b.parity.passed]
    if failed:
        rejected = out.with_name(f"{out.name}.rejected")
        shutil.rmtree(rejected, ignore_errors=True)
        os.replace(tmp, rejected)
        result.bundle = rejected
        raise ParityGateError(
            f"parity failed for {', '.join(b.name for b in failed)}; the bundle was not published (kept for inspection at {rejected})",
            result,
        )
    replace_dir(tmp, out)
    return result


def _finish(tmp: Path, ckpt, profile: Profile, recipe: QuantRecipe, precision: str, limits: Limits,  # type: ignore[no-untyped-def]
            components: dict[str, Any], builds: list[ComponentBuild], notes: list[str]) -> None:  # fmt: skip
    tok = tmp / "tokenizer"
    tok.mkdir()
    for fname in ("tokenizer.json", "tokenizer_config.json"):
        if (ckpt.root / fname).is_file():
            shutil.copyfile(ckpt.root / fname, tok / fname)
    assets = {}
    for key, arr in ckpt.family.assets(ckpt).items():
        (tmp / "assets").mkdir(exist_ok=True)
        np.save(tmp / "assets" / f"{key}.npy", arr)
        assets[key] = f"assets/{key}.npy"
    parity = [b.parity.to_dict() for b in builds]
    atomic_write_text(tmp / "reports" / "parity.json", json.dumps(parity, indent=2))
    build = [{"component": b.name, "file": b.file, "bytes": b.bytes, "methods": b.methods,
              "delegated_share": b.delegated_share, **{k: round(v, 3) for k, v in b.seconds.items()}} for b in builds]  # fmt: skip
    atomic_write_text(tmp / "reports" / "build.json", json.dumps({"components": build, "notes": notes}, indent=2))
    model_cfg = ckpt.family.runtime_config(ckpt)
    model_cfg["assets"] = assets
    model_cfg["max_context"] = limits.max_context
    model_cfg["prefill_chunk"] = limits.prefill_chunk
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "toolchain": _versions(),
        "family": ckpt.family.name,
        "source": {"path": str(ckpt.root), "fingerprint": ckpt.fingerprint()},
        "profile": {"name": profile.name, "target": profile.target, "description": profile.description,
                    "max_context": limits.max_context, "bandwidth_gbs": profile.bandwidth_gbs},
        "quant": {"preset": precision, "requested": recipe.name, "float_dtype": "fp32",
                  "rules": [{"pattern": r.pattern, "config": None if r.config is None else r.config.__dict__} for r in recipe.rules]},
        "model": model_cfg,
        "components": components,
        "files": {},
    }  # fmt: skip
    atomic_write_text(tmp / "README.md", render(manifest, parity))
    manifest["files"] = {
        p.relative_to(tmp).as_posix(): file_entry(p) for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != MANIFEST
    }
    atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2))


def _with_flops(methods: dict[str, dict], script, flops: list[int]) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    """Each method's operations per position, counted on the float module's golden calls: the
    runtime's compute roofline reads it from the manifest."""
    per = flops_per_position(script, flops, methods)
    return {m: {**spec, "flops_per_position": per[m]} if m in per else spec for m, spec in methods.items()}
