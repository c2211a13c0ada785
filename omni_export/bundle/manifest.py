"""The bundle manifest: typed, versioned, read and written here only. The runtime reads
everything it needs from it, never from flags. Every bundle also carries the JSON Schema of this
format (``manifest.schema.json``) for app teams that read it in their own language.

Schema 2 (this one): a component may own several files (``.onnx`` graphs and their external data,
a ``.mlpackage`` directory's files) and names, per method, the entry that runs it (a program
method, a graph file, or a Core ML package's function as ``package#function``); the KV cache layout is structured data; files built later on the device
(TensorRT engines) have their own section, ``device_files``. Schema 1 bundles (omni-export 0.1)
are refused with a message saying to rebuild."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omni_export.configs import from_dict, json_schema, to_dict
from omni_export.errors import ConfigError, OmniExportError
from omni_export.files import atomic_write_text, read_json

MANIFEST = "manifest.json"
SCHEMA_FILE = "manifest.schema.json"
SCHEMA_VERSION = 2


class BundleError(OmniExportError):
    """A bundle is missing, malformed or does not match its manifest."""


@dataclass(frozen=True)
class TensorSpec:
    """A named input or output; string dims are symbolic (``tokens``, ``tiles*256``)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class MethodEntry:
    """One method of a component: its I/O contract and what runs it."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    entry: str  # a program method name (.pte), a graph file relative to the bundle (.onnx), package#function (Core ML)
    flops_per_position: float | None = None
    # symbolic dim -> the only sizes the artifact takes (Core ML enumerated shapes: a caller
    # splits a longer prefill into these); empty: any size in the traced range
    enumerated: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # Where it runs when not where the profile's runtime settings say, and why (Core ML: a
    # function with a flexible shape runs on CPU and GPU, not the Neural Engine)
    compute_units: str = ""
    compute_units_reason: str = ""


EXPLICIT_KV = ("io", "static-io")  # caches the caller passes in and takes back


@dataclass(frozen=True)
class KVLayout:
    """How a component's decoder stack holds its KV cache. ``held_as``: ``buffers`` (inside the
    program, zeroed by its reset method), ``state`` (Core ML states), ``io`` (tensors the caller
    passes in after the method's inputs, in ``inputs`` order, and takes back after its outputs,
    in ``outputs`` order; they start with 0 positions and grow by each call's), ``static-io``
    (the same names, but every tensor always has max_len positions: the caller allocates them
    once, zeroed, and each call returns them with its own positions written; bind the same
    buffer as past input and present output and the runtime writes in place). One tensor per
    layer for K and for V, shaped by ``axes`` (``positions`` is max_len except for ``io``)."""

    held_as: str
    layers: int
    kv_heads: int
    head_dim: int
    max_len: int
    dtype: str
    axes: tuple[str, ...]
    methods: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()

    def shape(self, positions: int) -> tuple[int, ...]:
        sizes = {"batch": 1, "kv_heads": self.kv_heads, "positions": positions, "head_dim": self.head_dim}
        return tuple(sizes[a] for a in self.axes)

    @property
    def in_place(self) -> bool:
        """static-io: the caller binds each past tensor as its own present output."""
        return self.held_as == "static-io"

    @property
    def initial_positions(self) -> int:
        """Positions of the cache tensors an explicit-cache caller starts a conversation with."""
        return 0 if self.held_as == "io" else self.max_len


@dataclass(frozen=True)
class Delegation:
    """How much of one method's graph a backend delegate runs."""

    delegated_nodes: int
    portable_nodes: int
    subgraphs: int
    share: float
    portable_ops: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class QuantSummary:
    linears: int
    kinds: dict[str, int]
    activations: str
    weight_bytes: int
    # Quantized embedding tables: module path -> how each is stored ("int8 per row"), and their bytes.
    tables: dict[str, str] = field(default_factory=dict)
    table_bytes: int = 0
    # Tied heads quantized as their table: head path -> table path; ``stored_once`` where the
    # artifact keeps those codes once for both (then weight_bytes leaves the head out).
    tied_heads: dict[str, str] = field(default_factory=dict)
    stored_once: bool = False


@dataclass(frozen=True)
class ComponentEntry:
    """A component: its files, backend, methods, cache and precision."""

    backend: str  # the runtime that opens it on the device
    files: tuple[str, ...]  # every file it owns, relative to the bundle
    methods: dict[str, MethodEntry]
    role: str
    precision: str  # precision class: fp32 | fp16 | int8 | w8a8 | int4 | int4-all
    golden: str
    parity_backend: str = ""  # the host runtime that replays the same artifact; "" when none exists
    description: str = ""
    kv_cache: KVLayout | None = None
    quant: QuantSummary | None = None
    delegation: dict[str, Delegation] = field(default_factory=dict)

    def io_names(self, method: str) -> tuple[list[str], list[str]]:
        m = self.methods[method]
        return [t.name for t in m.inputs], [t.name for t in m.outputs]


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class DeviceFile:
    """A file built on the device from one of the bundle's files (a TensorRT engine)."""

    component: str
    built_from: str
    builder: str
    builder_version: str
    device: str
    sha256: str
    bytes: int
    built_at: str = ""


@dataclass(frozen=True)
class RuntimeSettings:
    """What sessions open with on the profile's device (0 threads: every core the process may use)."""

    threads: int = 0
    compute_units: str = ""
    providers: tuple[str, ...] = ()  # ONNX Runtime execution providers, in order
    options: dict[str, str] = field(default_factory=dict)  # backend session options, passed as they are


@dataclass(frozen=True)
class ProfileEntry:
    name: str
    target: str
    description: str
    max_context: int
    bandwidth_gbs: float
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)


@dataclass(frozen=True)
class RuleEntry:
    pattern: str
    roles: tuple[str, ...]
    config: dict[str, Any] | None


@dataclass(frozen=True)
class QuantEntry:
    recipe: str  # the recipe's name (a preset, or a TOML's name): a label, never looked up again
    float_dtype: str
    rules: tuple[RuleEntry, ...]
    embeddings: dict[str, Any] | None = None  # the recipe's config for decoders' embedding tables


@dataclass(frozen=True)
class Source:
    path: str
    fingerprint: str


@dataclass(frozen=True)
class Manifest:
    """manifest.json of an omni-export bundle."""

    schema_version: int
    toolchain: dict[str, str]
    family: str
    source: Source
    profile: ProfileEntry
    quant: QuantEntry
    model: dict[str, Any]  # the family's runtime settings: ids, rates, tiling, speech chunking
    components: dict[str, ComponentEntry]
    files: dict[str, FileEntry]  # every file but manifest.json and device_files
    device_files: dict[str, DeviceFile] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=2)

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)


def schema() -> dict[str, Any]:
    return json_schema(Manifest, "omni-export bundle manifest (schema 2)")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path) -> FileEntry:
    return FileEntry(sha256_file(path), path.stat().st_size)


def parse_manifest(data: dict[str, Any], where: str = MANIFEST) -> Manifest:
    """A Manifest from its JSON, or a BundleError that names every problem found."""
    version = data.get("schema_version")
    if version == 1:
        raise BundleError(f"{where}: schema 1 bundle (omni-export 0.1), which this omni-export no longer reads; "
                          "rebuild it: omni-export --target PROFILE --model CHECKPOINT --out BUNDLE")  # fmt: skip
    if version != SCHEMA_VERSION:
        raise BundleError(f"{where}: schema_version {version!r} is not {SCHEMA_VERSION}; use the omni-export that built it, or rebuild")
    try:
        m = from_dict(Manifest, data, where=where)
    except ConfigError as exc:
        raise BundleError(f"{where} is malformed: {exc}") from None
    problems = consistency_problems(m)
    if problems:
        raise BundleError(f"{where} is malformed:\n  - " + "\n  - ".join(problems))
    return m


def consistency_problems(m: Manifest) -> list[str]:
    """What the types cannot say: references between sections."""
    problems = []
    if not m.components:
        problems.append("manifest lists no components")
    for name, c in m.components.items():
        problems += [f"component {name!r}: its file {f!r} is not listed under 'files'" for f in c.files if f not in m.files]
        if c.golden not in m.files:
            problems.append(f"component {name!r}: its golden file {c.golden!r} is not listed under 'files'")
        if not c.methods:
            problems.append(f"component {name!r} has no methods")
        kv = c.kv_cache
        if kv is not None:
            problems += [f"component {name!r}: KV cache method {meth!r} is not one of its methods" for meth in kv.methods if meth not in c.methods]
            if kv.held_as in EXPLICIT_KV and not (len(kv.inputs) == len(kv.outputs) == 2 * kv.layers):
                problems.append(f"component {name!r}: an io KV cache needs {2 * kv.layers} input and output names")
    problems += _model_problems(m)
    for rel, d in m.device_files.items():
        if d.component not in m.components:
            problems.append(f"device file {rel!r}: component {d.component!r} is not in the bundle")
        if rel in m.files:
            problems.append(f"device file {rel!r} is also listed under 'files'")
    return problems


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _model_problems(m: Manifest) -> list[str]:
    """The model settings the runtime obeys, against what the artifacts were built for: token ids
    inside the LLM's vocabulary (its logits' width), the context within every KV cache's traced
    length, the prefill chunk within the context."""
    problems = []
    cfg = m.model
    llm = m.components.get("llm")
    logits = next((t for e in (llm.methods.values() if llm else ()) for t in e.outputs if t.name == "logits"), None)
    vocab = logits.shape[-1] if logits is not None and logits.shape and _is_int(logits.shape[-1]) else None
    ids = {"eos_ids": cfg.get("eos_ids"), "image_token_id": cfg.get("image_token_id"), "audio_token_id": cfg.get("audio_token_id")}
    for key, value in ids.items():
        values = value if isinstance(value, list) else [value]
        if value is None or (key == "eos_ids" and not (isinstance(value, list) and value)) or not all(_is_int(v) for v in values):
            problems.append(f"model.{key} must be {'a non-empty list of token ids' if key == 'eos_ids' else 'a token id'}, got {value!r}")
        elif vocab is not None and any(not 0 <= v < vocab for v in values):
            problems.append(f"model.{key} {value!r} is outside the LLM's vocabulary (0..{vocab - 1})")
    context, chunk = cfg.get("max_context"), cfg.get("prefill_chunk")
    if not _is_int(context) or context < 1:
        problems.append(f"model.max_context must be a positive integer, got {context!r}")
    else:
        if context != m.profile.max_context:
            problems.append(f"model.max_context {context} differs from profile.max_context {m.profile.max_context}")
        problems += [f"model.max_context {context} is beyond component {n!r}'s KV cache ({c.kv_cache.max_len} positions, as traced)"
                     for n, c in m.components.items() if c.kv_cache is not None and c.kv_cache.max_len < context]  # fmt: skip
        if not _is_int(chunk) or not 1 <= chunk <= context:
            problems.append(f"model.prefill_chunk must be an integer in 1..max_context ({context}), got {chunk!r}")
    return problems


def read_manifest(bundle: Path) -> Manifest:
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"{bundle} is not a bundle directory")
    return parse_manifest(read_json(bundle / MANIFEST, error=BundleError), str(bundle / MANIFEST))


def write_manifest(bundle: Path, m: Manifest) -> Path:
    return atomic_write_text(Path(bundle) / MANIFEST, m.to_json())


def write_schema(bundle: Path) -> Path:
    return atomic_write_text(Path(bundle) / SCHEMA_FILE, json.dumps(schema(), indent=1))
