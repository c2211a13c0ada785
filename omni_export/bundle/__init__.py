"""Bundles: a directory with manifest.json, artifacts, tokenizer, golden I/O, reports and a README
for the app team. Written atomically; verified by hash."""

from omni_export.bundle.manifest import MANIFEST, SCHEMA_VERSION, read_manifest
from omni_export.bundle.verify import verify_bundle

__all__ = ["MANIFEST", "SCHEMA_VERSION", "read_manifest", "verify_bundle"]
