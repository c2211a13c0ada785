"""Reading a checkpoint directory: config.json -> family -> components built on the meta device,
tensors checked one by one against what each component expects, then assigned.

Tensors come from safetensors (single ``model.safetensors`` or shards listed in
``model.safetensors.index.json``, memory-mapped: see safetensors_io) or, for side files a family declares (VITA-1.5's TTS), from
``.pt`` files read only with ``torch.load(weights_only=True)``. Every mismatch is collected and
reported by tensor name in one CheckpointError.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omni_export.errors import CheckpointError, UnknownModelTypeError
from omni_export.export.families import FAMILIES, MODEL_TYPES, ComponentSpec, Family
from omni_export.export.safetensors_io import SafetensorsFile
from omni_export.export.weight_norm import fold, magnitude_shape, normed_weights, stored_pair
from omni_export.files import read_json

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_MAX_LISTED = 20


def detect_family(root: Path) -> tuple[Family, dict[str, Any]]:
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    cfg = read_json(root / "config.json")
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise UnknownModelTypeError(
            f"{root / 'config.json'}: model_type {model_type!r} is not supported; supported: "
            f"{', '.join(MODEL_TYPES.names())} (families: {', '.join(FAMILIES.names())})."
        )
    return MODEL_TYPES.get(model_type), cfg


def read_family_config(root: str | Path) -> tuple[Family, Any]:
    """The family and its parsed config, without touching weights (fit checks, planning)."""
    family, cfg_json = detect_family(Path(root))
    return family, family.read_config(Path(root), cfg_json)


def _flatten(data: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """A state dict, or one level of named state dicts (TiCodec's {"generator": ..., ...}) as
    ``name.key``; a lone ``model`` entry is the state dict itself (VITA's TTS loader reads
    ``snapshot["model"]`` when there is one). None for anything else."""
    if list(data) == ["model"] and isinstance(data["model"], dict):
        data = data["model"]
    out: dict[str, torch.Tensor] = {}
    for k, v in data.items():
        if isinstance(v, torch.Tensor):
            out[k] = v
        elif isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values()):
            out.update((f"{k}.{n}", t) for n, t in v.items())
        else:
            return None
    return out


class TensorSource:
    """Lazy access to the tensors of one source (the root safetensors set or one .pt file)."""

    def __init__(self, root: Path, source: str) -> None:
        self.root, self.source = root, source
        self._files: dict[str, Any] = {}
        self.locations: dict[str, str] = {}  # tensor name -> file name (relative)
        self._pt: dict[str, torch.Tensor] | None = None
        if source:
            self._open_pt(root / source)
        else:
            self._open_safetensors()

    def _open_safetensors(self) -> None:
        index_path, single = self.root / INDEX, self.root / SINGLE
        if index_path.is_file():
            index = read_json(index_path)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path} has no 'weight_map' object")
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                keys = self._open_shard(shard)
                listed = {k for k, v in weight_map.items() if v == shard}
                if listed - keys:
                    raise CheckpointError(
                        f"{shard}: tensors listed in {INDEX} are not in the shard: {_names(listed - keys)}"
                    )
                if keys - listed:
                    raise CheckpointError(
                        f"{shard}: holds tensors {INDEX} does not list: {_names(keys - listed)}; "
                        "the index and the shards are out of step."
                    )
                for k in keys:
                    self.locations[k] = shard
        elif single.is_file():
            for k in self._open_shard(SINGLE):
                self.locations[k] = SINGLE
        else:
            raise CheckpointError(f"{self.root} has neither {SINGLE} nor {INDEX}; no weights to load.")

    def _open_shard(self, name: str) -> set[str]:
        path = self.root / name
        if not path.is_file():
            raise CheckpointError(f"weight shard {path} is missing")
        handle = SafetensorsFile(path)
        self._files[name] = handle
        return handle.keys()

    def _open_pt(self, path: Path) -> None:
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # UnpicklingError for non-tensor payloads, RuntimeError for truncation
            raise CheckpointError(
                f"cannot load {path} with torch.load(weights_only=True): {exc}. Only plain tensor "
                "state dicts are accepted; a file that needs arbitrary unpickling is refused."
            ) from None
        flat = _flatten(data) if isinstance(data, dict) else None
        if flat is None:
            raise CheckpointError(f"{path} must hold a dict of tensor name -> tensor, or of module name -> such a dict")
        data = flat
        self._pt = data
        self.locations = {k: self.source for k in data}

    def get(self, name: str) -> torch.Tensor:
        if self._pt is not None:
            return self._pt[name]
        return self._files[self.locations[name]].get(name)

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        if self._pt is not None:
            t = self._pt[name]
            return tuple(t.shape), t.dtype
        return self._files[self.locations[name]].shape_dtype(name)


def _names(names: Iterable[str]) -> str:
    names = sorted(names)
    more = f" (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def meta_build(spec: ComponentSpec) -> nn.Module:
    with torch.device("meta"):
        return spec.build()


def _check_pair(pair: tuple[str, str], src: TensorSource, component: str, shape: tuple[int, ...]) -> list[str]:
    (g_shape, _), (v_shape, _) = (src.shape_dtype(n) for n in pair)
    problems = []
    if v_shape != shape:
        problems.append(f"tensor {pair[1]!r} has shape {list(v_shape)}, {component} expects {list(shape)}")
    if g_shape != magnitude_shape(shape):
        problems.append(f"tensor {pair[0]!r} has shape {list(g_shape)}, {component} expects {list(magnitude_shape(shape))} "
                        "(a weight norm over dim 0)")  # fmt: skip
    return problems


def plan(specs: Iterable[ComponentSpec], sources: dict[str, TensorSource]) -> dict[str, dict[str, str | tuple[str, str]]]:
    """Match checkpoint tensors to component parameters: spec name -> {module key: checkpoint key}.

    A weight the module stores weight-normalised maps to its (magnitude, direction) pair when the
    checkpoint holds that instead of the plain weight. Raises one CheckpointError naming every missing, unexpected, mis-shaped or mis-typed tensor.
    """
    problems: list[str] = []
    claimed: dict[str, set[str]] = {s: set() for s in sources}
    result: dict[str, dict[str, str]] = {}
    for spec in specs:
        src = sources[spec.source]
        module = meta_build(spec)
        mapping: dict[str, str | tuple[str, str]] = {}
        normed = normed_weights(module)
        for key, expected in module.state_dict().items():
            ckpt_key = spec.to_checkpoint_name(key)
            where = spec.source or "safetensors"
            pair = stored_pair(ckpt_key, src.locations) if key in normed and ckpt_key not in src.locations else None
            if pair is not None:
                problems += _check_pair(pair, src, spec.name, tuple(expected.shape))
                mapping[key] = pair
                claimed[spec.source].update(pair)
                continue
            if ckpt_key not in src.locations:
                problems.append(f"missing tensor {ckpt_key!r} ({spec.name}.{key}, shape {list(expected.shape)}) in {where}")
                continue
            shape, dtype = src.shape_dtype(ckpt_key)
            if shape != tuple(expected.shape):
                problems.append(f"tensor {ckpt_key!r} has shape {list(shape)}, {spec.name} expects {list(expected.shape)}")
            elif dtype.is_floating_point != expected.dtype.is_floating_point:
                problems.append(f"tensor {ckpt_key!r} has dtype {dtype}, {spec.name} expects {expected.dtype}")
            mapping[key] = ckpt_key
            claimed[spec.source].add(ckpt_key)
        result[spec.name] = mapping
    for spec in specs:
        if spec.ignored:
            claimed[spec.source].update(k for k in sources[spec.source].locations if k.startswith(spec.ignored))
    for name, src in sources.items():
        extra = set(src.locations) - claimed[name]
        if extra:
            problems.append(f"unexpected tensor(s) in {name or 'safetensors'}: {_names(extra)}")
    if problems:
        shown = "\n  - ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise CheckpointError(
            f"checkpoint does not match its config ({len(problems)} problem(s)):\n  - {shown}{more}\n"
            "Check that config.json belongs to these weights."
        )
    return result


@dataclass
class Checkpoint:
    root: Path
    family: Family
    config: Any
    components: dict[str, nn.Module]
    tokenizer: Any  # tokenizers.Tokenizer
    special_ids: dict[str, int]
    specs: dict[str, ComponentSpec] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """sha256 over config files, the index and each weight file's name, size and header.

        Cheap enough for 16 GB checkpoints; any change to shapes, names or file sizes changes it."""
        h = hashlib.sha256()
        for path in sorted(self.root.rglob("*")):
            if not path.is_file():
                continue
            rel = path.relative_to(self.root).as_posix()
            h.update(rel.encode())
            h.update(str(path.stat().st_size).encode())
            with path.open("rb") as f:
                h.update(f.read(1 << 20))
        return h.hexdigest()


def load_tokenizer(root: Path):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer

    path = root / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint needs its tokenizer.")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def load_checkpoint(
    root: str | Path,
    dtype: torch.dtype | None = None,
    components: Iterable[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Checkpoint:
    """Load a checkpoint. ``dtype`` None keeps the stored float dtype (memory-mapped where the
    file allows); ``components`` restricts which components are materialised (all are checked)."""
    root = Path(root)
    family, cfg = read_family_config(root)
    specs = list(family.specs(cfg))
    sources = {s: TensorSource(root, s) for s in dict.fromkeys(sp.source for sp in specs)}
    mapping = plan(specs, sources)
    wanted = set(components) if components is not None else {s.name for s in specs}
    unknown = wanted - {s.name for s in specs}
    if unknown:
        raise CheckpointError(f"unknown component(s) {sorted(unknown)}; {family.name} has {[s.name for s in specs]}")
    built: dict[str, nn.Module] = {}
    for spec in specs:
        if spec.name not in wanted:
            continue
        if progress:
            progress(spec.name)
        module = meta_build(spec)
        src = sources[spec.source]
        state = {}
        for key, ckpt_key in mapping[spec.name].items():
            t = fold(src.get(ckpt_key[0]), src.get(ckpt_key[1])) if isinstance(ckpt_key, tuple) else src.get(ckpt_key)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            state[key] = t
        module.load_state_dict(state, strict=True, assign=True)
        built[spec.name] = module.eval()
    tokenizer = load_tokenizer(root)
    # A placeholder must be an added *special* token: otherwise it is split when the prompt is encoded.
    added = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    missing = [t for t in family.special_tokens if t not in added]
    if missing:
        raise CheckpointError(f"{root / 'tokenizer.json'} lacks the special token(s) {missing} that {family.name} needs")
    special_ids = {t: added[t] for t in family.special_tokens}
    return Checkpoint(root, family, cfg, built, tokenizer, special_ids, {s.name: s for s in specs})
