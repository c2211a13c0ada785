"""``omni-export verify``: the manifest parses (schema 2, typed, references consistent, model
settings within what the artifacts were built for), every listed file is present with its size
and sha256, nothing is unlisted, every artifact has the methods, inputs and outputs the manifest
says (read by its backend's library), and files built on the device (TensorRT engines) match their
own section when they are there."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from omni_export.bundle.manifest import (
    MANIFEST,
    BundleError,
    FileEntry,
    Manifest,
    parse_manifest,
    read_json,
    sha256_file,
)


@dataclass
class Verification:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. which device-built files are present
    manifest: Manifest | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_file(bundle: Path, rel: str, entry: FileEntry) -> str | None:
    path = bundle / rel
    if not path.is_file():
        return f"{rel}: missing"
    size = path.stat().st_size
    if size != entry.bytes:
        return f"{rel}: {size} bytes, manifest says {entry.bytes}"
    if sha256_file(path) != entry.sha256:
        return f"{rel}: sha256 differs from the manifest (the file was modified or corrupted)"
    return None


def check_bundle_files(bundle: Path) -> Verification:
    bundle = Path(bundle)
    out = Verification()
    if not bundle.is_dir():
        out.problems.append(f"{bundle} is not a directory")
        return out
    try:
        m = parse_manifest(read_json(bundle / MANIFEST, error=BundleError), MANIFEST)
    except BundleError as exc:
        out.problems.append(str(exc))
        return out
    out.manifest = m
    damaged = set()
    for rel, entry in sorted(m.files.items()):
        problem = _check_file(bundle, rel, entry)
        if problem:
            out.problems.append(problem)
            damaged.add(rel)
    present = []
    for rel, d in sorted(m.device_files.items()):
        if not (bundle / rel).exists():
            out.problems.append(f"{rel}: recorded as built on the device ({d.builder} {d.builder_version}, {d.device}) but missing")
            continue
        problem = _check_file(bundle, rel, FileEntry(d.sha256, d.bytes))
        if problem:
            out.problems.append(problem + " (a file built on the device)")
        present.append(rel)
    if m.device_files:
        out.notes.append(f"files built on the device: {len(present)} ({', '.join(present)})")
    out.notes += _planned_device_files(bundle, m)
    out.problems += _interface_problems(bundle, m, damaged)
    listed = set(m.files) | set(m.device_files) | {MANIFEST}
    for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
        rel = path.relative_to(bundle).as_posix()
        if rel not in listed:
            out.problems.append(f"{rel}: not listed in the manifest")
    return out


def _interface_problems(bundle: Path, m: Manifest, damaged: set[str]) -> list[str]:
    """Each component's artifacts against its manifest entry (methods, inputs, outputs), read by
    its backend's own library; components with a missing or altered file are already reported."""
    from omni_export.runtime_py.backends import SESSIONS

    problems = []
    for name, c in m.components.items():
        if damaged & set(c.files) or c.backend not in SESSIONS:
            continue
        try:
            problems += [f"component {name!r}: {p}" for p in SESSIONS.get(c.backend).interface_problems(c, bundle)]
        except ImportError as exc:  # the backend's library is not on this host: the check cannot be made here
            problems.append(f"component {name!r}: cannot read its {c.backend} artifacts on this host ({exc}); install it to verify")
    return problems


DEVICE_PLANS = {"tensorrt/build_plan.json": ("TensorRT engines", "python tensorrt/build_engines.py (or omni-export build-engines BUNDLE) on the device")}


def _planned_device_files(bundle: Path, m) -> list[str]:  # type: ignore[no-untyped-def]
    """Whether the files a bundle builds on its device are there yet (a bundle is valid either way)."""
    notes = []
    for plan_file, (what, how) in DEVICE_PLANS.items():
        if plan_file not in m.files:
            continue
        planned = [e["engine"] for e in json.loads((bundle / plan_file).read_text())["engines"]]
        built = [p for p in planned if p in m.device_files]
        notes.append(f"{what}: {len(built)} of {len(planned)} built" + ("" if built else f" (not built yet: {how})"))
    return notes


def verify_bundle(bundle: Path) -> list[str]:
    """Every problem found, each naming its file; empty when the bundle is intact."""
    return check_bundle_files(bundle).problems
