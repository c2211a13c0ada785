"""The manifest schema (versioned). The runtime reads everything it needs from here, never from flags.

{
  "schema_version": 1,
  "toolchain": {"omni_export": ..., "torch": ..., "executorch": ...},
  "family": "interactiveomni", "model_type": ...,
  "source": {"path": ..., "fingerprint": sha256},
  "profile": {"name", "target", "description", "max_context"},
  "quant": {"preset": "fp32", "float_dtype": "fp32"},
  "model": {special ids, eos ids, placeholder ids, sample rates, tile size, tokens per tile,
            speech chunking, ...},
  "components": {NAME: {"file", "backend", "methods": {M: {"inputs": [{name, dtype, shape}], "outputs": [...]}},
                        "kv_cache": {...} | null, "golden": "golden/NAME.npz", "delegation": {...}}},
  "files": {RELPATH: {"sha256", "bytes"}}      # every file in the bundle but manifest.json
}
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from omni_export.errors import OmniExportError
from omni_export.files import read_json

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
REQUIRED = ("schema_version", "toolchain", "family", "source", "profile", "quant", "model", "components", "files")
COMPONENT_REQUIRED = ("file", "backend", "methods")


class BundleError(OmniExportError):
    """A bundle is missing, malformed or does not match its manifest."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def schema_problems(m: dict[str, Any]) -> list[str]:
    problems = [f"manifest lacks {k!r}" for k in REQUIRED if k not in m]
    if problems:
        return problems
    if m["schema_version"] != SCHEMA_VERSION:
        problems.append(f"schema_version {m['schema_version']!r} is not {SCHEMA_VERSION}; use a matching omni-export")
    if not isinstance(m["components"], dict) or not m["components"]:
        problems.append("manifest lists no components")
        return problems
    for name, c in m["components"].items():
        problems += [f"component {name!r} lacks {k!r}" for k in COMPONENT_REQUIRED if k not in c]
        for meth, io in (c.get("methods") or {}).items():
            for side in ("inputs", "outputs"):
                for t in io.get(side, []):
                    if not {"name", "dtype", "shape"} <= set(t):
                        problems.append(f"{name}.{meth}: an {side[:-1]} lacks name/dtype/shape")
        if c.get("file") not in m["files"]:
            problems.append(f"component {name!r}: its file {c.get('file')!r} is not listed under 'files'")
    return problems


def read_manifest(bundle: Path) -> dict[str, Any]:
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"{bundle} is not a bundle directory")
    m = read_json(bundle / MANIFEST, error=BundleError)
    problems = schema_problems(m)
    if problems:
        raise BundleError(f"{bundle / MANIFEST} is malformed:\n  - " + "\n  - ".join(problems))
    return m


def io_names(component: dict[str, Any], method: str) -> tuple[list[str], list[str]]:
    io = component["methods"][method]
    return [t["name"] for t in io["inputs"]], [t["name"] for t in io["outputs"]]
