"""The Target protocol: lower one traced component (with its QuantResult) for one device profile
into artifact files, and say how it is run and checked.

A target plugs in by registering itself with:

- ``kv_mode``: how its decoder caches are held (export/components/kv.py: buffers, state, io);
- ``backend``: the runtime that opens its artifacts on the device (runtime_py/backends);
- ``parity_backend``: the runtime that replays the exact same artifact on a build host (TensorRT's
  ONNX in ONNX Runtime; none for Core ML on Linux, whose components are then recorded as "not run
  on this host" and never pass a gate they did not run);
- ``check_quant`` / ``encode`` / ``lower``: what it can encode, and how.

Heavy backend imports happen inside the target's methods."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from omni_export.bundle.manifest import Delegation, RuntimeSettings
from omni_export.errors import OmniExportError
from omni_export.registry import Registry

if TYPE_CHECKING:
    from omni_export.export.trace import TracedComponent
    from omni_export.export.trace_specs import Limits
    from omni_export.profiles import Profile
    from omni_export.quantize.recipe import QuantConfig, QuantRecipe
    from omni_export.quantize.result import QTensor


class QuantEncodingError(OmniExportError):
    """The target cannot encode this quantization (bits, symmetry or activation handling)."""


class LoweringError(OmniExportError):
    """A traced component could not be lowered for the target."""


log = logging.getLogger(__name__)


@contextlib.contextmanager
def library_chatter(*loggers: str, stdout: bool = False) -> Iterator[None]:
    """What an exporter warns and logs below ERROR while it runs (its own deprecations, optional
    ops it skips) and, with ``stdout``, what it prints, goes to this package's debug log, not the
    user's terminal; `-v` shows it. Errors still raise. (stdout only where a library prints
    progress: the CLI's progress bar writes there too.)"""
    out = io.StringIO()
    saved = {name: logging.getLogger(name).level for name in loggers}
    try:
        for name in loggers:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings(record=True) as caught, (contextlib.redirect_stdout(out) if stdout else contextlib.nullcontext()):
            warnings.simplefilter("always")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
    for w in caught:
        log.debug("%s: %s", w.category.__name__, w.message)
    if out.getvalue().strip():
        log.debug("%s", out.getvalue().strip())


def delegation(delegated: int, portable: int, subgraphs: int, ops: dict[str, int] | None = None) -> Delegation:
    total = delegated + portable
    return Delegation(delegated, portable, subgraphs, round(delegated / total, 4) if total else 1.0, dict(ops or {}))


@dataclass(frozen=True)
class Artifact:
    component: str
    files: tuple[str, ...]  # relative to the bundle root; the first is the main one
    entries: dict[str, str]  # method -> what runs it (a program method name, a graph file)
    backend: str
    delegation: dict[str, Delegation]
    build_s: float
    notes: tuple[str, ...] = field(default_factory=tuple)
    # method -> symbolic dim -> the sizes the artifact accepts (Core ML enumerated shapes)
    enumerated: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)
    # method -> (compute units, why) where the device runs it elsewhere than the profile says
    # (Core ML: CPU and GPU for functions the Neural Engine rejects)
    compute_units: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def delegated_share(self) -> float:
        d = sum(x.delegated_nodes for x in self.delegation.values())
        p = sum(x.portable_nodes for x in self.delegation.values())
        return d / (d + p) if d + p else 1.0


class Target(ABC):
    name: ClassVar[str]
    backend: ClassVar[str]
    kv_mode: ClassVar[str]
    # The host runtime that replays this target's artifacts for parity; None: none exists anywhere.
    parity_backend: ClassVar[str | None]
    # Precision of the tensors a recipe leaves float, in this target's artifacts.
    float_class: ClassVar[str] = "fp32"
    # How quantized linears treat their activations on this target (the manifest records it).
    quant_activation: ClassVar[str] = "float"
    # Why quantized embedding tables (targets/tables.py: integer rows gathered, then scaled) are
    # not lowered here; empty where they are.
    no_tables: ClassVar[str] = ""
    # Why a tied head cannot read its quantized table's codes from one stored copy here; empty
    # where it can (a preset then quantizes the head as the table: ``tied_head = "table"``).
    no_shared_head: ClassVar[str] = "its quantized linears and its gathers keep separate copies of their weights"

    def supports(self, traced: TracedComponent) -> bool:
        return True

    def kv_mode_for(self, module: nn.Module, profile: Profile | None = None) -> str:
        """The KV mode ``module``'s stacks are traced in for ``profile``: the target's, unless a
        target has a reason to hold one component's caches otherwise."""
        return self.kv_mode

    def adapt_recipe(self, recipe: QuantRecipe, components: dict[str, nn.Module]) -> tuple[QuantRecipe, list[str]]:
        """A named preset as this target can encode it (a user's own recipe is never changed:
        ``check_quant`` refuses what does not fit, saying why). Returns the recipe and notes."""
        return recipe, []

    def float_class_for(self, profile: Profile, recipe: QuantRecipe, role: str | None = None) -> str:
        """The precision of the tensors ``recipe`` leaves float, in this target's artifacts for
        ``profile`` (a component of ``role`` without quantized weights is of this class)."""
        return self.float_class

    def precision_plan(self, module: nn.Module, run_script: Callable[[], None], skip: set[str], precision: str) -> Any:
        """Before encoding: what this target measures on the float module while ``run_script``
        replays its golden calls (TensorRT: which layers fp16 cannot hold; ``skip``: quantized
        linears; ``precision``: the component's class). Handed to ``trace_context``; its
        ``report()`` goes in the build report."""
        return None

    def trace_context(self, module: nn.Module, limits: Limits, plan: Any = None) -> AbstractContextManager[None]:
        """Export-only patches this target wants while ``module`` is traced (none by default)."""
        return nullcontext()

    def finish(self, root: Path, profile: Profile, components: dict[str, Any]) -> list[str]:
        """Bundle-level files the target adds once every component is lowered (TensorRT's build
        plan and script); returns notes."""
        return []

    def runtime_settings(self, profile: Profile) -> RuntimeSettings:
        """What sessions open with on the profile's device (recorded in the manifest)."""
        return RuntimeSettings()

    def check_quant(self, configs: dict[str, QuantConfig], profile: Profile | None = None) -> list[str]:
        """Refuse, before any work, quantization this target cannot encode; return notes on how
        it will encode the rest. By default a target encodes none."""
        if configs:
            raise QuantEncodingError(f"target {self.name} cannot encode quantized weights yet; choose a float preset (fp32, fp16)")
        return []

    def encode(self, module: nn.Module, tensors: dict[str, QTensor], floats: dict[str, Any]) -> None:
        """Before tracing: put a component's QuantResult into ``module`` in the form this target
        traces (the rest happens in ``lower``, which gets the same tensors)."""
        raise QuantEncodingError(f"target {self.name} cannot encode quantized weights")

    @abstractmethod
    def lower(self, traced: TracedComponent, profile: Profile, root: Path, metadata: dict[str, Any],
              quant: dict[str, QTensor]) -> Artifact:  # fmt: skip
        """Write the artifact files for ``traced`` under ``root`` and describe them."""


TARGETS: Registry[Target] = Registry("target")


def recipe_for_target(target: Target, recipe: QuantRecipe, components: dict[str, nn.Module]) -> tuple[QuantRecipe, list[str]]:
    """A named preset as ``target`` encodes it (``Target.adapt_recipe``); a recipe the user wrote
    is returned as it is."""
    from omni_export.quantize.engine import tied_pairs
    from omni_export.quantize.presets import PRESETS

    if recipe.name in PRESETS and PRESETS.get(recipe.name) == recipe:
        notes = []
        if target.no_tables and recipe.embeddings is not None:
            recipe = replace(recipe, embeddings=None)
            notes.append(f"{target.name}: embedding tables stay float ({target.no_tables})")
        if target.no_shared_head and recipe.tied_head == "table" and tied_pairs(components, recipe):
            # two copies either way: the head keeps the smaller codes of the linear rules
            recipe = replace(recipe, tied_head="own")
            notes.append(f"{target.name}: a tied head is quantized as a linear of its own, a second copy of the table ({target.no_shared_head})")
        recipe, more = target.adapt_recipe(recipe, components)
        return recipe, notes + more
    return recipe, []


def check_plan(target: Target, components: dict[str, nn.Module], configs: dict[str, QuantConfig], profile: Profile | None = None) -> list[str]:
    """``Target.check_quant`` on the plan's linears; its embedding tables are checked here, the
    same on every target (one form lowers them all). Refuses before any work; returns notes."""
    from omni_export.quantize.engine import is_embedding, shared_heads
    from omni_export.quantize.recipe import embedding_kind

    tables = {f: c for f, c in configs.items() if is_embedding(components, f)}
    linears = {f: c for f, c in configs.items() if f not in tables}
    notes = target.check_quant(linears, profile)
    if tables and target.no_tables:
        raise QuantEncodingError(f"{target.name}: quantized embedding tables are not lowered on this target ({target.no_tables}); "
                                 f"remove [embeddings] from the recipe")  # fmt: skip
    if tables:
        kinds = sorted({embedding_kind(c) for c in tables.values()})
        notes.append(f"{target.name}: {len(tables)} embedding table(s) stored {' / '.join(kinds)}; a call gathers its rows "
                     f"and scales only those")  # fmt: skip
    for head, table in shared_heads(components, configs).items():
        where = (f"stored twice: {target.no_shared_head}" if target.no_shared_head
                 else "stored once, read by the gather and by the head's quantized linear")  # fmt: skip
        notes.append(f"{target.name}: {head} is tied to {table} and quantized as it ({embedding_kind(configs[table])}); {where}")
    return notes


def apply_floats(module: nn.Module, floats: dict[str, Any]) -> None:
    """Float tensors a quantization algorithm changed (AWQ folds its scales into norms)."""
    for name, value in floats.items():  # replaced, not written: the old tensor may view the checkpoint's file
        owner, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner), leaf, nn.Parameter(value.detach().clone(), requires_grad=False))


def swap_linears(module: nn.Module, tensors: dict[str, QTensor], make: Callable[[nn.Linear, str, QTensor], nn.Module]) -> None:
    """Replace every quantized linear of ``module`` by ``make(linear, path, qtensor)``, the form a
    target traces its QuantResult in (for good: the module is the compiler's copy, consumed by
    this build)."""
    for path, qt in tensors.items():
        lin = module.get_submodule(path)
        if not isinstance(lin, nn.Linear) or tuple(lin.weight.shape) != tuple(qt.q.shape):
            raise LoweringError(f"{path}: the QuantResult does not fit this module (shape {tuple(qt.q.shape)}); re-run quantization")
        owner, _, leaf = path.rpartition(".")
        setattr(module.get_submodule(owner) if owner else module, leaf, make(lin, path, qt))


@contextmanager
def traced_forms(module: nn.Module, forms: dict[type, type], applies: Callable[[nn.Module], bool] = lambda m: True) -> Iterator[None]:
    """While tracing: each module whose exact class is in ``forms`` (and ``applies``) takes the
    subclass there, a form of the same function over the same parameters that a target's lowering
    recognises; the classes are put back afterwards."""
    changed = [(m, type(m)) for m in module.modules() if type(m) in forms and applies(m)]
    for m, cls in changed:
        m.__class__ = forms[cls]
    try:
        yield
    finally:
        for m, cls in changed:
            m.__class__ = cls

