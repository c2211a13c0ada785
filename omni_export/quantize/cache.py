"""QuantResults cached on disk, keyed by the checkpoint (fingerprint plus each weight file's
mtime, since the fingerprint reads only each file's head) and the recipe's full content."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omni_export.files import cache_dir
from omni_export.quantize.engine import Progress, plan, quantize_components
from omni_export.quantize.recipe import QuantRecipe
from omni_export.quantize.result import QuantResult

log = logging.getLogger(__name__)
# Bump when calibration data or an algorithm changes what a recipe produces.
ALGORITHM_VERSION = 2  # 2: static activation scales for quantized activations


def cache_key(ckpt: Any, fingerprint: str, recipe: QuantRecipe, samples: int) -> str:
    h = hashlib.sha256()
    mtimes = sorted((p.name, p.stat().st_mtime_ns) for p in Path(ckpt.root).rglob("*") if p.is_file())
    payload = {"fingerprint": fingerprint, "mtimes": mtimes, "rules": [asdict(r) for r in recipe.rules],
               "embeddings": asdict(recipe.embeddings) if recipe.embeddings else None, "tied_head": recipe.tied_head,
               "samples": samples, "version": ALGORITHM_VERSION}  # fmt: skip
    h.update(json.dumps(payload, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def quantize_checkpoint(ckpt: Any, recipe: QuantRecipe, progress: Progress | None = None, samples: int = 8,
                        use_cache: bool = True) -> tuple[QuantResult, Path]:  # fmt: skip
    """The recipe's QuantResult for ``ckpt`` (a loaded Checkpoint), from the cache when there."""
    plan(ckpt.components, recipe)  # validates the recipe and unties heads, cached or not
    fingerprint = ckpt.fingerprint()
    key = cache_key(ckpt, fingerprint, recipe, samples)
    where = cache_dir() / "quant" / key
    if use_cache and (where / "result.json").is_file():
        log.info("quantization %s: cached at %s", recipe.name, where)
        return QuantResult.load(where), where
    result = quantize_components(ckpt.components, recipe, fingerprint, ckpt.tokenizer, progress, samples)
    if use_cache:
        result.save(where)
        result = QuantResult.load(where)  # memory-mapped: the codes leave memory until a build reads them
    return result, where
