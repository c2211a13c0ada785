"""``omni-export verify``: schema, presence and sha256 of every file, nothing unlisted."""

from __future__ import annotations

from pathlib import Path

from omni_export.bundle.manifest import (
    MANIFEST,
    BundleError,
    read_json,
    schema_problems,
    sha256_file,
)


def verify_bundle(bundle: Path) -> list[str]:
    """Every problem found, each naming its file; empty when the bundle is intact."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        return [f"{bundle} is not a directory"]
    try:
        m = read_json(bundle / MANIFEST, error=BundleError)
    except BundleError as exc:
        return [str(exc)]
    problems = schema_problems(m)
    if "files" not in m or not isinstance(m["files"], dict):
        return problems
    for rel, entry in sorted(m["files"].items()):
        path = bundle / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = path.stat().st_size
        if size != entry.get("bytes"):
            problems.append(f"{rel}: {size} bytes, manifest says {entry.get('bytes')}")
        elif sha256_file(path) != entry.get("sha256"):
            problems.append(f"{rel}: sha256 differs from the manifest (the file was modified or corrupted)")
    listed = set(m["files"]) | {MANIFEST}
    for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
        rel = path.relative_to(bundle).as_posix()
        if rel not in listed:
            problems.append(f"{rel}: not listed in the manifest")
    return problems
