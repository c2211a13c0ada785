"""CosyVoice2's flow estimator, ``CausalConditionalDecoder`` (``cosyvoice/flow/decoder.py`` on
Matcha-TTS's U-Net), in its released module tree under ``decoder.estimator``: ``time_mlp``, one
down level (a resnet, transformer blocks, a causal conv: no time down-sampling), mid blocks, one
up level over the skip concatenation, ``final_block``, ``final_proj``. Resnets are causal conv ->
LayerNorm over channels -> Mish blocks with the time embedding added between them; transformer
blocks are diffusers' ``BasicTransformerBlock`` without cross-attention (``norm1``, ``attn1``
with bias-free q/k/v, ``norm3``, ``ff`` with exact GELU), attention chunk-causal in 50-frame
chunks.

Streamed, one call is one chunk of frames at one ODE step: every causal conv takes its left
frames from the last chunk of the same step (``conv`` cache: the convs' inputs side by side
along channels) and every transformer block its window of keys/values (``attn`` cache)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omni_export.export.components.flow_encoder import window_mask, with_left
from omni_export.export.components.layers import chunk_causal_mask, merge_heads, sdpa, sinusoidal_embedding, split_heads

CONV_KERNEL = 3  # every causal conv of the estimator


def mish(x: torch.Tensor) -> torch.Tensor:
    # Spelled out: ExecuTorch, Core ML and TensorRT's parsers all take exp, log, tanh; an
    # overflowing exp gives tanh(inf) = 1, the limit, not NaN.
    return x * torch.tanh(torch.log(1 + torch.exp(x)))


class Mish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mish(x)


class Transpose(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class Caches:
    """Hands each streamed layer its slice of a step's packed caches in call order, and gathers
    what each leaves for the next chunk. ``None`` caches: the whole sequence, zero left frames."""

    def __init__(self, attn: torch.Tensor | None = None, conv: torch.Tensor | None = None) -> None:
        self.attn, self.conv = attn, conv
        self.a = self.c = 0
        self.new_attn: list[torch.Tensor] = []
        self.new_conv: list[torch.Tensor] = []

    def conv_left(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """x [B, C, T] with its ``frames`` left frames in front."""
        past = None if self.conv is None else self.conv[:, self.c : self.c + x.shape[1]]
        self.c += x.shape[1]
        x, nxt = with_left(x, past, frames)
        self.new_conv.append(nxt)
        return x

    def window(self) -> torch.Tensor | None:
        if self.attn is None:
            return None
        self.a += 2
        return self.attn[self.a - 2 : self.a]

    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.c == self.conv.shape[1] and self.a == self.attn.shape[0], "the caches' layout does not match the estimator"  # type: ignore[union-attr]
        return torch.cat(self.new_attn), torch.cat(self.new_conv, dim=1)


class CausalConv1d(nn.Conv1d):
    """A plain conv (its forward a pure function, as the fp16 measurement re-runs layers);
    ``causal`` puts the left frames in front first."""

    def causal(self, x: torch.Tensor, caches: Caches) -> torch.Tensor:
        return self(caches.conv_left(x, self.kernel_size[0] - 1))


class CausalBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.block = nn.ModuleList([CausalConv1d(dim, dim_out, CONV_KERNEL), Transpose(), nn.LayerNorm(dim_out), Transpose(), Mish()])

    def forward(self, x: torch.Tensor, caches: Caches) -> torch.Tensor:
        conv, *rest = self.block
        x = conv.causal(x, caches)
        for m in rest:
            x = m(x)
        return x


class CausalResnetBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(Mish(), nn.Linear(time_dim, dim_out))
        self.block1 = CausalBlock1D(dim, dim_out)
        self.block2 = CausalBlock1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, caches: Caches) -> torch.Tensor:
        h = self.block1(x, caches) + self.mlp(temb)[:, :, None]
        return self.block2(h, caches) + self.res_conv(x)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_k = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_v = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor, caches: Caches) -> torch.Tensor:
        q = split_heads(self.to_q(x), self.heads)
        kv = torch.stack([split_heads(self.to_k(x), self.heads), split_heads(self.to_v(x), self.heads)])
        past = caches.window()
        if past is not None:
            kv = torch.cat([past, kv], dim=3)
            caches.new_attn.append(kv[:, :, :, x.shape[1] :])
        return self.to_out[0](merge_heads(sdpa(q, kv[0], kv[1], mask)))


class GELU(nn.Module):
    """diffusers' GELU: a projection then exact (erf) GELU."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(GELU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, caches: Caches) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), mask, caches)
        return x + self.ff(self.norm3(x))


def _transformers(dim: int, heads: int, head_dim: int, n: int) -> nn.ModuleList:
    return nn.ModuleList(BasicTransformerBlock(dim, heads, head_dim) for _ in range(n))


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, time_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim, time_dim)
        self.linear_2 = nn.Linear(time_dim, time_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class CausalConditionalDecoder(nn.Module):
    CONV_LEFT = CONV_KERNEL - 1

    def __init__(self, in_channels: int, out_channels: int, channels: int, heads: int, head_dim: int,
                 n_blocks: int, mid_blocks: int, chunk_frames: int) -> None:  # fmt: skip
        super().__init__()
        self.in_channels, self.chunk_frames = in_channels, chunk_frames
        time_dim = 4 * channels
        self.time_mlp = TimestepEmbedding(in_channels, time_dim)
        level = lambda cin: nn.ModuleList([  # noqa: E731
            CausalResnetBlock1D(cin, channels, time_dim), _transformers(channels, heads, head_dim, n_blocks),
            CausalConv1d(channels, channels, CONV_KERNEL)])  # fmt: skip
        self.down_blocks = nn.ModuleList([level(in_channels)])
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([CausalResnetBlock1D(channels, channels, time_dim), _transformers(channels, heads, head_dim, n_blocks)])
            for _ in range(mid_blocks))  # fmt: skip
        self.up_blocks = nn.ModuleList([level(2 * channels)])
        self.final_block = CausalBlock1D(channels, channels)
        self.final_proj = nn.Conv1d(channels, out_channels, 1)

    @staticmethod
    def conv_channels(in_channels: int, channels: int, mid_blocks: int) -> int:
        """Channels of the packed conv cache: every causal conv's input, in call order."""
        return in_channels + channels * (7 + 2 * mid_blocks)

    def forward(self, x, mu, t, spks, cond, caches: Caches | None = None, mask=None):  # type: ignore[no-untyped-def]
        """[B, 80, T] each (spks [B, 80]) -> velocity [B, 80, T]. ``mask``: the attention's
        (default: chunk-causal over the whole sequence)."""
        caches = Caches() if caches is None else caches
        mask = chunk_causal_mask(x.shape[-1], self.chunk_frames, x.device) if mask is None else mask
        temb = self.time_mlp(sinusoidal_embedding(t, self.in_channels).to(x.dtype))
        h = torch.cat([x, mu, spks[:, :, None].expand(-1, -1, x.shape[-1]), cond], dim=1)

        def level(blocks, h):  # type: ignore[no-untyped-def]
            h = blocks[0](h, temb, caches).transpose(1, 2)
            for block in blocks[1]:
                h = block(h, mask, caches)
            return h.transpose(1, 2)

        (down,), (up,) = self.down_blocks, self.up_blocks
        skip = level(down, h)
        h = down[2].causal(skip, caches)
        for mid in self.mid_blocks:
            h = level(mid, h)
        h = up[2].causal(level(up, torch.cat([h, skip], dim=1)), caches)
        return self.final_proj(self.final_block(h, caches))

    def forward_chunk(self, x, mu, t, spks, cond, attn, conv, offset, length):  # type: ignore[no-untyped-def]
        """One chunk of frames at frame ``offset`` (``length`` real) -> (v, attn, conv for the next)."""
        caches = Caches(attn, conv)
        mask = window_mask(x.shape[-1], attn.shape[3], offset, length)
        return self(x, mu, t, spks, cond, caches, mask), *caches.packed()
