"""QuantRecipe: ordered rules -> QuantConfig or None (float). A rule matches a weight by a regex
over ``component.module_path`` and, optionally, by the component's role (decoder, encoder, ...),
so presets written by role fit any family. First match wins. The recipe says nothing about any
backend. What precision a component ends up at (its precision class: the parity threshold it is
held to) comes from the configs the recipe gives its weights, never from the recipe's name."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

from omni_export.configs import from_dict
from omni_export.errors import ConfigError


class Activation(str, Enum):
    NONE = "none"
    INT8_DYNAMIC = "int8_dynamic"
    INT8_STATIC = "int8_static"


class Method(str, Enum):
    RTN = "rtn"
    AWQ = "awq"
    GPTQ = "gptq"


@dataclass(frozen=True)
class QuantConfig:
    bits: int
    group_size: int = 0  # 0 = one scale per output channel
    symmetric: bool = True
    activation: str = Activation.NONE.value
    method: str = Method.RTN.value

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ConfigError(f"bits must be 4 or 8, got {self.bits}")
        if self.group_size < 0 or (self.group_size and self.group_size & (self.group_size - 1)):
            raise ConfigError(f"group_size must be 0 (per channel) or a power of two, got {self.group_size}")
        for value, enum in ((self.activation, Activation), (self.method, Method)):
            if value not in {e.value for e in enum}:
                raise ConfigError(f"{value!r} is not one of {[e.value for e in enum]}")

    def bytes_per_weight(self, in_features: int) -> float:
        """Storage per weight including its scale (fp16) and zero point (int8 when asymmetric)."""
        group = self.group_size or in_features
        return self.bits / 8 + (2 + (0 if self.symmetric else 1)) / group


def embedding_kind(cfg: QuantConfig) -> str:
    """How a quantized table is stored, in the words the manifest and fit report use."""
    return f"int{cfg.bits} " + (f"g{cfg.group_size}" if cfg.group_size else "per row")


ROLES = ("frontend", "encoder", "decoder", "acoustic", "vocoder")
EMBEDDING_ROLES = ("decoder",)  # the stacks that gather token rows
TIED_HEAD = ("table", "own")


@dataclass(frozen=True)
class QuantRule:
    pattern: str
    config: QuantConfig | None  # None: keep float
    roles: tuple[str, ...] = ()  # empty: any role

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ConfigError(f"rule pattern {self.pattern!r} is not a valid regular expression: {exc}") from None
        unknown = [r for r in self.roles if r not in ROLES]
        if unknown:
            raise ConfigError(f"rule roles {unknown} are not roles; known: {list(ROLES)}")

    def matches(self, fqn: str, role: str | None) -> bool:
        return (not self.roles or role in self.roles) and re.search(self.pattern, fqn) is not None

    def describe(self) -> str:
        return (f"roles {'/'.join(self.roles)} " if self.roles else "") + f"/{self.pattern}/"


@dataclass(frozen=True)
class QuantRecipe:
    name: str
    rules: tuple[QuantRule, ...]
    float_dtype: str = "fp16"
    # Embedding tables of decoder stacks (the LLM's is a sixth of a 4B model and most of a small
    # one). Rules match linears only: a table is gathered a row at a time, so it takes a config
    # of its own (8-bit per row, or 4-bit in groups along the row), rounded to nearest.
    embeddings: QuantConfig | None = None
    # A head tied to a quantized table: "table" quantizes it as the table (one set of codes, which
    # a target that can share stores once); "own" gives it its own codes under the linear rules.
    tied_head: str = "table"

    def __post_init__(self) -> None:
        if self.float_dtype not in ("fp16", "fp32", "bf16"):
            raise ConfigError(f"float_dtype must be fp16, fp32 or bf16, got {self.float_dtype!r}")
        if self.tied_head not in TIED_HEAD:
            raise ConfigError(f"recipe {self.name!r}: tied_head must be one of {list(TIED_HEAD)}, got {self.tied_head!r}")
        e = self.embeddings
        if e is not None and (e.method != Method.RTN.value or e.activation != Activation.NONE.value):
            raise ConfigError(f"recipe {self.name!r}: embeddings are quantized round-to-nearest, weight-only "
                              f"(got method {e.method!r}, activation {e.activation!r}); drop those keys from [embeddings]")

    def config_for(self, fqn: str, role: str | None = None) -> QuantConfig | None:
        for rule in self.rules:
            if rule.matches(fqn, role):
                return rule.config
        return None

    def check_matches(self, weights: Iterable[tuple[str, str | None]]) -> None:
        """A rule that matches none of the model's weights ((fqn, role) pairs) is a typo, not a no-op."""
        weights = list(weights)
        dead = [r.describe() for r in self.rules if not any(r.matches(f, role) for f, role in weights)]
        if dead:
            raise ConfigError(f"recipe {self.name!r}: rule(s) {dead} match no weight of this model")

    @property
    def is_float(self) -> bool:
        return all(r.config is None for r in self.rules) and self.embeddings is None

    def embedding_config(self, role: str | None) -> QuantConfig | None:
        return self.embeddings if role in EMBEDDING_ROLES else None


def recipe_toml(recipe: QuantRecipe) -> str:
    """The TOML form ``load_recipe_toml`` reads back."""
    import tomli_w

    rules = [{"pattern": r.pattern, **({"roles": list(r.roles)} if r.roles else {}),
              **({"float": True} if r.config is None else asdict(r.config))} for r in recipe.rules]  # fmt: skip
    data: dict = {"name": recipe.name, "float_dtype": recipe.float_dtype, "rules": rules}
    if recipe.embeddings is not None:
        data["embeddings"] = asdict(recipe.embeddings)
        data["tied_head"] = recipe.tied_head
    return tomli_w.dumps(data)


def load_recipe_toml(path: Path) -> QuantRecipe:
    """TOML: ``name``, ``float_dtype``, ``[[rules]] pattern = ... roles = [...] bits = ... group_size = ...``
    (or ``float = true``); a rule needs a pattern, roles, or both. ``[embeddings] bits = 8`` (per
    row) or ``bits = 4, group_size = 32`` quantizes the decoders' embedding tables; ``tied_head =
    "table"`` (the default) or ``"own"`` says how a head tied to such a table is quantized."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc}") from None
    rules = []
    for i, raw in enumerate(data.get("rules", [])):
        raw = dict(raw)
        pattern = raw.pop("pattern", None)
        roles = raw.pop("roles", [])
        if pattern is None and not roles:
            raise ConfigError(f"{path}: rules[{i}] needs a 'pattern', 'roles' or both")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise ConfigError(f"{path}: rules[{i}].roles must be a list of role names {list(ROLES)}")
        keep_float = raw.pop("float", False)
        cfg = None if keep_float else from_dict(QuantConfig, raw, where=f"{path}: rules[{i}]")
        rules.append(QuantRule(pattern if pattern is not None else ".", cfg, tuple(roles)))
    if not rules:
        raise ConfigError(f"{path}: a recipe needs at least one [[rules]] entry")
    extra = set(data) - {"name", "rules", "float_dtype", "embeddings", "tied_head"}
    if extra:
        raise ConfigError(f"{path}: unknown key(s) {sorted(extra)}")
    emb = data.get("embeddings")
    if emb is not None and not isinstance(emb, dict):
        raise ConfigError(f"{path}: [embeddings] must be a table such as 'bits = 8' (per row) or 'bits = 4' with 'group_size = 32'")
    embeddings = from_dict(QuantConfig, emb, where=f"{path}: [embeddings]") if emb is not None else None
    return QuantRecipe(data.get("name", Path(path).stem), tuple(rules), data.get("float_dtype", "fp16"), embeddings,
                       data.get("tied_head", "table"))


# -- precision classes -----------------------------------------------------------------------------
FLOAT_CLASSES = ("fp32", "fp16")
CLASSES = ("fp32", "fp16", "int8", "w8a8", "int4", "int4-all")


def precision_class(configs: Iterable[QuantConfig], role: str | None, float_class: str = "fp32") -> str:
    """A component's precision class from the configs its weights got: no quantized weight ->
    the artifact's float precision; any 4-bit weight -> ``int4`` for decoder stacks, ``int4-all``
    elsewhere (4-bit encoders and vocoders lose more, and are held to the looser threshold that
    the int4-everywhere preset always had); 8-bit with int8 activations -> ``w8a8``; else ``int8``."""
    configs = list(configs)
    if not configs:
        return float_class
    if any(c.bits == 4 for c in configs):
        return "int4" if role == "decoder" else "int4-all"
    if any(c.activation != Activation.NONE.value for c in configs):
        return "w8a8"
    return "int8"


BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "w8a8": 1.0, "int4": 0.5, "int4-all": 0.5}
