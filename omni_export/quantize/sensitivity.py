"""Sensitivity: which quantized layers hurt a component's output most, and the smallest
mixed-precision recipe that meets a parity target.

Each layer is quantized alone (the rest float) and the component's output on held-out inputs is
compared with the float output (LLMs: KL and top-1 on held-out text; others: cosine on their
calibration inputs). Layers are then promoted to 8-bit, most damaging first, until the whole
component meets the target; if it meets it with room, 8-bit layers are demoted to 4-bit, least
damaging first, while it still does. Ranking and proposal use round-to-nearest: AWQ and GPTQ
only lower the error, so a proposal that passes with RTN passes with them."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from omni_export.export.components.qwen import QwenForCausalLM
from omni_export.profiles import ParityThreshold
from omni_export.quantize.calibrate import Sources, calibration_for
from omni_export.quantize.engine import component_classes, is_table, plan, shared_heads
from omni_export.quantize.presets import W4G32, W8
from omni_export.quantize.recipe import Method, QuantConfig, QuantRecipe, QuantRule
from omni_export.quantize.rtn import rtn
from omni_export.runtime_py.parity import DECISIVE_P, cosine, mean_kl, top1_agreement

STEPS = 8  # promotion/demotion batches per component


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
def _swapped(module: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    saved = {p: module.get_submodule(p).weight for p in weights}
    for p, w in weights.items():
        module.get_submodule(p).weight = nn.Parameter(w, requires_grad=False)
    try:
        yield
    finally:
        for p, w in saved.items():
            module.get_submodule(p).weight = w


def _rtn_cfg(cfg: QuantConfig) -> QuantConfig:
    return replace(cfg, method=Method.RTN.value)


def analyze(components: dict[str, nn.Module], recipe: QuantRecipe, tokenizer: Any, threshold: Callable[[str], ParityThreshold],
            progress: Callable[[str, int, int], None] | None = None, only: set[str] | None = None,
            measured: dict[str, float] | None = None) -> list[ComponentReport]:  # fmt: skip
    """``threshold(precision_class)``: what a component must meet, at the class the recipe gives it.
    ``only``: the components to analyse (default all); the recipe is planned on all of them.
    ``measured``: a component's worst cosine as its artifact gave it with this recipe. The
    estimate here (weights alone, round-to-nearest, other inputs) can err less than the target
    does (activation quantization, kernels); the proposal then aims lower by the same ratio of
    errors, so what passes here has the margin the target needs."""
    cfgs = plan(components, recipe)
    classes = component_classes(components, cfgs)
    step = progress or (lambda what, i, n: None)
    sources = Sources(components, tokenizer)
    reports = []
    tied = shared_heads(components, cfgs)
    for cname, module in components.items():
        mine = {f[len(cname) + 1:]: _rtn_cfg(c) for f, c in cfgs.items() if f.startswith(cname + ".")}
        if not mine or (only is not None and cname not in only):
            continue
        logits = isinstance(module, QwenForCausalLM)
        weights = {p: module.get_submodule(p).weight.detach().float() for p in mine}
        evaluate = _evaluator(module, sources)

        def damage_with(choice: dict[str, QuantConfig], ref: list[torch.Tensor]) -> Damage:
            deq = {p: rtn(weights[p], c).dequantize() for p, c in choice.items()}
            with torch.no_grad(), _swapped(module, deq):
                return _damage(evaluate(), ref, logits)

        with torch.no_grad():
            ref = evaluate()
        # Embedding tables count in the whole recipe's damage but are not candidates: they are
        # 8-bit already, and the promotion rules this feeds match linears; nor is a head that
        # holds its table's codes (a rule for it would change nothing).
        ranked = {p: c for p, c in mine.items() if not is_table(module, p) and f"{cname}.{p}" not in tied}
        layers = []
        for i, (p, c) in enumerate(ranked.items()):
            step(f"{cname} layers", i + 1, len(ranked))
            layers.append((f"{cname}.{p}", c, damage_with({p: c}, ref), rtn(weights[p], c).nbytes()))
        layers.sort(key=lambda x: -x[2].score())
        rep = ComponentReport(cname, damage_with(mine, ref), layers, bytes_recipe=sum(x[3] for x in layers))
        w4_ok = {p for p, w in weights.items() if w.shape[1] % W4G32.group_size == 0}
        rep.precision_class = classes[cname]
        rep.threshold = threshold(classes[cname])
        if measured and cname in measured:
            rep.error_scale = max(1.0, (1.0 - measured[cname]) / max(1.0 - rep.all_quantized.cosine, 1e-9))
            rep.threshold = replace(rep.threshold, cosine_min=1.0 - (1.0 - rep.threshold.cosine_min) / rep.error_scale,
                                    kl_max=rep.threshold.kl_max / rep.error_scale)  # fmt: skip
        rep.proposal, rep.proposal_damage = _propose(mine, w4_ok, layers, cname, rep.threshold,
                                                     lambda ch: damage_with(ch, ref), rep.all_quantized)  # fmt: skip
        rep.bytes_proposal = sum(rtn(weights[p], c).nbytes() for p, c in rep.proposal.items() if p in ranked)
        reports.append(rep)
    return reports


def _propose(mine: dict[str, QuantConfig], w4_ok: set[str], ranked: list, cname: str, th: ParityThreshold,
             damage: Callable[[dict[str, QuantConfig]], Damage], start: Damage) -> tuple[dict[str, QuantConfig], Damage]:  # fmt: skip
    choice = dict(mine)
    current = start
    order = [fqn[len(cname) + 1:] for fqn, *_ in ranked]  # worst first
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
