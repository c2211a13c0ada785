"""The trained fixture: the synthetic checkpoint with its LLM trained for a few minutes on pydoc's
text (train split), so quantization error shows up where it matters, in perplexity on the
held-out split. Random weights give near-uniform logits that no quantizer can damage visibly."""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from omni_export.export.checkpoint import load_checkpoint
from omni_export.export.components.qwen import QwenForCausalLM
from omni_export.runtime_py.prompt import encode
from omni_export.export.safetensors_io import SafetensorsFile, write_streaming
from omni_export.files import cache_dir, replace_dir, staged_dir
from omni_export.quantize.calibrate import text_split

SEQ = 128


@dataclass
class TrainReport:
    steps: int
    tokens: int
    seconds: float
    loss_first: float
    loss_last: float


def token_stream(tokenizer, split: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
    eos = tokenizer.token_to_id("<|endoftext|>") or 0
    ids: list[int] = []
    for para in text_split(split):
        ids.extend(encode(tokenizer, para))
        ids.append(eos)
    return torch.tensor(ids)


def lm_loss(model: QwenForCausalLM, batch: torch.Tensor) -> torch.Tensor:
    x = model.embed(batch[:, :-1])
    logits = model(x, torch.arange(batch.shape[1] - 1))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


@torch.no_grad()
def perplexity(model: QwenForCausalLM, tokens: torch.Tensor, max_tokens: int = 8192, seq: int = SEQ) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``seq`` tokens."""
    n = min(len(tokens), max_tokens) // (seq + 1) * (seq + 1)
    windows = tokens[:n].reshape(-1, seq + 1)
    total = sum(float(lm_loss(model, w[None])) for w in windows)
    return math.exp(total / len(windows))


def train_llm(model: QwenForCausalLM, tokens: torch.Tensor, seconds: float, batch: int = 4, lr: float = 2e-3,
              progress: Callable[[int, float], None] | None = None, seed: int = 0) -> TrainReport:  # fmt: skip
    """AdamW on random windows for ``seconds`` of wall time (a deadline, not a step count, so the
    fixture costs the same on any machine)."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    model.train()
    start, step, first, last = time.perf_counter(), 0, float("nan"), float("nan")
    while time.perf_counter() - start < seconds:
        warm = min(1.0, (step + 1) / 10)
        for group in opt.param_groups:
            group["lr"] = lr * warm
        idx = torch.randint(0, len(tokens) - SEQ - 1, (batch,), generator=g)
        # bf16 autocast halves the step time on CPUs with bf16 dot products; weights stay fp32.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_loss(model, torch.stack([tokens[i : i + SEQ + 1] for i in idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        last = float(loss.detach())
        first = last if step == 0 else first
        step += 1
        if progress:
            progress(step, last)
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return TrainReport(step, step * batch * SEQ, time.perf_counter() - start, first, last)


def train_in_place(root: Path, seconds: float, progress: Callable[[int, float], None] | None = None) -> TrainReport:
    """Train the LLM of the (unpublished) checkpoint at ``root`` and rewrite its shards."""
    ckpt = load_checkpoint(root, dtype=torch.float32, components=["llm"])
    model = ckpt.components["llm"]
    report = train_llm(model, token_stream(ckpt.tokenizer, "train"), seconds, progress=progress)
    spec = ckpt.specs["llm"]
    trained = {spec.to_checkpoint_name(k): v.detach() for k, v in model.state_dict().items()}
    for shard in sorted(Path(root).glob("*.safetensors")):
        f = SafetensorsFile(shard)
        if not f.keys() & trained.keys():
            continue
        entries = [(k, *f.shape_dtype(k)) for k in sorted(f.keys())]
        rewritten = shard.with_name(shard.name + ".new")
        # The header changes too, so the checkpoint fingerprint tells the trained copy apart.
        write_streaming(rewritten, entries, lambda k, f=f: trained[k].to(f.shape_dtype(k)[1]) if k in trained else f.get(k),
                        {"format": "pt", "omni_export_trained": f"{report.steps} steps, {report.tokens} tokens"})  # fmt: skip
        del f
        rewritten.replace(shard)
    return report


def trained_checkpoint(src: Path, seconds: float, progress: Callable[[int, float], None] | None = None) -> Path:
    """A copy of ``src`` with its LLM trained for ``seconds``; cached beside the demo checkpoint."""
    src = Path(src)
    fingerprint = load_checkpoint(src, components=[]).fingerprint()
    out = cache_dir() / f"trained-{fingerprint[:16]}-{int(seconds)}s"
    if (out / "config.json").is_file():
        return out
    with staged_dir(out) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        train_in_place(tmp, seconds, progress)
        replace_dir(tmp, out)
    return out
