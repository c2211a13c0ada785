"""Sensitivity: which quantized layers hurt a component's output most, and the smallest
mixed-precision recipe that meets a parity target.

Each layer is quantized alone (the rest float) and the component's output on held-out inputs is
compared with the float output (LLMs: KL and top-1 on held-out text; others: cosine on their
calibration inputs). That is one whole evaluation per layer: a large component (a 4B LLM: 252
linears, about 20 s an evaluation on two cores) is ranked by block instead, one evaluation per
repeated block (decoder layer) with all its layers quantized, and within a block by each
layer's own output (its cosine with round-to-nearest weights, all measured in the reference
pass). Measured on the small synthetic checkpoint, a layer's own output alone ranks badly (the
early layers whose error every later layer carries rank low): 35 LLM layers promoted against
13 when ranked exactly. The proposal is checked on the whole component either way.

Layers are then promoted to 8-bit, most damage per byte added first, until the whole
component meets the target; if it meets it with room, 8-bit layers are demoted to 4-bit, least
damage per byte saved first, while it still does. Within a block, a layer's share of the
block's damage is in proportion to its own output's error. Ranking and proposal use
round-to-nearest: AWQ and GPTQ only lower the error, so a proposal that passes with RTN passes
with them."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from omni_export.errors import ConfigError
from omni_export.export.components.qwen import QwenForCausalLM
from omni_export.export.safetensors_io import release_pages
from omni_export.export.widen import computing_in
from omni_export.profiles import ParityThreshold
from omni_export.quantize.calibrate import Sources, calibration_for
from omni_export.quantize.engine import component_classes, is_table, plan, shared_heads
from omni_export.quantize.presets import W4G32, W8
from omni_export.quantize.recipe import Method, QuantConfig, QuantRecipe, QuantRule
from omni_export.quantize.result import weight_bytes
from omni_export.quantize.rtn import rtn
from omni_export.runtime_py.parity import DECISIVE_P, cosine, mean_kl, top1_agreement

STEPS = 8  # promotion/demotion batches per component
# Ranked layers x weights of a component above which it is ranked by block (an evaluation per
# block) rather than by an evaluation per layer: the small synthetic LLM (1e10) is ranked
# exactly, a Qwen3-0.6B-shaped one (196 layers x 0.6B) by block.
EXACT_BUDGET = 2e10
RANKINGS = ("auto", "exact", "block")


@dataclass
class Damage:
    cosine: float
    kl: float | None = None
    top1: float | None = None

    def score(self) -> float:
        """One number to rank by: KL for LLMs, 1 - cosine otherwise."""
        return self.kl if self.kl is not None else 1.0 - self.cosine

    def meets(self, th: ParityThreshold) -> bool:
        ok = self.cosine >= th.cosine_min
        if self.kl is not None:
            ok = ok and self.kl <= th.kl_max and (self.top1 is None or self.top1 >= th.top1_min)
        return ok


@dataclass
class ComponentReport:
    component: str
    all_quantized: Damage
    layers: list[tuple[str, QuantConfig, Damage, int]]  # (fqn, config, damage alone, bytes), worst first
    proposal: dict[str, QuantConfig] = field(default_factory=dict)
    proposal_damage: Damage | None = None
    bytes_recipe: int = 0
    bytes_proposal: int = 0
    precision_class: str = ""  # what the recipe makes this component; its threshold
    threshold: ParityThreshold | None = None  # what the proposal was made to meet
    error_scale: float = 1.0  # the target's measured error / this estimate's (>= 1), when measured
    # exact: the component's damage with the layer alone quantized; block: with its block (a
    # decoder layer) quantized, and within the block the layer's own output's cosine
    ranking: str = "exact"
    # screened: the whole recipe's estimate met the (margined) gate, so no layer was ranked
    screened: bool = False


def _evaluator(module: nn.Module, sources: Sources) -> Callable[[], list[torch.Tensor]]:
    if isinstance(module, QwenForCausalLM):
        from omni_export.quantize.fixture import SEQ, token_stream

        tokens = token_stream(sources.tokenizer, "heldout")[: 2 * SEQ].reshape(2, SEQ)
        pos = torch.arange(SEQ)
        return lambda: [module(module.embed(t[None]), pos) for t in tokens]
    calib = calibration_for(module, sources)

    def run() -> list[torch.Tensor]:
        outs: list[torch.Tensor] = []
        for call in calib.calls:
            y = call()
            outs.extend(y if isinstance(y, (list, tuple)) else [y])
        return outs

    return run


def _damage(outs: list[torch.Tensor], ref: list[torch.Tensor], logits: bool) -> Damage:
    a = np.concatenate([o.detach().float().numpy().ravel() for o in outs])
    r = np.concatenate([o.detach().float().numpy().ravel() for o in ref])
    if not logits:
        return Damage(cosine(a, r))
    v = outs[0].shape[-1]
    a, r = a.reshape(-1, v), r.reshape(-1, v)
    return Damage(cosine(a, r), mean_kl(a, r), top1_agreement(a, r, min_p=DECISIVE_P))


@contextmanager
def _dequantized(module: nn.Module, choice: dict[str, QuantConfig], stored: dict[str, torch.Tensor]) -> Iterator[None]:
    """The chosen layers compute with round-to-nearest weights, made as each one runs and dropped
    after: a 4B component's dequantized fp32 weights never exist all at once."""

    def before(path: str, cfg: QuantConfig):  # type: ignore[no-untyped-def]
        def hook(m: nn.Module, args: object) -> None:
            m._parameters["weight"] = rtn(stored[path], cfg).dequantize()

        return hook

    def after(path: str):  # type: ignore[no-untyped-def]
        def hook(m: nn.Module, args: object, out: object) -> None:
            m._parameters["weight"] = stored[path]
            # the checkpoint's pages this layer was rounded from go back, as computing_in's do: a
            # 4B LLM's evaluation otherwise leaves its 8 GB of bf16 pages resident
            release_pages([stored[path]], trim=False)

        return hook

    handles = []
    for p, c in choice.items():
        m = module.get_submodule(p)
        # first in line: computing_in's widening then finds the weight already fp32
        handles += [m.register_forward_pre_hook(before(p, c), prepend=True), m.register_forward_hook(after(p), prepend=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for p in choice:  # a call that raised never reached its restore hook
            module.get_submodule(p)._parameters["weight"] = stored[p]


def _reference_and_layer_damage(module: nn.Module, ranked: dict[str, QuantConfig], stored: dict[str, torch.Tensor],
                                evaluate: Callable[[], list[torch.Tensor]]) -> tuple[list[torch.Tensor], dict[str, Damage]]:  # fmt: skip
    """The float outputs, and from the same pass each layer's own damage: the cosine between its
    output and what round-to-nearest weights give on the same input."""
    sums = {p: torch.zeros(3, dtype=torch.float64) for p in ranked}  # <y, yq>, |y|^2, |yq|^2

    def hook(path: str, cfg: QuantConfig):  # type: ignore[no-untyped-def]
        def h(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            wq = rtn(stored[path], cfg).dequantize()
            yq = F.linear(args[0].float(), wq, None if m.bias is None else m.bias.float()).double().ravel()
            y = out.double().ravel()
            sums[path] += torch.stack([y @ yq, y @ y, yq @ yq])

        return h

    handles = [module.get_submodule(p).register_forward_hook(hook(p, c), prepend=True) for p, c in ranked.items()]
    try:
        with torch.no_grad():
            ref = evaluate()
    finally:
        for h in handles:
            h.remove()
    return ref, {p: Damage(float(a[0] / max(float((a[1] * a[2]).sqrt()), 1e-30))) for p, a in sums.items()}


def _block_of(path: str) -> str:
    """A layer's repeated block: its path up to the first index (``model.layers.7``), or itself."""
    parts = path.split(".")
    i = next((i for i, part in enumerate(parts) if part.isdigit()), len(parts) - 1)
    return ".".join(parts[: i + 1])


def _rtn_cfg(cfg: QuantConfig) -> QuantConfig:
    return replace(cfg, method=Method.RTN.value)


def analyze(components: dict[str, nn.Module], recipe: QuantRecipe, tokenizer: Any, threshold: Callable[[str], ParityThreshold],
            progress: Callable[[str, int, int], None] | None = None, only: set[str] | None = None,
            measured: dict[str, float] | None = None, ranking: str = "auto", screen: float | None = None) -> list[ComponentReport]:  # fmt: skip
    """``threshold(precision_class)``: what a component must meet, at the class the recipe gives it.
    ``only``: the components to analyse (default all); the recipe is planned on all of them.
    ``measured``: a component's worst cosine as its artifact gave it with this recipe. The
    estimate here (weights alone, round-to-nearest, other inputs) can err less than the target
    does (activation quantization, kernels); the proposal then aims lower by the same ratio of
    errors, so what passes here has the margin the target needs.
    ``ranking``: exact, block (see the module's doc) or auto (block above EXACT_BUDGET).
    ``screen``: before any artifact exists, the error scale to assume for the target; a component
    whose whole-recipe estimate meets its gate at that scale is not ranked (``screened``), which
    costs two evaluations instead of one per block or layer.
    Components may be stored in bf16 (memory-mapped): they compute in fp32, a layer at a time."""
    if ranking not in RANKINGS:
        raise ConfigError(f"ranking must be one of {', '.join(RANKINGS)}, not {ranking!r}")
    cfgs = plan(components, recipe)
    classes = component_classes(components, cfgs)
    step = progress or (lambda what, i, n: None)
    sources = Sources(components, tokenizer)
    reports = []
    tied = shared_heads(components, cfgs)
    with computing_in(nn.ModuleDict(components), torch.float32):
        for cname, module in components.items():
            mine = {f[len(cname) + 1:]: _rtn_cfg(c) for f, c in cfgs.items() if f.startswith(cname + ".")}
            if not mine or (only is not None and cname not in only):
                continue
            reports.append(_analyze_one(cname, module, mine, tied, classes[cname], threshold, sources, step,
                                        None if measured is None else measured.get(cname), ranking, screen))  # fmt: skip
    return reports


def _analyze_one(cname: str, module: nn.Module, mine: dict[str, QuantConfig], tied: dict[str, str], precision_class: str,
                 threshold: Callable[[str], ParityThreshold], sources: Sources, step: Callable[[str, int, int], None],
                 measured: float | None, ranking: str, screen: float | None = None) -> ComponentReport:  # fmt: skip
    logits = isinstance(module, QwenForCausalLM)
    stored = {p: module.get_submodule(p).weight.detach() for p in mine}  # as stored: bf16 pages of the checkpoint
    evaluate = _evaluator(module, sources)
    runs = [0]

    def damage_with(choice: dict[str, QuantConfig], ref: list[torch.Tensor]) -> Damage:
        with torch.no_grad(), _dequantized(module, choice, stored):
            return _damage(evaluate(), ref, logits)

    def checked(choice: dict[str, QuantConfig]) -> Damage:  # the whole recipe, and each proposal
        runs[0] += 1
        step(f"{cname} proposal", runs[0], STEPS + 1)
        return damage_with(choice, ref)

    # Embedding tables count in the whole recipe's damage but are not candidates: they are
    # 8-bit already, and the promotion rules this feeds match linears; nor is a head that
    # holds its table's codes (a rule for it would change nothing).
    ranked = {p: c for p, c in mine.items() if not is_table(module, p) and f"{cname}.{p}" not in tied}
    by_block = ranking == "block" or (ranking == "auto" and len(ranked) * sum(w.numel() for w in stored.values()) > EXACT_BUDGET)
    by_block = by_block and all(isinstance(module.get_submodule(p), nn.Linear) for p in ranked)
    screening = screen is not None and measured is None
    own: dict[str, Damage] | None = None
    if by_block and not screening:  # ranked for certain: the reference pass also gives each layer's own error
        step(f"{cname} layer errors", 1, 1)
        ref, own = _reference_and_layer_damage(module, ranked, stored, evaluate)
    else:
        with torch.no_grad():
            ref = evaluate()
    rep = ComponentReport(cname, checked(mine), [], precision_class=precision_class, threshold=threshold(precision_class),
                          bytes_recipe=sum(weight_bytes(tuple(stored[p].shape), c) for p, c in ranked.items()))  # fmt: skip
    scale = screen if measured is None else (1.0 - measured) / max(1.0 - rep.all_quantized.cosine, 1e-9)
    if scale is not None:
        rep.error_scale = max(1.0, scale)
        rep.threshold = replace(rep.threshold, cosine_min=1.0 - (1.0 - rep.threshold.cosine_min) / rep.error_scale,
                                kl_max=rep.threshold.kl_max / rep.error_scale)  # fmt: skip
    if screening and rep.all_quantized.meets(rep.threshold):
        rep.screened, rep.proposal, rep.proposal_damage, rep.bytes_proposal = True, dict(mine), rep.all_quantized, rep.bytes_recipe
        return rep
    order: dict[str, tuple[float, ...]] = {}
    if by_block:
        if own is None:  # screened first, and missed
            step(f"{cname} layer errors", 1, 1)
            _, own = _reference_and_layer_damage(module, ranked, stored, evaluate)
        blocks: dict[str, dict[str, QuantConfig]] = {}
        for p, c in ranked.items():
            blocks.setdefault(_block_of(p), {})[p] = c
        alone = {}
        for i, members in enumerate(blocks.values()):
            step(f"{cname} blocks", i + 1, len(blocks))
            d = damage_with(members, ref)
            for p in members:  # the block's damage; within it, the layer's own output decides
                alone[p], order[p] = d, (d.score(), own[p].score())
    else:
        alone = {}
        for i, (p, c) in enumerate(ranked.items()):
            step(f"{cname} layers", i + 1, len(ranked))
            alone[p] = damage_with({p: c}, ref)
            order[p] = (alone[p].score(),)
    layers = [(f"{cname}.{p}", c, alone[p], weight_bytes(tuple(stored[p].shape), c)) for p, c in ranked.items()]
    layers.sort(key=lambda x: tuple(-v for v in order[x[0][len(cname) + 1:]]))
    rep.layers, rep.ranking = layers, "block" if by_block else "exact"
    w4_ok = {p for p, w in stored.items() if w.shape[1] % W4G32.group_size == 0}
    share = _damage_shares(alone, own if by_block else None, {p: _block_of(p) for p in ranked})
    step_bytes = {p: weight_bytes(tuple(stored[p].shape), W8) - weight_bytes(tuple(stored[p].shape), W4G32) for p in ranked}
    by_gain = sorted(ranked, key=lambda p: -share[p] / max(step_bytes[p], 1))
    rep.proposal, rep.proposal_damage = _propose(mine, w4_ok, by_gain, rep.threshold, checked, rep.all_quantized)
    rep.bytes_proposal = sum(weight_bytes(tuple(stored[p].shape), c) for p, c in rep.proposal.items() if p in ranked)
    return rep


def _damage_shares(alone: dict[str, Damage], own: dict[str, Damage] | None, block: dict[str, str]) -> dict[str, float]:
    """The damage each layer accounts for: its own (exact ranking), or its block's split among
    the block's layers by their own output's error (block ranking)."""
    if own is None:
        return {p: d.score() for p, d in alone.items()}
    total: dict[str, float] = {}
    for p in alone:
        total[block[p]] = total.get(block[p], 0.0) + own[p].score()
    members = Counter(block[p] for p in alone)
    return {p: d.score() * (own[p].score() / total[block[p]] if total[block[p]] > 0 else 1.0 / members[block[p]])
            for p, d in alone.items()}  # fmt: skip


def _propose(mine: dict[str, QuantConfig], w4_ok: set[str], order: list[str], th: ParityThreshold,
             damage: Callable[[dict[str, QuantConfig]], Damage], start: Damage) -> tuple[dict[str, QuantConfig], Damage]:  # fmt: skip
    """``order``: the layers by the damage they account for per byte a promotion adds, most
    first. Promotes in that order until the gate is met; with room, demotes from the other end.
    Most damage first would spend a head's 78 MB (a 0.6B vocabulary) on what a few decoder
    linears buy for a tenth of it."""
    choice = dict(mine)
    current = start
    batch = max(1, math.ceil(len(order) / STEPS))
    if not current.meets(th):
        todo = [p for p in order if choice[p].bits == 4]
        while todo and not current.meets(th):
            for p in todo[:batch]:
                choice[p] = W8
            todo = todo[batch:]
            current = damage(choice)
        return choice, current
    todo = [p for p in reversed(order) if choice[p].bits == 8 and p in w4_ok]
    while todo:
        trial = dict(choice)
        for p in todo[:batch]:
            trial[p] = W4G32
        d = damage(trial)
        if not d.meets(th):
            break
        choice, current, todo = trial, d, todo[batch:]
    return choice, current


def proposal_recipe(base: QuantRecipe, reports: list[ComponentReport]) -> QuantRecipe:
    """The base recipe with one exact rule per layer whose precision the proposal changed."""
    rules = []
    base_cfg = {}
    for r in reports:
        for fqn, cfg, *_ in r.layers:
            base_cfg[fqn] = cfg
        for path, cfg in r.proposal.items():
            fqn = f"{r.component}.{path}"
            if fqn in base_cfg and cfg.bits != base_cfg[fqn].bits:  # tables are not ranked: never changed
                rules.append(QuantRule("^" + fqn.replace(".", r"\.") + "$", cfg))
    name = base.name if base.name.endswith("-mixed") else f"{base.name}-mixed"
    return replace(base, name=name, rules=tuple(rules) + base.rules)
