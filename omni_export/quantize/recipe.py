"""QuantRecipe: ordered regex rules over ``component.module_path`` -> QuantConfig or None (float).
First match wins. The recipe says nothing about any backend."""

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


@dataclass(frozen=True)
class QuantRule:
    pattern: str
    config: QuantConfig | None  # None: keep float

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ConfigError(f"rule pattern {self.pattern!r} is not a valid regular expression: {exc}") from None


@dataclass(frozen=True)
class QuantRecipe:
    name: str
    rules: tuple[QuantRule, ...]
    float_dtype: str = "fp16"

    def __post_init__(self) -> None:
        if self.float_dtype not in ("fp16", "fp32", "bf16"):
            raise ConfigError(f"float_dtype must be fp16, fp32 or bf16, got {self.float_dtype!r}")

    def config_for(self, fqn: str) -> QuantConfig | None:
        for rule in self.rules:
            if re.search(rule.pattern, fqn):
                return rule.config
        return None

    def check_matches(self, fqns: Iterable[str]) -> None:
        """A rule that matches none of the model's tensors is a typo, not a no-op."""
        fqns = list(fqns)
        dead = [r.pattern for r in self.rules if not any(re.search(r.pattern, f) for f in fqns)]
        if dead:
            raise ConfigError(f"recipe {self.name!r}: rule(s) {dead} match no tensor of this model")

    @property
    def is_float(self) -> bool:
        return all(r.config is None for r in self.rules)


def recipe_toml(recipe: QuantRecipe) -> str:
    """The TOML form ``load_recipe_toml`` reads back."""
    import tomli_w

    rules = [{"pattern": r.pattern, "float": True} if r.config is None else {"pattern": r.pattern, **asdict(r.config)}
             for r in recipe.rules]  # fmt: skip
    return tomli_w.dumps({"name": recipe.name, "float_dtype": recipe.float_dtype, "rules": rules})


def load_recipe_toml(path: Path) -> QuantRecipe:
    """TOML: ``name``, ``float_dtype``, ``[[rules]] pattern = ... bits = ... group_size = ...`` (or ``float = true``)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc}") from None
    rules = []
    for i, raw in enumerate(data.get("rules", [])):
        raw = dict(raw)
        pattern = raw.pop("pattern", None)
        if pattern is None:
            raise ConfigError(f"{path}: rules[{i}] needs a 'pattern'")
        keep_float = raw.pop("float", False)
        cfg = None if keep_float else from_dict(QuantConfig, raw, where=f"{path}: rules[{i}]")
        rules.append(QuantRule(pattern, cfg))
    if not rules:
        raise ConfigError(f"{path}: a recipe needs at least one [[rules]] entry")
    extra = set(data) - {"name", "rules", "float_dtype"}
    if extra:
        raise ConfigError(f"{path}: unknown key(s) {sorted(extra)}")
    return QuantRecipe(data.get("name", Path(path).stem), tuple(rules), data.get("float_dtype", "fp16"))
