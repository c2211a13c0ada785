"""CosyVoice2-style conditional flow matching from speech tokens to 80-bin mel.

token embedding -> chunk-causal transformer encoder (25 Hz) -> 2x upsample (50 Hz) -> more blocks
-> mu (80 bins). The estimator predicts the velocity of x_t given mu, the timestep, a speaker
embedding and an optional prompt mel; ``step`` is one Euler step with classifier-free guidance
(conditional and unconditional passes as a batch of two). Attention is chunk-causal everywhere so
mel can be produced chunk by chunk.

Exported, the flow runs one chunk at a time (``encode_chunk``, ``step_chunk``): each attention
layer keeps the keys and values of the last ``left_chunks`` chunks (WeNet's
``num_decoding_left_chunks``), the encoder also its causal convolution's left frames, and every
ODE step its own cache, since the estimator's states differ per timestep. Every call has the same
static shapes, so a chunk costs the same however long the reply, and the result equals the
whole-sequence computation (``encode`` + ``solve``) while the reply fits in the window plus one
chunk; beyond it, attention reaches back ``left_chunks`` chunks.
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
    # Streaming: chunks of keys/values each attention layer keeps (8 chunks = 8 s of speech).
    left_chunks: int = 8

    @property
    def window(self) -> int:
        """Speech tokens of left context a streamed chunk attends to."""
        return self.left_chunks * self.token_chunk

    def cache_shapes(self) -> dict[str, tuple[int, ...]]:
        """The streaming caches, [layers x (keys, values), batch, heads, frames, head_dim] (rank 5:
        Core ML takes no more), and the conv's left frames: what the runtime allocates as zeros
        for a new reply."""
        r, w = self.token_mel_ratio, self.window
        return {
            "enc_cache": (2 * self.encoder_layers, 1, self.heads, w, self.dim // self.heads),
            "post_cache": (2 * self.encoder_post_layers, 1, self.heads, r * w, self.dim // self.heads),
            "conv_cache": (1, self.dim, UP_CONV_KERNEL - 1),
            # batch of two: classifier-free guidance's conditional and unconditional passes
            "step_cache": (2 * self.estimator_layers, 2, self.estimator_heads, r * w, self.estimator_dim // self.estimator_heads),
        }  # fmt: skip


UP_CONV_KERNEL = 5


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cond: torch.Tensor | None = None,
                past: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """-> (output, keys/values [2, B, H, S, D]); with ``past`` (the window's keys/values) the
        chunk attends to them too, and the returned window drops its oldest positions to take
        the chunk's."""
        h1 = self.norm1(x)
        if cond is not None:
            s1, b1, s2, b2 = self.modulation(F.silu(cond))[:, None].chunk(4, dim=-1)
            h1 = h1 * (1 + s1) + b1
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(h1).chunk(3, dim=-1))
        kv = torch.stack([k, v])
        if past is not None:
            kv = torch.cat([past, kv], dim=3)
        x = x + self.out(merge_heads(sdpa(q, kv[0], kv[1], mask)))
        h2 = self.norm2(x)
        if cond is not None:
            h2 = h2 * (1 + s2) + b2
        window = kv if past is None else kv[:, :, :, x.shape[1] :]
        return x + self.fc2(F.gelu(self.fc1(h2))), window


def _abs_positions(length: int, d: int, device: torch.device, offset: torch.Tensor | None = None) -> torch.Tensor:
    pos = torch.arange(length, device=device)
    pos = (pos if offset is None else pos + offset).to(torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / d))
    return torch.cat([torch.sin(pos * div), torch.cos(pos * div)], dim=-1)


def window_mask(chunk: int, window: int, offset: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """Boolean [chunk, window + chunk] for one streamed chunk starting at position ``offset``: the
    window's slots hold positions offset-window .. offset-1 (those before 0 are empty), and of the
    chunk itself only the first ``length`` positions are real (a short last chunk is padded)."""
    filled = torch.arange(window, device=offset.device) + offset >= window
    real = torch.arange(chunk, device=offset.device) < length
    return torch.cat([filled, real])[None, :].expand(chunk, window + chunk)


class FlowEncoder(nn.Module):
    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.ffn) for _ in range(cfg.encoder_layers))
        # Causal (left-padded) conv after nearest upsampling, so a chunk needs no future frames.
        self.up_conv = nn.Conv1d(cfg.dim, cfg.dim, kernel_size=UP_CONV_KERNEL)
        self.post_blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.ffn) for _ in range(cfg.encoder_post_layers))
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        x = x + _abs_positions(x.shape[1], cfg.dim, x.device).to(x.dtype)
        mask = chunk_causal_mask(x.shape[1], cfg.token_chunk, x.device)
        for blk in self.blocks:
            x = blk(x, mask)[0]
        x = x.repeat_interleave(cfg.token_mel_ratio, dim=1).transpose(1, 2)
        x = self.up_conv(F.pad(x, (UP_CONV_KERNEL - 1, 0))).transpose(1, 2)
        x = x + _abs_positions(x.shape[1], cfg.dim, x.device).to(x.dtype)
        mask = chunk_causal_mask(x.shape[1], cfg.token_chunk * cfg.token_mel_ratio, x.device)
        for blk in self.post_blocks:
            x = blk(x, mask)[0]
        return self.norm(x)

    def forward_chunk(self, x, offset, length, enc_cache, post_cache, conv_cache):  # type: ignore[no-untyped-def]
        """One chunk of embedded tokens [1, C, dim] at token ``offset`` -> (h [1, rC, dim], caches)."""
        cfg, r = self.cfg, self.cfg.token_mel_ratio
        chunk, window = x.shape[1], cfg.window
        x = x + _abs_positions(chunk, cfg.dim, x.device, offset).to(x.dtype)
        mask = window_mask(chunk, window, offset, length)
        enc = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, mask, past=enc_cache[2 * i : 2 * i + 2])
            enc.append(kv)
        x = torch.cat([conv_cache, x.repeat_interleave(r, dim=1).transpose(1, 2)], dim=-1)
        conv_next = x[..., x.shape[-1] - (UP_CONV_KERNEL - 1) :]
        x = self.up_conv(x).transpose(1, 2)
        x = x + _abs_positions(r * chunk, cfg.dim, x.device, r * offset).to(x.dtype)
        mask = window_mask(r * chunk, r * window, r * offset, r * length)
        post = []
        for i, blk in enumerate(self.post_blocks):
            x, kv = blk(x, mask, past=post_cache[2 * i : 2 * i + 2])
            post.append(kv)
        return self.norm(x), torch.cat(enc), torch.cat(post), conv_next


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

    def forward(self, x, mu, t, spks, cond, cache=None, offset=None, length=None):  # type: ignore[no-untyped-def]
        """Whole sequence, or (``cache`` given) one chunk at frame ``offset`` with its window:
        then -> (v, the window's new keys/values)."""
        frames = x.shape[-1]
        h = torch.cat([x, mu, spks[:, :, None].expand(-1, -1, frames), cond], dim=1).transpose(1, 2)
        h = self.in_proj(h)
        temb = self.time_mlp(sinusoidal_embedding(t, self.cfg.estimator_dim).to(h.dtype))
        if cache is None:
            mask = chunk_causal_mask(frames, self.cfg.token_chunk * self.cfg.token_mel_ratio, x.device)
        else:
            mask = window_mask(frames, cache.shape[3], offset, length)
        windows = []
        for i, blk in enumerate(self.blocks):
            h, kv = blk(h, mask, temb, past=None if cache is None else cache[2 * i : 2 * i + 2])
            windows.append(kv)
        v = self.out_proj(self.norm(h)).transpose(1, 2)
        return v if cache is None else (v, torch.cat(windows))


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
        """speech tokens [1, T] -> mu [1, 80, 2T] (the whole-sequence reference)."""
        h = self.encoder(self.input_embedding(self._tokens(tokens)))
        return self.encoder_proj(h).transpose(1, 2)

    def _tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        # Selects rather than clamp: graph optimizers turn an integer clamp (or min/max) into an
        # integer Clip, which TensorRT does not take.
        top = torch.full((), self.cfg.vocab - 1, dtype=tokens.dtype, device=tokens.device)
        return torch.where(tokens > top, top, torch.where(tokens < 0, torch.zeros_like(top), tokens))

    def encode_chunk(self, tokens, offset, length, enc_cache, post_cache, conv_cache):  # type: ignore[no-untyped-def]
        """One chunk of speech tokens [1, C] starting at token ``offset`` (``length`` of them real)
        -> (mu [1, 80, rC], the encoder's caches for the next chunk)."""
        h, *caches = self.encoder.forward_chunk(self.input_embedding(self._tokens(tokens)), offset, length,
                                                enc_cache, post_cache, conv_cache)  # fmt: skip
        return (self.encoder_proj(h).transpose(1, 2), *caches)

    def speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.spk_embed_affine_layer(F.normalize(embedding, dim=-1))

    def _guided(self, x, mu, t, dt, spks, cond, **chunk):  # type: ignore[no-untyped-def]
        zeros = torch.zeros_like
        out = self.estimator(
            torch.cat([x, x]), torch.cat([mu, zeros(mu)]), torch.cat([t, t]),
            torch.cat([spks, zeros(spks)]), torch.cat([cond, zeros(cond)]), **chunk,
        )  # fmt: skip
        v, window = out if chunk else (out, None)
        r = self.cfg.cfg_rate
        return x + dt * ((1.0 + r) * v[:1] - r * v[1:]), window

    def step(self, x, mu, t, dt, spks, cond):  # type: ignore[no-untyped-def]
        """One Euler step with classifier-free guidance: x [1, 80, T] -> x + dt * v."""
        return self._guided(x, mu, t, dt, spks, cond)[0]

    def step_chunk(self, x, mu, t, dt, spks, cond, cache, offset, length):  # type: ignore[no-untyped-def]
        """``step`` for one chunk of frames at token ``offset``, with this timestep's window of
        keys/values -> (x_next, the window for this timestep's next chunk)."""
        r = self.cfg.token_mel_ratio
        return self._guided(x, mu, t, dt, spks, cond, cache=cache, offset=r * offset, length=r * length)

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
    def stream_state_elements(self) -> int:
        shapes = self.cfg.cache_shapes()
        n = lambda name: math.prod(shapes[name])  # noqa: E731
        return n("enc_cache") + n("post_cache") + n("conv_cache") + self.cfg.n_timesteps * n("step_cache")

    def export_methods(self, limits):  # type: ignore[no-untyped-def]
        """Static shapes throughout: one chunk in, one chunk out, fixed windows."""
        c, dt = self.cfg, dtype_of(self)
        frames = c.token_chunk * c.token_mel_ratio
        shapes = c.cache_shapes()
        zeros = lambda name: torch.zeros(shapes[name], dtype=dt)  # noqa: E731
        cache = lambda name, prefix="": Tensor(prefix + name, F32, shapes[name])  # noqa: E731
        mel = lambda name: Tensor(name, F32, (1, c.mel_bins, frames))  # noqa: E731
        pos = (Tensor("offset", I64, (1,)), Tensor("length", I64, (1,)))
        at = lambda n: (torch.tensor([n]), torch.tensor([c.token_chunk]))  # noqa: E731
        enc = ("enc_cache", "post_cache", "conv_cache")
        return [
            MethodSpec("encode_chunk", Call(self, "encode_chunk"),
                       (torch.randint(0, c.vocab, (1, c.token_chunk)), *at(0), *(zeros(n) for n in enc)), None,
                       (Tensor("tokens", I64, (1, c.token_chunk)), *pos, *(cache(n) for n in enc)),
                       (mel("mu"), *(cache(n, "next_") for n in enc))),
            MethodSpec("speaker", Call(self, "speaker"), (torch.randn(1, c.spk_dim, dtype=dt),), None,
                       (Tensor("embedding", F32, (1, c.spk_dim)),), (Tensor("spks", F32, (1, c.mel_bins)),)),
            MethodSpec("step_chunk", Call(self, "step_chunk"),
                       (*(torch.randn(1, c.mel_bins, frames, dtype=dt) for _ in "xm"), torch.rand(1, dtype=dt),
                        torch.tensor(0.1, dtype=dt), torch.randn(1, c.mel_bins, dtype=dt),
                        torch.zeros(1, c.mel_bins, frames, dtype=dt), zeros("step_cache"), *at(0)), None,
                       (mel("x"), mel("mu"), Tensor("t", F32, (1,)), Tensor("dt", F32, ()), Tensor("spks", F32, (1, c.mel_bins)),
                        mel("cond"), cache("step_cache"), *pos),
                       (mel("x_next"), cache("step_cache", "next_"))),
        ]  # fmt: skip

    def golden_script(self, ctx, ref):  # type: ignore[no-untyped-def]
        """Two streamed chunks (the second short, over the first's windows), the default speaker,
        one Euler step on each chunk."""
        g = torch.Generator().manual_seed(ctx.seed)
        c = self.cfg
        shapes = c.cache_shapes()
        tokens = torch.randint(0, c.vocab, (2, c.token_chunk), generator=g)
        first = (tokens[:1], torch.tensor([0]), torch.tensor([c.token_chunk]),
                 *(torch.zeros(shapes[n]) for n in ("enc_cache", "post_cache", "conv_cache")))  # fmt: skip
        mu1, *caches = ref.run("encode_chunk", first)
        second = (tokens[1:], torch.tensor([c.token_chunk]), torch.tensor([c.token_chunk - 3]), *caches)
        mu2 = ref.run("encode_chunk", second)[0]
        spk_in = self.default_speaker_embedding.detach().float()[None]
        spks = ref.run("speaker", (spk_in,))[0]
        x1, x2 = (torch.randn(mu1.shape, generator=g) for _ in range(2))
        t, dt = torch.tensor([0.3]), torch.tensor(0.1)
        step1 = (x1, mu1, t, dt, spks, torch.zeros_like(mu1), torch.zeros(shapes["step_cache"]), *first[1:3])
        window = ref.run("step_chunk", step1)[1]
        step2 = (x2, mu2, t, dt, spks, torch.zeros_like(mu2), window, *second[1:3])
        return [("encode_chunk", first), ("encode_chunk", second), ("speaker", (spk_in,)),
                ("step_chunk", step1), ("step_chunk", step2)]  # fmt: skip
