"""CosyVoice2-style conditional flow matching from speech tokens to 80-bin mel.

token embedding -> chunk-causal transformer encoder (25 Hz) -> 2x upsample (50 Hz) -> more blocks
-> mu (80 bins). The estimator predicts the velocity of x_t given mu, the timestep, a speaker
embedding and an optional prompt mel; ``step`` is one Euler step with classifier-free guidance
(conditional and unconditional passes as a batch of two). Attention is chunk-causal everywhere so
mel can be produced chunk by chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omni_export.export.components.base import Component, Role
from omni_export.export.components.layers import (
    chunk_causal_mask,
    merge_heads,
    sdpa,
    sinusoidal_embedding,
    split_heads,
)
from omni_export.export.trace_specs import F32, I64, Call, MethodSpec, Tensor, dim, dtype_of
from omni_export.runtime_py.sampler import cosine_timesteps


@dataclass(frozen=True)
class FlowConfig:
    vocab: int = 6561
    dim: int = 512
    encoder_layers: int = 6
    encoder_post_layers: int = 4
    heads: int = 8
    ffn: int = 2048
    mel_bins: int = 80
    spk_dim: int = 192
    estimator_dim: int = 256
    estimator_layers: int = 8
    estimator_heads: int = 4
    estimator_ffn: int = 1024
    token_chunk: int = 25
    token_mel_ratio: int = 2
    n_timesteps: int = 10
    cfg_rate: float = 0.7


class Block(nn.Module):
    """Pre-LN transformer block; optional adaptive LayerNorm shift/scale from a conditioning vector."""

    def __init__(self, d: int, heads: int, ffn: int, cond_dim: int = 0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d, elementwise_affine=not cond_dim)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=not cond_dim)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)
        if cond_dim:
            self.modulation = nn.Linear(cond_dim, 4 * d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cond: torch.Tensor | None = None) -> torch.Tensor:
        h1, h2 = self.norm1(x), None
        if cond is not None:
            s1, b1, s2, b2 = self.modulation(F.silu(cond))[:, None].chunk(4, dim=-1)
            h1 = h1 * (1 + s1) + b1
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(h1).chunk(3, dim=-1))
        x = x + self.out(merge_heads(sdpa(q, k, v, mask)))
        h2 = self.norm2(x)
        if cond is not None:
            h2 = h2 * (1 + s2) + b2
        return x + self.fc2(F.gelu(self.fc1(h2)))


def _abs_positions(length: int, d: int, device: torch.device) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / d))
    return torch.cat([torch.sin(pos * div), torch.cos(pos * div)], dim=-1)


class FlowEncoder(nn.Module):
    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.ffn) for _ in range(cfg.encoder_layers))
        # Causal (left-padded) conv after nearest upsampling, so a chunk needs no future frames.
        self.up_conv = nn.Conv1d(cfg.dim, cfg.dim, kernel_size=5)
        self.post_blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.ffn) for _ in range(cfg.encoder_post_layers))
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        x = x + _abs_positions(x.shape[1], cfg.dim, x.device).to(x.dtype)
        mask = chunk_causal_mask(x.shape[1], cfg.token_chunk, x.device)
        for blk in self.blocks:
            x = blk(x, mask)
        x = x.repeat_interleave(cfg.token_mel_ratio, dim=1).transpose(1, 2)
        x = self.up_conv(F.pad(x, (4, 0))).transpose(1, 2)
        x = x + _abs_positions(x.shape[1], cfg.dim, x.device).to(x.dtype)
        mask = chunk_causal_mask(x.shape[1], cfg.token_chunk * cfg.token_mel_ratio, x.device)
        for blk in self.post_blocks:
            x = blk(x, mask)
        return self.norm(x)


class Estimator(nn.Module):
    """v(x_t, mu, t, spk, cond): inputs as [B, 80, T] channel-first like CosyVoice's decoder."""

    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e = cfg.estimator_dim
        self.in_proj = nn.Linear(4 * cfg.mel_bins, e)
        self.time_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.blocks = nn.ModuleList(Block(e, cfg.estimator_heads, cfg.estimator_ffn, cond_dim=e) for _ in range(cfg.estimator_layers))
        self.norm = nn.LayerNorm(e)
        self.out_proj = nn.Linear(e, cfg.mel_bins)

    def forward(self, x, mu, t, spks, cond):  # type: ignore[no-untyped-def]
        length = x.shape[-1]
        h = torch.cat([x, mu, spks[:, :, None].expand(-1, -1, length), cond], dim=1).transpose(1, 2)
        h = self.in_proj(h)
        temb = self.time_mlp(sinusoidal_embedding(t, self.cfg.estimator_dim).to(h.dtype))
        mask = chunk_causal_mask(length, self.cfg.token_chunk * self.cfg.token_mel_ratio, x.device)
        for blk in self.blocks:
            h = blk(h, mask, temb)
        return self.out_proj(self.norm(h)).transpose(1, 2)


class FlowDecoder(Component, nn.Module):
    role = Role.ACOUSTIC

    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_dim, cfg.mel_bins)
        self.encoder = FlowEncoder(cfg)
        self.encoder_proj = nn.Linear(cfg.dim, cfg.mel_bins)
        self.estimator = Estimator(cfg)
        # The voice used when the caller brings no speaker embedding (CosyVoice's default speaker).
        self.default_speaker_embedding = nn.Parameter(torch.zeros(cfg.spk_dim))

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """speech tokens [1, T] -> mu [1, 80, 2T]."""
        # Selects rather than clamp: graph optimizers turn an integer clamp (or min/max) into an
        # integer Clip, which TensorRT does not take.
        top = torch.full((), self.cfg.vocab - 1, dtype=tokens.dtype, device=tokens.device)
        tokens = torch.where(tokens > top, top, torch.where(tokens < 0, torch.zeros_like(top), tokens))
        h = self.encoder(self.input_embedding(tokens))
        return self.encoder_proj(h).transpose(1, 2)

    def speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.spk_embed_affine_layer(F.normalize(embedding, dim=-1))

    def step(self, x, mu, t, dt, spks, cond):  # type: ignore[no-untyped-def]
        """One Euler step with classifier-free guidance: x [1, 80, T] -> x + dt * v."""
        zeros = torch.zeros_like
        v = self.estimator(
            torch.cat([x, x]), torch.cat([mu, zeros(mu)]), torch.cat([t, t]),
            torch.cat([spks, zeros(spks)]), torch.cat([cond, zeros(cond)]),
        )  # fmt: skip
        v_cond, v_uncond = v[:1], v[1:]
        r = self.cfg.cfg_rate
        return x + dt * ((1.0 + r) * v_cond - r * v_uncond)

    def timesteps(self) -> list[float]:
        return cosine_timesteps(self.cfg.n_timesteps)

    def solve(self, mu: torch.Tensor, spks: torch.Tensor, noise: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        cond = torch.zeros_like(mu) if cond is None else cond
        x = noise
        ts = self.timesteps()
        for t0, t1 in zip(ts[:-1], ts[1:]):
            t = torch.full((1,), t0, dtype=mu.dtype, device=mu.device)
            x = self.step(x, mu, t, torch.tensor(t1 - t0, dtype=mu.dtype), spks, cond)
        return x

    # -- as a component ---------------------------------------------------------------------
    def export_methods(self, limits):  # type: ignore[no-untyped-def]
        c = self.cfg
        toks = dim("speech_tokens", 2, limits.max_speech_tokens)
        frames = dim("mel_frames", 2, limits.max_speech_tokens * c.token_mel_ratio)
        dt = dtype_of(self)
        mel = lambda: torch.randn(1, c.mel_bins, 50, dtype=dt)  # noqa: E731
        mel_t = lambda n: Tensor(n, F32, (1, c.mel_bins, "mel_frames"))  # noqa: E731
        return [
            MethodSpec("encode", Call(self, "encode"), (torch.randint(0, c.vocab, (1, 25)),), ({1: toks},),
                       (Tensor("tokens", I64, (1, "speech_tokens")),), (Tensor("mu", F32, (1, c.mel_bins, "2*speech_tokens")),)),
            MethodSpec("speaker", Call(self, "speaker"), (torch.randn(1, c.spk_dim, dtype=dt),), None,
                       (Tensor("embedding", F32, (1, c.spk_dim)),), (Tensor("spks", F32, (1, c.mel_bins)),)),
            MethodSpec("step", Call(self, "step"), (mel(), mel(), torch.rand(1, dtype=dt), torch.tensor(0.1, dtype=dt), torch.randn(1, c.mel_bins, dtype=dt), mel()),
                       ({2: frames}, {2: frames}, None, None, None, {2: frames}),
                       (mel_t("x"), mel_t("mu"), Tensor("t", F32, (1,)), Tensor("dt", F32, ()), Tensor("spks", F32, (1, c.mel_bins)), mel_t("cond")),
                       (mel_t("x_next"),)),
        ]  # fmt: skip

    def golden_script(self, ctx, ref):  # type: ignore[no-untyped-def]
        """Two flow chunks of speech tokens, the default speaker, one Euler step."""
        g = torch.Generator().manual_seed(ctx.seed)
        c = self.cfg
        tokens = torch.randint(0, c.vocab, (1, 2 * c.token_chunk), generator=g)
        mu = ref.run("encode", (tokens,))[0]
        spk_in = self.default_speaker_embedding.detach().float()[None]
        spks = ref.run("speaker", (spk_in,))[0]
        x = torch.randn(mu.shape, generator=g)
        return [("encode", (tokens,)), ("speaker", (spk_in,)),
                ("step", (x, mu, torch.tensor([0.3]), torch.tensor(0.1), spks, torch.zeros_like(mu)))]  # fmt: skip
