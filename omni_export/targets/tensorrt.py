"""TensorRT for Jetson and desktop NVIDIA GPUs (profiles jetson-orin-nano, jetson-agx-orin,
jetson-thor, rtx-4090).

TensorRT engines belong to the GPU and the TensorRT version that build them, so the bundle
carries what builds them on the device, not engines:

- one ONNX graph per method (prefill and decode: one ``step`` graph with the KV cache as explicit
  inputs and outputs), written for a *strongly typed* network: the graph's dtypes are the
  precision. The body is fp16, layers measured to need fp32 run in fp32 behind Cast pairs
  (targets/precision.py), method inputs and outputs stay fp32 and the KV cache is fp16.
  Quantized linears are ``DequantizeLinear`` over the QuantResult's integers (int4 block-wise,
  int8 per channel) with fp16 scales, feeding fp16 GEMMs (weight-only quantization).
- every graph is checked against TensorRT's ONNX operator table before it is written
  (targets/tensorrt_ops.py), so an op TensorRT cannot parse fails here, naming the node;
- a build plan (``tensorrt/build_plan.json``: optimization profiles from the traced dimension
  ranges, workspace, the device's SM) and ``tensorrt/build_engines.py``, which builds every
  engine with TensorRT's Python API on the device (``omni-export build-engines`` runs the same
  code, records the engines in the manifest and checks their parity).

On a host without TensorRT the exact graphs run in ONNX Runtime for parity."""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

from omni_export.bundle.manifest import RuntimeSettings
from omni_export.bundle.readme import LOADING
from omni_export.profiles import MIN_SM, sm_number
from omni_export.quantize.engine import plan
from omni_export.quantize.recipe import Activation, QuantConfig, QuantRule
from omni_export.targets.base import TARGETS, Artifact, LoweringError, QuantEncodingError, Target, apply_floats
from omni_export.targets.onnx_lowering import GraphSet, onnx_forms, swap_quantized, to_onnx
from omni_export.targets.precision import fp16_forms, measure_fp16
from omni_export.targets.tensorrt_ops import check_graph

ARTIFACTS = "artifacts"
PLAN_DIR = "tensorrt"
PLAN = f"{PLAN_DIR}/build_plan.json"
SCRIPT = f"{PLAN_DIR}/build_engines.py"
ENGINES = "engines"
COMPONENT_PLAN = "tensorrt.json"  # per component, beside its graphs

# TensorRT's block-wise DequantizeLinear (INT4 weight-only): 2-D weights blocked along the input
# axis, in blocks of 64 or 128 (NVIDIA's quantized types documentation; ModelOpt exports 128).
INT4_BLOCKS = (64, 128)
INT4_BLOCK = 64  # what presets use here: the finer of the two, nearest the other targets' 32


def components_width(components, fqn: str) -> int:  # type: ignore[no-untyped-def]
    name, _, path = fqn.partition(".")
    return components[name].get_submodule(path).in_features


def needs(configs: dict[str, Any]) -> dict[str, list[str]]:
    """Precision -> the weights that need it (what stays float is fp16 on this target)."""
    out: dict[str, list[str]] = {"fp16": ["(tensors left float)"]}
    for path, cfg in configs.items():
        out.setdefault(f"int{cfg.bits}", []).append(path)
    return out


def check_hardware(profile, configs: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    """Refuse, before any work, a recipe that asks for a precision the profile's GPU does not
    have (by SM) or the profile does not enable (``precision_flags``)."""
    s = profile.tensorrt
    sm = sm_number(s.sm_arch)
    for precision, who in needs(configs).items():
        if sm < MIN_SM.get(precision, 0):
            raise QuantEncodingError(f"{profile.name} ({profile.description}, {s.sm_arch}) has no {precision} "
                                     f"(it needs SM {MIN_SM[precision] / 10:.1f} or newer), which {who[0]}"
                                     f"{f' and {len(who) - 1} more' if len(who) > 1 else ''} would use; choose a preset without it")  # fmt: skip
        if precision not in ("fp32", "fp16", "int4") and precision not in s.precision_flags:
            raise QuantEncodingError(f"profile {profile.name} does not enable {precision} (precision_flags {list(s.precision_flags)})")


class TensorRTTarget(Target):
    name = "tensorrt"
    backend = "tensorrt"
    parity_backend = "onnxruntime"  # the exact graphs TensorRT parses, on the build host
    kv_mode = "io"
    float_class = "fp16"
    # TensorRT types integer tensors as quantized, for its dequantize layers; a gather over an
    # int8 constant cast to float could not be built or checked here (no TensorRT on this host).
    no_tables = "an int8 table gathered outside a DequantizeLinear is not a form checked against TensorRT"
    quant_activation = ("fp16 (weight-only: int4 block-wise / int8 per-channel DequantizeLinear into fp16 GEMMs); w8a8: int8 "
                        "activations, static per-tensor scales from calibration (QuantizeLinear/DequantizeLinear)")

    def runtime_settings(self, profile) -> RuntimeSettings:  # type: ignore[no-untyped-def]
        # The golden replay on the build host runs the graphs on ONNX Runtime's CPU provider; the
        # device's own settings (workspace, profiles) are in the build plan.
        return RuntimeSettings(providers=("CPUExecutionProvider",))

    def check_quant(self, configs, profile=None):  # type: ignore[no-untyped-def]
        if profile is not None:
            check_hardware(profile, configs)
        acts = [p for p, c in configs.items() if c.activation != Activation.NONE.value]
        for path, c in configs.items():
            if c.bits == 4 and c.group_size not in INT4_BLOCKS:
                raise QuantEncodingError(f"{path}: TensorRT's int4 weights are block-wise with blocks of {INT4_BLOCKS}, "
                                         f"not {c.group_size or 'per channel'}; set group_size in the recipe")  # fmt: skip
            if c.bits == 8 and c.group_size:
                raise QuantEncodingError(f"{path}: TensorRT's int8 weights are per channel; set group_size = 0 for 8-bit rules")
            if not c.symmetric:
                raise QuantEncodingError(f"{path}: TensorRT's weight DequantizeLinear takes no zero point; use symmetric quantization")
            if c.bits not in (4, 8):
                raise QuantEncodingError(f"{path}: TensorRT encodes 4- and 8-bit weights, not {c.bits}-bit")
            if c.activation != Activation.NONE.value and c.bits != 8:
                raise QuantEncodingError(f"{path}: TensorRT quantizes activations only with int8 weights (w8a8), not int{c.bits}")
        notes = [f"{self.name}: weight-only linears dequantize int4/int8 codes into fp16 GEMMs"] if len(acts) < len(configs) else []
        if acts:
            notes.append(f"{self.name}: {len(acts)} linear(s) quantize activations to int8 with static per-tensor scales from "
                         "calibration (absmax / 127; int8_dynamic in a recipe means this here: TensorRT has no dynamic int8)")  # fmt: skip
        return notes

    def adapt_recipe(self, recipe, components):  # type: ignore[no-untyped-def]
        """int4 presets use blocks of 32, which TensorRT's int4 kernels do not take: here they
        use INT4_BLOCK, and a linear whose input width that does not divide is int8 per channel
        (an exact-path rule ahead of the preset's, so the recipe says what was done)."""
        if recipe.is_float:
            return recipe, []
        configs = plan(components, recipe)
        blocked = [p for p, c in configs.items() if c.bits == 4 and c.group_size not in INT4_BLOCKS]
        if not blocked:
            return recipe, []
        narrow = sorted(p for p in blocked if components_width(components, p) % INT4_BLOCK)
        rules = [QuantRule(f"^{re.escape(p)}$", QuantConfig(bits=8)) for p in narrow]
        for r in recipe.rules:
            c = r.config
            if c is not None and c.bits == 4 and c.group_size not in INT4_BLOCKS:
                c = replace(c, group_size=INT4_BLOCK)
            rules.append(replace(r, config=c))
        note = (f"{self.name}: preset {recipe.name} uses int4 blocks of {INT4_BLOCK} here (TensorRT's int4 weight blocks are "
                f"{' or '.join(map(str, INT4_BLOCKS))})")  # fmt: skip
        if narrow:
            note += f"; {len(narrow)} linear(s) whose input width {INT4_BLOCK} does not divide are int8 per channel ({', '.join(narrow[:3])}{' ...' if len(narrow) > 3 else ''})"
        return replace(recipe, rules=tuple(rules)), [note]

    def precision_plan(self, module, run_script, skip, precision):  # type: ignore[no-untyped-def]
        return measure_fp16(module, run_script, skip)

    def trace_context(self, module, limits, plan=None):  # type: ignore[no-untyped-def]
        return fp16_forms(module, plan, onnx_forms)

    def encode(self, module, tensors, floats) -> None:  # type: ignore[no-untyped-def]
        apply_floats(module, floats)
        swap_quantized(module, tensors)

    def lower(self, traced, profile, root: Path, metadata: dict[str, Any], quant) -> Artifact:  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        models, encoded, graphs = {}, 0, {}
        rel = f"{ARTIFACTS}/{traced.name}"
        for name, program in traced.programs.items():
            spec = traced.program_specs[name]
            models[name], n = to_onnx(program, spec, quant, activations=True)
            encoded += n
            check_graph(models[name], traced.name, name)
            graphs[name] = {"onnx": f"{rel}/{name}.onnx", "engine": f"{ENGINES}/{traced.name}/{name}.engine",
                            "profiles": profiles_for(program, spec, traced.kv is not None and spec.cached)}  # fmt: skip
        if encoded != len(quant):
            raise LoweringError(f"{traced.name}: {encoded} of {len(quant)} quantized weights reached its ONNX graphs")
        names = GraphSet(root / rel, f"{traced.name}.onnx.data").save(models)
        plan_file = root / rel / COMPONENT_PLAN
        plan_file.write_text(json.dumps({"component": traced.name, "graphs": graphs}, indent=1))
        files = (*(f"{rel}/{n}" for n in names), f"{rel}/{COMPONENT_PLAN}")
        entries = {method: f"{rel}/{program}.onnx" for method, program in traced.aliases.items()}
        return Artifact(traced.name, files, entries, self.backend, {}, time.perf_counter() - start)

    def finish(self, root: Path, profile, components: dict) -> list[str]:  # type: ignore[no-untyped-def]
        """The bundle's build plan (every component's engines, the device's settings) and the
        script that carries it out on the device."""
        s = profile.tensorrt
        engines = []
        for name, entry in components.items():
            plan_rel = next(f for f in entry.files if f.endswith(COMPONENT_PLAN))
            for graph, g in json.loads((root / plan_rel).read_text())["graphs"].items():
                engines.append({"component": name, "graph": graph, **g})
        plan = {
            "device": profile.name, "description": profile.description, "sm_arch": s.sm_arch,
            "precision_flags": list(s.precision_flags), "workspace_mb": s.workspace_mb, "strongly_typed": True,
            "min_tensorrt": MIN_TENSORRT, "engines": engines,
        }  # fmt: skip
        (root / PLAN_DIR).mkdir(exist_ok=True)
        (root / PLAN).write_text(json.dumps(plan, indent=1))
        shutil.copyfile(str(resources.files("omni_export.targets").joinpath("tensorrt_build.py")), root / SCRIPT)
        return [f"{self.name}: engines are built on the device: python {SCRIPT} (or omni-export build-engines BUNDLE)"]


MIN_TENSORRT = "10.3"  # block-wise INT4 DequantizeLinear, strongly typed ONNX parsing (JetPack 6.1 ships 10.3)


def _range(dim, constraints) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    if isinstance(dim, int):
        return dim, dim
    expr = dim.node.expr
    lo = {s: constraints[s].lower for s in expr.free_symbols}
    hi = {s: constraints[s].upper for s in expr.free_symbols}
    low, high = expr.subs(lo), expr.subs(hi)
    if not (low.is_number and high.is_number) or not high.is_finite:
        raise LoweringError(f"dimension {expr} has no finite range; TensorRT's optimization profiles need one")
    return int(low), int(high)


def profiles_for(program, spec, cached: bool) -> list[dict]:  # type: ignore[no-untyped-def]
    """Optimization profiles for one graph: min / opt / max of every input from the traced
    ranges. A cached step gets two: ``decode`` (one token, the past anywhere in the context) and
    ``prefill`` (a chunk of tokens); other graphs one, tuned for their largest input."""
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in set(program.graph_signature.user_inputs)]
    ranges: dict[str, list[tuple[int, int]]] = {}
    names: dict[str, list[int | str]] = {}
    for t, node in zip(spec.inputs, placeholders, strict=True):
        ranges[t.name] = [_range(d, program.range_constraints) for d in node.meta["val"].shape]
        names[t.name] = list(t.shape)

    def pick(which: str) -> dict[str, dict[str, list[int]]]:
        shapes = {}
        for inp, dims in ranges.items():
            lo, opt, hi = [], [], []
            for (a, b), label in zip(dims, names[inp], strict=True):
                if which == "decode" and label == "tokens":
                    a = b = 1
                o = b
                if which == "decode" and isinstance(label, str) and label.startswith("past"):
                    o = (a + b) // 2
                if which == "prefill" and isinstance(label, str) and label.startswith("past"):
                    o = a
                lo.append(a), opt.append(o), hi.append(b)
            shapes[inp] = {"min": lo, "opt": opt, "max": hi}
        return shapes

    if cached:
        return [{"name": "decode", "shapes": pick("decode")}, {"name": "prefill", "shapes": pick("prefill")}]
    return [{"name": "default", "shapes": pick("default")}]


TARGETS.register(TensorRTTarget.name, TensorRTTarget())


def _shape_spec(shapes: dict[str, dict[str, list[int]]], which: str) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, s[which])) if s[which] else 'scalar'}" for name, s in shapes.items())


def trtexec_lines(plan: dict) -> list[str]:
    """The ``trtexec`` command per engine that ``build_engines.py`` is equivalent to (each
    optimization profile is one more set of shape flags)."""
    lines = []
    for e in plan["engines"]:
        shapes = " ".join(f"--minShapes={_shape_spec(p['shapes'], 'min')} --optShapes={_shape_spec(p['shapes'], 'opt')} "
                          f"--maxShapes={_shape_spec(p['shapes'], 'max')}" for p in e["profiles"] if p["shapes"])  # fmt: skip
        lines.append(f"mkdir -p {e['engine'].rpartition('/')[0]} && trtexec --onnx={e['onnx']} --saveEngine={e['engine']} --stronglyTyped --memPoolSize=workspace:{plan['workspace_mb']}M "
                     f"--timingCacheFile=timing.cache --skipInference {shapes}".rstrip())  # fmt: skip
    return lines


@LOADING.decorator("tensorrt")
def _loading(m, root: Path | None = None) -> list[str]:  # type: ignore[no-untyped-def]
    plan = json.loads((root / PLAN).read_text()) if root is not None and (root / PLAN).is_file() else None
    kv = next((c.kv_cache for c in m.components.values() if c.kv_cache is not None), None)
    lines = [
        "## Loading (TensorRT)",
        "",
        "Engines are specific to the GPU and the TensorRT version that build them, so this bundle ships the ONNX graphs "
        f"and a build plan, and the engines are built on the device (TensorRT {MIN_TENSORRT} or newer; JetPack 6.1 ships 10.3):",
        "",
        "```sh",
        f"python {SCRIPT}            # every engine, a progress line each; records them in manifest.json",
        "omni-export build-engines .     # the same, then parity of the engines against golden/",
        "omni-export verify .            # checks the engines' sha256 like every other file",
        "```",
        "",
        "Networks are strongly typed: the graphs' dtypes are the precision (fp16 body; layers measured to need fp32 run in "
        "fp32, listed under `fp32_layers` in `reports/build.json`; int4/int8 weights are `DequantizeLinear` with fp16 "
        "scales feeding fp16 GEMMs). Set no precision flags. Method inputs and outputs are fp32.",
    ]
    if kv is not None:
        lines += ["", f"Decoder steps (`step`: prefill and decode) take the KV cache explicitly: `past_key_0`, `past_value_0`, ... "
                  f"({2 * kv.layers} {kv.dtype} tensors [1, {kv.kv_heads}, positions, {kv.head_dim}], starting at 0 positions) after "
                  "the method's inputs, and return `present_*` (past + this call's positions) after its outputs. Keep them on the GPU: "
                  "write each present into a second buffer and swap. The engine has two optimization profiles, `decode` (one token) "
                  "and `prefill` (a chunk); use one execution context per profile."]  # fmt: skip
    if plan is not None:
        lines += ["", f"The equivalent `trtexec` lines (workspace {plan['workspace_mb']} MiB for {plan['device']}, {plan['sm_arch']}):", "",
                  "```sh", *trtexec_lines(plan), f"python {SCRIPT} --record   # so verify and the runtime know them", "```"]  # fmt: skip
    return [*lines, ""]
