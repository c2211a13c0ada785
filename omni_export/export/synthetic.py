"""Synthetic checkpoints in each family's exact on-disk layout, for when no weights can be
downloaded. Weights are random (well-scaled: norms at one, biases at zero, Whisper positions
sinusoidal), generated tensor by tensor from a meta-device model and streamed into shards whose headers are written
first, so a full 8B-shaped checkpoint is written with about one tensor of RAM."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omni_export.errors import OmniExportError
from omni_export.files import replace_dir, staged_dir
from omni_export.export import tokenizer as tokenizer_mod
from omni_export.export.checkpoint import INDEX, SINGLE
from omni_export.export.components.layers import RMSNorm, sinusoids
from omni_export.export.families import FAMILIES, MAIN_WEIGHTS, ComponentSpec
from omni_export.export.safetensors_io import write_streaming
from omni_export.export.weight_norm import FORMS, magnitude_shape, normed_weights

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
    if owner is WeightNormMagnitude or leaf == "alpha":  # Snake activations start at one, as released
        return torch.ones(shape)
    if issubclass(owner, (nn.LayerNorm, RMSNorm)):
        return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
    if leaf == "bias":
        return torch.zeros(shape)
    if leaf == "weight" and issubclass(owner, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d)):
        # Fan-in scaling keeps activations near unit scale through deep conv stacks (vocoders,
        # codecs); at std 0.02 their waveform would shrink to ~1e-7 and every audio metric with it.
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(like)
        return torch.randn(shape, generator=gen).mul_(fan_in**-0.5)
    return torch.randn(shape, generator=gen).mul_(STD)


@dataclass(frozen=True)
class _Planned:
    name: str  # checkpoint name
    shape: tuple[int, ...]
    dtype: torch.dtype
    key: str  # module key
    owner: type
    like: torch.Tensor  # meta tensor


class WeightNormMagnitude(nn.Module):
    """Owner type of a weight norm's magnitude: written as ones, so each folded row has unit norm,
    which is what the fan-in scaled direction has anyway."""


def _plan(spec: ComponentSpec, dtype: torch.dtype) -> list[_Planned]:
    with torch.device("meta"):
        module = spec.build()
    owners = _owner_types(module)
    normed = normed_weights(module)
    out = []
    for k, v in module.state_dict().items():
        name, dt, owner = spec.to_checkpoint_name(k), dtype if v.is_floating_point() else v.dtype, owners.get(k, nn.Module)
        if k in normed:  # the released form: magnitude and direction (torch's parametrisation names)
            g_suffix, v_suffix = FORMS[normed[k]]
            base = name.removesuffix(".weight")
            g_shape = magnitude_shape(tuple(v.shape))
            out.append(_Planned(base + g_suffix, g_shape, dt, k + "#g", WeightNormMagnitude, torch.empty(g_shape, device="meta")))
            name = base + v_suffix
        out.append(_Planned(name, tuple(v.shape), dt, k, owner, v))
    return out


def written_layout(family: str, component: str, size: str = "full", strip: str = "") -> dict[str, tuple[int, ...]]:
    """What the synthetic writer writes for one component: checkpoint name (less ``strip``) -> shape.
    The tests hold it against tables written out from the releases."""
    fam = FAMILIES.get(family)
    spec = next(s for s in fam.specs(fam.preset(size)) if s.name == component)
    return {p.name.removeprefix(strip): tuple(p.shape) for p in _plan(spec, torch.float32)}


def _make(p: _Planned, gen: torch.Generator) -> torch.Tensor:
    t = init_tensor(p.key, p.like, p.owner, gen)
    return t.to(p.dtype) if t.is_floating_point() else t


def _write_safetensors(planned: list[_Planned], out: Path, shard_bytes: int, gen: torch.Generator,
                       progress: Callable[[str], None] | None) -> None:  # fmt: skip
    """Split into shards by declared size, then stream each shard: header first, tensors one by one."""
    shards: list[list[_Planned]] = [[]]
    size = total = 0
    for p in planned:
        nbytes = p.dtype.itemsize * int(torch.Size(p.shape).numel())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += nbytes
        total += nbytes
    n = len(shards)
    names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for fname, shard in zip(names, shards, strict=True):
        if progress:
            progress(fname)
        by_name = {p.name: p for p in shard}
        write_streaming(out / fname, [(p.name, p.shape, p.dtype) for p in shard], lambda k: _make(by_name[k], gen))
    if n > 1:
        weight_map = {p.name: f for f, shard in zip(names, shards, strict=True) for p in shard}
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
    with staged_dir(out) as tmp:
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

        planned = [p for spec in specs if spec.source == MAIN_WEIGHTS for p in _plan(spec, torch.bfloat16)]
        _write_safetensors(planned, tmp, SHARD_BYTES[tok_size], gen, progress)
        side: dict[str, dict[str, Any]] = {}
        for spec in specs:
            if spec.source != MAIN_WEIGHTS:
                if progress:
                    progress(spec.name)
                # The released TTS files are fp32 torch state dicts.
                state = side.setdefault(spec.source, {})
                for p in _plan(spec, torch.float32):
                    group, _, rest = p.name.partition(".") if spec.nested else ("", "", p.name)
                    (state.setdefault(group, {}) if spec.nested else state)[rest] = _make(p, gen)
        for rel, state in side.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, str(tmp / rel))
        family.write_side_files(cfg, tmp, gen)
        replace_dir(tmp, out)
    return out
