"""Compute a QuantResult for a checkpoint's components under a recipe.

Decoder stacks of an LLM are quantized layer by layer (GPTQ's sequential order: each layer is
calibrated on the outputs of the already-quantized layers before it), holding one layer in fp32
at a time, so a 4B/8B checkpoint memory-mapped in bf16 quantizes in a few GB. Every other
component is calibrated in one pass with hooks on its linears. Round-to-nearest needs no
calibration at all."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from omni_export.errors import ConfigError
from omni_export.export.components.base import role_of
from omni_export.export.components.layers import RMSNorm, rope_cos_sin
from omni_export.export.components.qwen import QwenDecoderLayer, QwenForCausalLM
from omni_export.export.safetensors_io import release_pages
from omni_export.export.widen import computing_in, widened
from omni_export.quantize import awq
from omni_export.quantize.calibrate import Calibration, Sources, calibration_for
from omni_export.quantize.gptq import gptq
from omni_export.quantize.recipe import Activation, Method, QuantConfig, QuantRecipe, precision_class
from omni_export.quantize.result import QTensor, QuantResult
from omni_export.quantize.rtn import rtn, weight_error

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]  # (what, done, total)
MAX_ROWS = 512  # activation rows kept per linear for AWQ's searches and the damage report


def weighted_modules(components: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """``component.module_path`` of every module that owns a weight: what recipe rules match."""
    out = {}
    for cname, module in components.items():
        for path, m in module.named_modules():
            if isinstance(getattr(m, "weight", None), torch.Tensor):
                out[f"{cname}.{path}" if path else cname] = m
    return out


def weight_roles(components: dict[str, nn.Module], mods: dict[str, nn.Module] | None = None) -> dict[str, str]:
    """Each weighted module's path and its component's role: the pairs recipe rules are checked against."""
    mods = weighted_modules(components) if mods is None else mods
    return {fqn: role_of(components[fqn.split(".", 1)[0]]).value for fqn in mods}


def untie_heads(components: dict[str, nn.Module]) -> None:
    """A quantized tied head is its own (quantized) copy; the embedding table stays float."""
    for module in components.values():
        if isinstance(module, QwenForCausalLM):
            module.untie_head()


def _tied(components: dict[str, nn.Module]) -> Iterator[tuple[nn.Module, str, str]]:
    """(component, head fqn, table fqn) of every stack whose checkpoint ties its head to its table."""
    for cname, module in components.items():
        if isinstance(module, QwenForCausalLM) and module.cfg.tie_word_embeddings:
            yield module, f"{cname}.lm_head", f"{cname}.model.embed_tokens"


def tied_pairs(components: dict[str, nn.Module], recipe: QuantRecipe) -> dict[str, str]:
    """Heads the recipe quantizes as their tied table (``tied_head = "table"``, the table
    quantized): head fqn -> table fqn. They get the table's codes and scales, one set."""
    if recipe.tied_head != "table" or recipe.embeddings is None:
        return {}
    return {head: table for module, head, table in _tied(components) if recipe.embedding_config(role_of(module).value)}


def shared_heads(components: dict[str, nn.Module], configs: dict[str, QuantConfig]) -> dict[str, str]:
    """Of a plan's tied heads, those quantized as their table (the table's config)."""
    return {head: table for _, head, table in _tied(components) if table in configs and configs.get(head) == configs[table]}


def config_of(recipe: QuantRecipe, fqn: str, role: str | None, module: nn.Module) -> QuantConfig | None:
    """What the recipe does to one weighted module: linears by its rules, decoders' embedding
    tables by its ``embeddings`` config; anything else stays float."""
    if isinstance(module, nn.Linear):
        return recipe.config_for(fqn, role)
    if isinstance(module, nn.Embedding):
        return recipe.embedding_config(role)
    return None


def is_table(module: nn.Module, path: str) -> bool:
    """Whether ``path`` in ``module`` is an embedding table (quantized by the recipe's ``embeddings``)."""
    return isinstance(module.get_submodule(path), nn.Embedding)


def is_embedding(components: dict[str, nn.Module], fqn: str) -> bool:
    cname, _, path = fqn.partition(".")
    return is_table(components[cname], path)


def plan(components: dict[str, nn.Module], recipe: QuantRecipe) -> dict[str, QuantConfig]:
    """The linears to quantize and how; every recipe error is raised here, before any work."""
    untie_heads(components)
    mods = weighted_modules(components)
    roles = weight_roles(components, mods)
    recipe.check_matches(roles.items())
    chosen: dict[str, QuantConfig] = {}
    bad = []
    for fqn, m in mods.items():
        cfg = config_of(recipe, fqn, roles[fqn], m)
        if cfg is None:
            continue
        width = m.weight.shape[1]
        if cfg.group_size and width % cfg.group_size:
            bad.append(f"{fqn} ({width} inputs)")
        chosen[fqn] = cfg
    if bad:
        raise ConfigError(
            f"recipe {recipe.name!r}: group size does not divide the input width of {', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}; choose a group size that divides it or 0 (per channel)"
        )
    for head, table in tied_pairs(components, recipe).items():
        chosen[head] = chosen[table]
    return chosen


@dataclass
class Stats:
    """Inputs seen by one linear: X^T X for GPTQ, a sample of rows for AWQ and the report."""

    gram: torch.Tensor | None = None
    rows: list[torch.Tensor] = field(default_factory=list)
    n_rows: int = 0
    absmax: float = 0.0  # over every row seen: a static activation scale's range

    def add(self, x: torch.Tensor, want_gram: bool) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if x.numel():
            self.absmax = max(self.absmax, float(x.abs().max()))
        if want_gram:
            self.gram = x.T @ x if self.gram is None else self.gram.addmm_(x.T, x)
        kept = sum(r.shape[0] for r in self.rows)
        if kept < MAX_ROWS:
            stride = max(1, x.shape[0] // (MAX_ROWS - kept))
            self.rows.append(x[::stride][: MAX_ROWS - kept])
        self.n_rows += x.shape[0]

    def sample(self) -> torch.Tensor | None:
        return torch.cat(self.rows) if self.rows else None


@contextmanager
def watching(linears: dict[str, nn.Linear], cfgs: dict[str, QuantConfig]) -> Iterator[dict[str, Stats]]:
    stats = {name: Stats() for name in linears}
    handles = [
        lin.register_forward_pre_hook(
            lambda _m, args, n=name: stats[n].add(args[0], cfgs[n].method == Method.GPTQ.value)
        )
        for name, lin in linears.items()
    ]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def _quantize_one(w: torch.Tensor, cfg: QuantConfig, st: Stats | None, scale: torch.Tensor | None = None) -> tuple[QTensor, dict]:
    """``scale``: an AWQ input scale already folded upstream (w is multiplied by it here)."""
    x = st.sample() if st else None
    if scale is not None:
        w = w * scale
        x = x / scale if x is not None else None
    if cfg.method == Method.GPTQ.value and st is not None and st.gram is not None:
        h = st.gram if scale is None else st.gram / scale[:, None] / scale[None, :]
        qt = gptq(w, h, cfg)
    elif cfg.method == Method.AWQ.value and x is not None:
        qt = rtn(w, cfg, awq.search_clip(x, w, cfg))
    else:
        qt = rtn(w, cfg)
    info = {"method": cfg.method, "bits": cfg.bits, "group_size": cfg.group_size, "weight_rel_err": round(weight_error(w, qt), 6)}
    if cfg.activation != Activation.NONE.value and st is not None and st.absmax > 0:
        # Per-tensor, symmetric: the input as the layer sees it (after an AWQ scale is folded, x / s).
        qt.act_scale = torch.tensor((st.absmax if scale is None else float(x.abs().max())) / 127.0, dtype=torch.float32)
        info["act_absmax"] = round(qt.act_scale.item() * 127.0, 6)
    if x is not None:
        ref = x @ w.float().T
        info["output_rel_err"] = round(float((x @ qt.dequantize().T - ref).norm() / ref.norm().clamp(min=1e-12)), 6)
    return qt, info


def quantize_components(
    components: dict[str, nn.Module],
    recipe: QuantRecipe,
    fingerprint: str,
    tokenizer: object,
    progress: Progress | None = None,
    samples: int = 8,
) -> QuantResult:
    start = time.perf_counter()
    cfgs = plan(components, recipe)
    tied = tied_pairs(components, recipe)
    result = QuantResult(recipe.name, fingerprint)
    report = progress or (lambda what, done, total: None)
    # Calibrated methods need data, and so do quantized activations (their static scales).
    needs_data = {fqn.split(".", 1)[0] for fqn, c in cfgs.items() if c.method != Method.RTN.value or c.activation != Activation.NONE.value}
    sources = Sources(components, tokenizer, samples=samples)
    for cname, module in components.items():
        mine = {fqn[len(cname) + 1:]: c for fqn, c in cfgs.items() if fqn.startswith(cname + ".")}
        if not mine:
            continue
        # Calibration runs the component as stored (a bf16 checkpoint) computing in fp32; each
        # weight's pages go back to the kernel once it is quantized (they stay readable).
        with computing_in(module, torch.float32):
            _quantize_component(cname, module, mine, tied, cname in needs_data, sources, result, report)
        release_pages(module.state_dict().values())
    result.seconds = time.perf_counter() - start
    return result


def _quantize_component(cname: str, module: nn.Module, mine: dict[str, QuantConfig], tied: dict[str, str], calibrate: bool,
                        sources: Sources, result: QuantResult, report: Progress) -> None:  # fmt: skip
    calib = calibration_for(module, sources) if calibrate else Calibration()
    done: set[str] = set()
    if calib.sequences and isinstance(module, QwenForCausalLM):
        done = _quantize_stack(cname, module, mine, calib.sequences, result, report)
    tables = {p: c for p, c in mine.items() if is_table(module, p)}
    for path, cfg in tables.items():  # round to nearest, one row (or group of a row) at a time
        weight = module.get_submodule(path).weight
        qt, info = _quantize_one(weight.detach(), cfg, None)
        result.tensors[f"{cname}.{path}"], result.layers[f"{cname}.{path}"] = qt, {**info, "embedding": True}
        release_pages([weight])
    shared = {h[len(cname) + 1:]: t for h, t in tied.items() if h.startswith(cname + ".")}
    for head, table in shared.items():  # the table's codes and scales, the very same tensors
        result.tensors[f"{cname}.{head}"] = result.tensors[table]
        result.layers[f"{cname}.{head}"] = {**result.layers[table], "embedding": False, "shares": table}
    rest = {p: c for p, c in mine.items() if p not in done and p not in tables and p not in shared}
    linears = {p: module.get_submodule(p) for p in rest}
    with torch.no_grad(), watching(linears, rest) as stats:
        for call in calib.calls:
            call()
    for i, (path, cfg) in enumerate(rest.items()):
        report(cname, i + 1, len(rest))
        st = stats[path] if stats[path].n_rows else None
        qt, info = _quantize_one(linears[path].weight.detach(), cfg, st)
        result.tensors[f"{cname}.{path}"], result.layers[f"{cname}.{path}"] = qt, info
        release_pages([linears[path].weight])


# AWQ's foldable pairs inside a Qwen decoder layer: (op producing the input, linears reading it).
_PAIRS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
          ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
          ("mlp.up_proj", ("mlp.down_proj",)))  # fmt: skip


def _quantize_stack(cname: str, lm: QwenForCausalLM, cfgs: dict[str, QuantConfig], seqs: list[torch.Tensor],
                    result: QuantResult, report: Progress) -> set[str]:  # fmt: skip
    stack = lm.model
    c = stack.cfg
    done: set[str] = set()
    xs = [s.float() for s in seqs]
    n = len(stack.layers) + 1
    for i, layer in enumerate(stack.layers):
        report(cname, i + 1, n)
        prefix = f"model.layers.{i}."
        mine = {p[len(prefix):]: cfg for p, cfg in cfgs.items() if p.startswith(prefix)}
        with widened(layer, torch.float32):
            ctx = [_layer_args(x, c) for x in xs]
            if mine:
                _quantize_layer(layer, mine, xs, ctx, f"{cname}.{prefix}", result)
                done.update(prefix + p for p in mine)
            with torch.no_grad():
                xs = [layer(x, *a) for x, a in zip(xs, ctx, strict=True)]
        release_pages(layer.state_dict().values())
    report(cname, n, n)
    if "lm_head" in cfgs and isinstance(getattr(lm, "lm_head", None), nn.Linear):
        with torch.no_grad(), widened(stack.norm, torch.float32):
            hidden = [stack.norm(x) for x in xs]
        st = Stats()
        for h in hidden:
            st.add(h, cfgs["lm_head"].method == Method.GPTQ.value)
        qt, info = _quantize_one(lm.lm_head.weight.detach().float(), cfgs["lm_head"], st)
        result.tensors[f"{cname}.lm_head"], result.layers[f"{cname}.lm_head"] = qt, info
        done.add("lm_head")
    return done


def _layer_args(x: torch.Tensor, c) -> tuple:  # type: ignore[no-untyped-def]
    pos = torch.arange(x.shape[1])
    cos, sin = rope_cos_sin(pos, c.head_dim, c.rope_theta, x.dtype)
    return cos, sin, pos[None, :] <= pos[:, None]


def _quantize_layer(layer: QwenDecoderLayer, cfgs: dict[str, QuantConfig], xs: list[torch.Tensor], ctx: list[tuple],
                    prefix: str, result: QuantResult) -> None:  # fmt: skip
    linears = {p: layer.get_submodule(p) for p in cfgs}
    with torch.no_grad(), watching(linears, cfgs) as stats:
        for x, a in zip(xs, ctx, strict=True):
            layer(x, *a)
    col: dict[str, torch.Tensor] = {}  # input-channel scale each linear is quantized with
    row: dict[str, torch.Tensor] = {}  # output-row factor of a producer linear (up_proj)
    for src, dsts in _PAIRS:
        src_mod = layer.get_submodule(src)
        foldable = isinstance(src_mod, RMSNorm) or src in cfgs
        if not foldable or any(cfgs.get(d) is None or cfgs[d].method != Method.AWQ.value for d in dsts):
            continue
        s, ratio = awq.search_scale(stats[dsts[0]].sample(), [linears[d].weight.detach() for d in dsts], cfgs[dsts[0]])
        col.update(dict.fromkeys(dsts, s))
        # Fold 1/s into the producer: a norm's weight, or the rows of up_proj (down reads them).
        if isinstance(src_mod, RMSNorm):
            result.floats[prefix + src + ".weight"] = src_mod.weight.detach().float() / s
        else:
            row[src] = 1.0 / s
        result.layers.setdefault(prefix + dsts[0], {})["awq_ratio"] = ratio
    for path, cfg in cfgs.items():
        w = linears[path].weight.detach().float()
        if path in row:
            w = w * row[path][:, None]
        qt, info = _quantize_one(w, cfg, stats[path], col.get(path))
        result.tensors[prefix + path] = qt
        result.layers[prefix + path] = {**result.layers.get(prefix + path, {}), **info}
    apply_dequantized(layer, result, prefix)


def _set(module: nn.Module, name: str, value: nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, leaf, value)


def apply_dequantized(module: nn.Module, result: QuantResult, prefix: str) -> None:
    """Write the dequantized weights (and folded floats) of ``prefix``* into ``module`` in place."""
    for fqn, qt in result.tensors.items():
        if fqn.startswith(prefix):
            _set(module, fqn[len(prefix):] + ".weight", nn.Parameter(qt.dequantize(), requires_grad=False))
    for fqn, w in result.floats.items():
        if fqn.startswith(prefix) and fqn.endswith(".weight"):
            _set(module, fqn[len(prefix):], nn.Parameter(w.clone(), requires_grad=False))


def component_classes(components: dict[str, nn.Module], configs: dict[str, QuantConfig], float_class: str = "fp32") -> dict[str, str]:
    """Each component's precision class under a plan (see recipe.precision_class)."""
    return {name: precision_class([c for f, c in configs.items() if f.split(".", 1)[0] == name], role_of(m).value, float_class)
            for name, m in components.items()}  # fmt: skip
