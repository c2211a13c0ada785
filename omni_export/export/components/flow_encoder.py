"""CosyVoice2's ``UpsampleConformerEncoder`` (``cosyvoice/transformer/upsample_encoder.py``), in
its released module tree: ``embed`` (Linear, LayerNorm, x sqrt(d), ESPnet relative positions),
``pre_lookahead_layer`` (each token sees the next three), six pre-norm conformer layers without
macaron or convolution module (SiLU feed-forward, LayerNorm eps 1e-12), ``up_layer`` (nearest x2
then a causal conv), ``up_embed``, four more layers at the mel rate, ``after_norm``. Attention is
chunk-causal (25 tokens, 50 frames), as the release's streaming masks.

Streamed, a call takes one chunk of tokens plus the three look-ahead tokens after it, the
windows of keys/values the earlier chunks left in each layer, and the left frames of both
convolutions; it gives what the whole-sequence pass gives for those positions while the reply
fits in the window plus one chunk."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from omni_export.export.components.layers import chunk_causal_mask
from omni_export.export.components.relpos import PositionwiseFeedForward, RelPositionAttention, relative_rows

CONFORMER_EPS = 1e-12  # the release's ConformerEncoderLayer norms; every other LayerNorm is 1e-5
UP_CONV_KERNEL = 5  # Upsample1D: kernel 2 * stride + 1, left-padded by 2 * stride
LOOKAHEAD_CONV2 = 3  # PreLookaheadLayer.conv2: causal, kernel 3


def window_mask(chunk: int, window: int, offset: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """Boolean [chunk, window + chunk] for one streamed chunk starting at position ``offset``: the
    window's slots hold positions offset-window .. offset-1 (those before 0 are empty), and of the
    chunk itself only the first ``length`` positions are real (a short last chunk is padded)."""
    filled = torch.arange(window, device=offset.device) + offset >= window
    real = torch.arange(chunk, device=offset.device) < length
    return torch.cat([filled, real])[None, :].expand(chunk, window + chunk)


def with_left(x: torch.Tensor, past: torch.Tensor | None, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal conv's input: x [B, C, T] with ``frames`` left frames in front (the last chunk's,
    or zeros at the start) -> (that input, its last ``frames`` frames: the next chunk's left)."""
    x = torch.cat([x.new_zeros(x.shape[0], x.shape[1], frames) if past is None else past, x], dim=-1)
    return x, x[..., x.shape[-1] - frames :]


class Embed(nn.Module):
    """``LinearNoSubsampling`` + ``EspnetRelPositionalEncoding``: ``out`` = (Linear, LayerNorm,
    Dropout), then x sqrt(d); the positional table is not a parameter."""

    def __init__(self, d_in: int, d: int) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.Linear(d_in, d), nn.LayerNorm(d, eps=1e-5), nn.Dropout(0.0))
        self.scale = math.sqrt(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x) * self.scale


class PreLookaheadLayer(nn.Module):
    def __init__(self, d: int, lookahead: int) -> None:
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(d, d, kernel_size=lookahead + 1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=LOOKAHEAD_CONV2)

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T + lookahead, d] (the look-ahead positions zero at the end of speech) -> (out
        [B, T, d], conv2's left frames for the next chunk). ``past``: those of the last chunk."""
        h, nxt = with_left(F.leaky_relu(self.conv1(x.transpose(1, 2))), past, LOOKAHEAD_CONV2 - 1)
        return self.conv2(h).transpose(1, 2) + x[:, : x.shape[1] - self.lookahead], nxt


class ConformerLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.self_attn = RelPositionAttention(d, heads)
        self.feed_forward = PositionwiseFeedForward(d, ffn, F.silu)
        self.norm_ff = nn.LayerNorm(d, eps=CONFORMER_EPS)
        self.norm_mha = nn.LayerNorm(d, eps=CONFORMER_EPS)

    def forward(self, x, pos, mask, past=None):  # type: ignore[no-untyped-def]
        h, window = self.self_attn.attend(self.norm_mha(x), pos, mask, past, shift=True)
        x = x + h
        return x + self.feed_forward(self.norm_ff(x)), window


class Upsample1D(nn.Module):
    def __init__(self, d: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(d, d, kernel_size=UP_CONV_KERNEL)

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> ([B, stride T, d], the conv's left frames for the next chunk)."""
        h, nxt = with_left(x.repeat_interleave(self.stride, dim=1).transpose(1, 2), past, UP_CONV_KERNEL - 1)
        return self.conv(h).transpose(1, 2), nxt


class UpsampleConformerEncoder(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, layers: int, up_layers: int, lookahead: int,
                 chunk: int, stride: int) -> None:  # fmt: skip
        super().__init__()
        self.d, self.chunk, self.stride, self.lookahead = d, chunk, stride, lookahead
        self.embed = Embed(d, d)
        self.pre_lookahead_layer = PreLookaheadLayer(d, lookahead)
        self.encoders = nn.ModuleList(ConformerLayer(d, heads, ffn) for _ in range(layers))
        self.up_layer = Upsample1D(d, stride)
        self.up_embed = Embed(d, d)
        self.up_encoders = nn.ModuleList(ConformerLayer(d, heads, ffn) for _ in range(up_layers))
        self.after_norm = nn.LayerNorm(d, eps=1e-5)

    def _stack(self, layers, x, mask, cache):  # type: ignore[no-untyped-def]
        """Layers over x; with ``cache`` (their windows, [2 per layer, ...]) one streamed chunk."""
        keys = x.shape[1] + (0 if cache is None else cache.shape[3])
        pos = relative_rows(x.shape[1], keys, self.d, x.device).to(x.dtype)
        windows = []
        for i, layer in enumerate(layers):
            x, kv = layer(x, pos, mask, None if cache is None else cache[2 * i : 2 * i + 2])
            windows.append(kv)
        return x, torch.cat(windows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embedded tokens [B, T, d] of a whole reply (its end: the look-ahead sees zeros) -> [B, 2T, d]."""
        x = self.embed(x)
        x = self.pre_lookahead_layer(F.pad(x, (0, 0, 0, self.lookahead)))[0]
        x = self._stack(self.encoders, x, chunk_causal_mask(x.shape[1], self.chunk, x.device), None)[0]
        x = self.up_embed(self.up_layer(x)[0])
        mask = chunk_causal_mask(x.shape[1], self.chunk * self.stride, x.device)
        return self.after_norm(self._stack(self.up_encoders, x, mask, None)[0])

    def forward_chunk(self, x, offset, length, enc_cache, up_cache, look_cache, conv_cache):  # type: ignore[no-untyped-def]
        """One chunk of embedded tokens [1, C + lookahead, d] (positions from ``length`` on
        are padding) at token ``offset`` -> (h [1, stride C, d], the four caches for the next chunk)."""
        s, c = self.stride, x.shape[1] - self.lookahead
        real = torch.arange(x.shape[1], device=x.device) < length
        x = self.embed(x) * real[None, :, None].to(x.dtype)  # the release pads the embedded input with zeros
        x, look = self.pre_lookahead_layer(x, look_cache)
        mask = window_mask(c, enc_cache.shape[3], offset, length)
        x, enc = self._stack(self.encoders, x, mask, enc_cache)
        x, conv = self.up_layer(x, conv_cache)
        mask = window_mask(s * c, up_cache.shape[3], s * offset, s * length)
        x, up = self._stack(self.up_encoders, self.up_embed(x), mask, up_cache)
        return self.after_norm(x), enc, up, look, conv
