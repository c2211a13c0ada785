"""CosyVoice2's flow (``CausalMaskedDiffWithXvec``, ``cosyvoice/flow/flow.py``): speech tokens
(25 Hz) -> 80-bin mel (50 Hz) by conditional flow matching, in the released module tree:
``input_embedding``, ``spk_embed_affine_layer`` (the L2-normalised x-vector -> 80), ``encoder``
(flow_encoder.py), ``encoder_proj`` (-> mu), ``decoder.estimator`` (flow_estimator.py). The
estimator predicts the velocity of x_t from [x, mu, speaker, prompt mel]; ``step`` is one Euler
step with classifier-free guidance (the conditional and unconditional rows as a batch of two,
v = 1.7 v_cond - 0.7 v_uncond), over the cosine time grid of 10 steps.

The release streams by re-running the whole flow over every token so far at each chunk (its
block-causal masks keep earlier frames fixed). Exported, the flow runs one chunk at a time
(``encode_chunk``, ``step_chunk``) at a fixed cost: each attention layer keeps the keys and
values of the last ``left_chunks`` chunks (the estimator's ``estimator_left_chunks``), every
convolution its left frames, and every ODE step its own caches, since the estimator's states
differ per step. The result equals the whole-sequence computation (``encode`` + ``solve``) while
the reply fits in the window plus one chunk; beyond it, attention reaches back that far. The
release's last chunk attends to everything (its final call drops the streaming mask); here it
is chunk-causal like the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omni_export.export.components.base import Component, Role
from omni_export.export.components.flow_encoder import UP_CONV_KERNEL, LOOKAHEAD_CONV2, UpsampleConformerEncoder
from omni_export.export.components.flow_estimator import CausalConditionalDecoder
from omni_export.export.trace_specs import F32, I64, Call, MethodSpec, Tensor, dtype_of
from omni_export.runtime_py.sampler import cosine_timesteps


@dataclass(frozen=True)
class FlowConfig:
    """Defaults: CosyVoice2-0.5B's flow (cosyvoice2.yaml)."""

    vocab: int = 6561
    dim: int = 512
    encoder_layers: int = 6
    up_layers: int = 4
    heads: int = 8
    ffn: int = 2048
    pre_lookahead: int = 3
    mel_bins: int = 80
    spk_dim: int = 192
    estimator_dim: int = 256
    estimator_heads: int = 8
    estimator_head_dim: int = 64
    estimator_blocks: int = 4  # transformer blocks per U-Net level
    estimator_mid_blocks: int = 12
    token_chunk: int = 25
    token_mel_ratio: int = 2
    n_timesteps: int = 10
    cfg_rate: float = 0.7
    # Streaming windows, in chunks of keys/values kept per attention layer: the encoder's 8 (8 s
    # of speech) cost little; the estimator's are kept per ODE step for its 56 blocks, so 2 (2 s)
    # hold them at 230 MB in fp32 at full size.
    left_chunks: int = 8
    estimator_left_chunks: int = 2

    @property
    def window(self) -> int:
        """Speech tokens of left context a streamed chunk's encoder attends to."""
        return self.left_chunks * self.token_chunk

    @property
    def exact_tokens(self) -> int:
        """Speech tokens of a reply whose streamed mel equals the whole-sequence flow's."""
        return (min(self.left_chunks, self.estimator_left_chunks) + 1) * self.token_chunk

    @property
    def estimator_blocks_total(self) -> int:
        return self.estimator_blocks * (self.estimator_mid_blocks + 2)

    def cache_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """The streaming caches a new reply starts with as zeros: the encoder's (keys/values as
        [layers x (keys, values), batch, heads, positions, head_dim], rank 5 for Core ML; the
        convs' left frames) and each ODE step's (batch two: guidance's two rows)."""
        r, w, h = self.token_mel_ratio, self.window, self.heads
        e_frames = r * self.estimator_left_chunks * self.token_chunk
        conv = CausalConditionalDecoder.conv_channels(4 * self.mel_bins, self.estimator_dim, self.estimator_mid_blocks)
        return {
            "encode": {
                "enc_cache": (2 * self.encoder_layers, 1, h, w, self.dim // h),
                "up_cache": (2 * self.up_layers, 1, h, r * w, self.dim // h),
                "look_cache": (1, self.dim, LOOKAHEAD_CONV2 - 1),
                "conv_cache": (1, self.dim, UP_CONV_KERNEL - 1),
            },
            "step": {
                "step_cache": (2 * self.estimator_blocks_total, 2, self.estimator_heads, e_frames, self.estimator_head_dim),
                "step_conv": (2, conv, CausalConditionalDecoder.CONV_LEFT),
            },
        }


class ConditionalCFM(nn.Module):
    """``decoder``: the flow-matching wrapper; only its estimator holds weights."""

    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        self.estimator = CausalConditionalDecoder(
            4 * cfg.mel_bins, cfg.mel_bins, cfg.estimator_dim, cfg.estimator_heads, cfg.estimator_head_dim,
            cfg.estimator_blocks, cfg.estimator_mid_blocks, cfg.token_chunk * cfg.token_mel_ratio)  # fmt: skip


class FlowDecoder(Component, nn.Module):
    role = Role.ACOUSTIC

    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_dim, cfg.mel_bins)
        self.encoder = UpsampleConformerEncoder(cfg.dim, cfg.heads, cfg.ffn, cfg.encoder_layers, cfg.up_layers,
                                                cfg.pre_lookahead, cfg.token_chunk, cfg.token_mel_ratio)  # fmt: skip
        self.encoder_proj = nn.Linear(cfg.dim, cfg.mel_bins)
        self.decoder = ConditionalCFM(cfg)

    @property
    def estimator(self) -> CausalConditionalDecoder:
        return self.decoder.estimator

    def _tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        # Selects rather than clamp: graph optimizers turn an integer clamp (or min/max) into an
        # integer Clip, which TensorRT does not take.
        top = torch.full((), self.cfg.vocab - 1, dtype=tokens.dtype, device=tokens.device)
        return self.input_embedding(torch.where(tokens > top, top, torch.where(tokens < 0, torch.zeros_like(top), tokens)))

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """A whole reply's speech tokens [1, T] -> mu [1, 80, 2T] (the reference the stream matches)."""
        return self.encoder_proj(self.encoder(self._tokens(tokens))).transpose(1, 2)

    def encode_chunk(self, tokens, offset, length, enc_cache, up_cache, look_cache, conv_cache):  # type: ignore[no-untyped-def]
        """One chunk of speech tokens and the look-ahead after it, [1, C + 3], starting at token
        ``offset``, its first ``length`` real (the end of speech: fewer) -> (mu [1, 80, rC], the
        encoder's caches for the next chunk)."""
        h, *caches = self.encoder.forward_chunk(self._tokens(tokens), offset, length, enc_cache, up_cache, look_cache, conv_cache)
        return (self.encoder_proj(h).transpose(1, 2), *caches)

    def speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.spk_embed_affine_layer(F.normalize(embedding, dim=-1))

    def _guided(self, x, mu, t, dt, spks, cond, caches=None):  # type: ignore[no-untyped-def]
        zeros = torch.zeros_like
        batch = (torch.cat([x, x]), torch.cat([mu, zeros(mu)]), torch.cat([t, t]),
                 torch.cat([spks, zeros(spks)]), torch.cat([cond, zeros(cond)]))  # fmt: skip
        out = self.estimator(*batch) if caches is None else self.estimator.forward_chunk(*batch, *caches)
        v, new = (out, ()) if caches is None else (out[0], out[1:])
        r = self.cfg.cfg_rate
        return (x + dt * ((1.0 + r) * v[:1] - r * v[1:]), *new)

    def step(self, x, mu, t, dt, spks, cond):  # type: ignore[no-untyped-def]
        """One Euler step with classifier-free guidance: x [1, 80, T] -> x + dt * v."""
        return self._guided(x, mu, t, dt, spks, cond)[0]

    def step_chunk(self, x, mu, t, dt, spks, cond, step_cache, step_conv, offset, length):  # type: ignore[no-untyped-def]
        """``step`` for one chunk of frames at token ``offset``, with this ODE step's caches ->
        (x_next, the caches for this step's next chunk)."""
        r = self.cfg.token_mel_ratio
        return self._guided(x, mu, t, dt, spks, cond, (step_cache, step_conv, r * offset, r * length))

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
        n = lambda group: sum(math.prod(s) for s in shapes[group].values())  # noqa: E731
        return n("encode") + self.cfg.n_timesteps * n("step")

    def export_methods(self, limits):  # type: ignore[no-untyped-def]
        """Static shapes throughout: one chunk in, one chunk out, fixed windows."""
        c, dt = self.cfg, dtype_of(self)
        frames = c.token_chunk * c.token_mel_ratio
        shapes = c.cache_shapes()
        enc, step = shapes["encode"], shapes["step"]
        zeros = lambda group: tuple(torch.zeros(s, dtype=dt) for s in group.values())  # noqa: E731
        caches = lambda group, prefix="": tuple(Tensor(prefix + n, F32, s) for n, s in group.items())  # noqa: E731
        mel = lambda name: Tensor(name, F32, (1, c.mel_bins, frames))  # noqa: E731
        pos = (Tensor("offset", I64, (1,)), Tensor("length", I64, (1,)))
        at = (torch.tensor([0]), torch.tensor([c.token_chunk]))
        n_in = c.token_chunk + c.pre_lookahead
        return [
            MethodSpec("encode_chunk", Call(self, "encode_chunk"),
                       (torch.randint(0, c.vocab, (1, n_in)), *at, *zeros(enc)), None,
                       (Tensor("tokens", I64, (1, n_in)), *pos, *caches(enc)), (mel("mu"), *caches(enc, "next_"))),
            MethodSpec("speaker", Call(self, "speaker"), (torch.randn(1, c.spk_dim, dtype=dt),), None,
                       (Tensor("embedding", F32, (1, c.spk_dim)),), (Tensor("spks", F32, (1, c.mel_bins)),)),
            MethodSpec("step_chunk", Call(self, "step_chunk"),
                       (*(torch.randn(1, c.mel_bins, frames, dtype=dt) for _ in "xm"), torch.rand(1, dtype=dt),
                        torch.tensor(0.1, dtype=dt), torch.randn(1, c.mel_bins, dtype=dt),
                        torch.zeros(1, c.mel_bins, frames, dtype=dt), *zeros(step), *at), None,
                       (mel("x"), mel("mu"), Tensor("t", F32, (1,)), Tensor("dt", F32, ()), Tensor("spks", F32, (1, c.mel_bins)),
                        mel("cond"), *caches(step), *pos),
                       (mel("x_next"), *caches(step, "next_"))),
        ]  # fmt: skip

    def golden_script(self, ctx, ref):  # type: ignore[no-untyped-def]
        """Two streamed chunks (the first with its look-ahead, the second short: the end of
        speech, over the first's windows), a speaker, one Euler step on each chunk."""
        g = torch.Generator().manual_seed(ctx.seed)
        c = self.cfg
        shapes = c.cache_shapes()
        n_in = c.token_chunk + c.pre_lookahead
        tokens = torch.randint(0, c.vocab, (2, n_in), generator=g)
        first = (tokens[:1], torch.tensor([0]), torch.tensor([n_in]), *(torch.zeros(s) for s in shapes["encode"].values()))
        mu1, *caches = ref.run("encode_chunk", first)
        second = (tokens[1:], torch.tensor([c.token_chunk]), torch.tensor([c.token_chunk - 3]), *caches)
        mu2 = ref.run("encode_chunk", second)[0]
        spk_in = torch.randn(1, c.spk_dim, generator=g)
        spks = ref.run("speaker", (spk_in,))[0]
        x1, x2 = (torch.randn(mu1.shape, generator=g) for _ in range(2))
        t, dt = torch.tensor([0.3]), torch.tensor(0.1)
        step1 = (x1, mu1, t, dt, spks, torch.zeros_like(mu1), *(torch.zeros(s) for s in shapes["step"].values()), *first[1:3])
        windows = ref.run("step_chunk", step1)[1:]
        step2 = (x2, mu2, t, dt, spks, torch.zeros_like(mu2), *windows, *second[1:3])
        return [("encode_chunk", first), ("encode_chunk", second), ("speaker", (spk_in,)),
                ("step_chunk", step1), ("step_chunk", step2)]  # fmt: skip
