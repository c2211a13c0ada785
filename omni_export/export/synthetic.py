"""Synthetic checkpoints in each family's exact on-disk layout, for when no weights can be
downloaded. Weights are random (well-scaled: norms at one, biases at zero, Whisper positions
sinusoidal), generated tensor by tensor from a meta-device model and flushed shard by shard,
so a full 8B-shaped checkpoint is written with about one shard of RAM."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from omni_export.errors import OmniExportError
from omni_export.export import tokenizer as tokenizer_mod
from omni_export.export.checkpoint import INDEX, SINGLE
from omni_export.export.components.layers import RMSNorm, sinusoids
from omni_export.export.families import FAMILIES, MAIN_WEIGHTS, ComponentSpec

SHARD_BYTES = {"tiny": 1 << 20, "small": 100 << 20, "full": 2 << 30}
STD = 0.02


def _owner_types(module: nn.Module) -> dict[str, type]:
    owners = {}
    for mname, mod in module.named_modules():
        for pname, _ in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            owners[f"{mname}.{pname}" if mname else pname] = type(mod)
    return owners


def init_tensor(key: str, like: torch.Tensor, owner: type, gen: torch.Generator) -> torch.Tensor:
    """A plausible random value for one parameter, chosen by its name and owning module type."""
    shape = tuple(like.shape)
    leaf = key.rsplit(".", 1)[-1]
    if key.endswith("embed_positions.weight"):
        return sinusoids(*shape)
    if not like.dtype.is_floating_point:  # e.g. a codec's default global codes
        return torch.randint(0, 64, shape, generator=gen, dtype=like.dtype)
    if leaf in ("ls1", "ls2"):
        return torch.full(shape, 0.1)
    if key.endswith("global_cmvn.mean"):
        return torch.full(shape, 10.0)  # log-mel energies of speech sit around here
    if key.endswith("global_cmvn.istd"):
        return torch.full(shape, 0.3)
    if issubclass(owner, (nn.LayerNorm, RMSNorm)):
        return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
    if leaf == "bias":
        return torch.zeros(shape)
    if leaf == "default_speaker_embedding":
        return torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen) * STD


def _tensors(spec: ComponentSpec, gen: torch.Generator, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    with torch.device("meta"):
        module = spec.build()
    owners = _owner_types(module)
    for key, like in module.state_dict().items():
        t = init_tensor(key, like, owners.get(key, nn.Module), gen)
        yield spec.to_checkpoint_name(key), (t.to(dtype) if t.is_floating_point() else t)


def _write_safetensors(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, shard_bytes: int) -> None:
    from safetensors.torch import save_file

    current: dict[str, torch.Tensor] = {}
    size = total = 0
    names: list[list[str]] = []

    def flush() -> None:
        nonlocal current, size
        if current:
            save_file(current, str(out / f".shard-{len(names):05d}.tmp"), metadata={"format": "pt"})
            names.append(list(current))
            current, size = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_bytes:
            flush()
        current[name] = t.contiguous()
        size += nbytes
        total += nbytes
    flush()
    n = len(names)
    if n == 1:
        os.replace(out / ".shard-00000.tmp", out / SINGLE)
        return
    weight_map = {}
    for i, keys in enumerate(names):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(out / f".shard-{i:05d}.tmp", out / fname)
        weight_map.update({k: fname for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=2))


def write_synthetic(
    family_name: str,
    size: str,
    out: str | Path,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic checkpoint to ``out`` atomically (built beside it, renamed when whole)."""
    family = FAMILIES.get(family_name)
    if size not in family.sizes:
        raise OmniExportError(f"{family_name} has sizes {', '.join(family.sizes)}; got {size!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise OmniExportError(f"{out} already exists; remove it or pass another --out.")
    cfg = family.preset(size)
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        tok_size = "full" if size.startswith("full") else size
        if progress:
            progress("tokenizer")
        tok = tokenizer_mod.train(tokenizer_mod.SIZES[tok_size], family.special_tokens)
        llm_vocab = family.llm_config(cfg).vocab_size
        if tok.get_vocab_size() > llm_vocab:
            raise OmniExportError(f"tokenizer has {tok.get_vocab_size()} tokens, more than the LLM's {llm_vocab} rows")
        tokenizer_mod.save(tok, tmp, family.special_tokens, family.llm_config(cfg).max_position_embeddings)
        for rel, content in family.config_files(cfg).items():
            if rel.endswith("generation_config.json"):
                content = {**content, "eos_token_id": [tok.token_to_id(t) for t in family.eos_tokens],
                           "pad_token_id": tok.token_to_id("<|endoftext|>")}  # fmt: skip
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(json.dumps(content, indent=2))
        gen = torch.Generator().manual_seed(seed)
        specs = list(family.specs(cfg))

        def main_tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for spec in specs:
                if spec.source == MAIN_WEIGHTS:
                    if progress:
                        progress(spec.name)
                    yield from _tensors(spec, gen, torch.bfloat16)

        _write_safetensors(main_tensors(), tmp, SHARD_BYTES[tok_size])
        side: dict[str, dict[str, torch.Tensor]] = {}
        for spec in specs:
            if spec.source != MAIN_WEIGHTS:
                if progress:
                    progress(spec.name)
                # The released TTS files are fp32 torch state dicts.
                side.setdefault(spec.source, {}).update(_tensors(spec, gen, torch.float32))
        for rel, state in side.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, str(tmp / rel))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
