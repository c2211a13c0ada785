"""VITA-1.5's codec decoder: TiCodec's ``quantizer`` (one 1024-code book of 512-d frames at 40 Hz,
eight global-token books whose 16-d rows join into a 128-d voice vector) and its HiFi-GAN
``generator`` (x600: 8*5*5*3 to 24 kHz), the voice vector added after the stage whose channel
count equals its width.

Module tree, tensor names and maths follow the release (VITA-1.5 ``vita/model/vita_tts/decoder/
ticodec/models.py``: ``Quantizer.embed``/``embed_gst``, ``Generator`` with ``ResBlock1``;
``vqvae.py`` for the checkpoint, a dict of ``generator``, ``quantizer`` and ``encoder`` state
dicts; weight norm by the older ``weight_g``/``weight_v`` hook, folded at load). The codec's
encoder (speech -> codes) is in the release's file for training; nothing here reads it.

The configuration is the release's ``codec/model.json``; the keys this decoder reads are the
fields below, the training keys beside them (losses' mel settings, learning rates) are not ours."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omni_export.errors import ConfigError
from omni_export.export.components.base import Component, Role
from omni_export.export.trace_specs import F32, I64, Call, MethodSpec, Tensor, dim
from omni_export.export.weight_norm import weight_norm

LRELU_SLOPE = 0.1
OLD_HOOK = 1  # weight_norm form index: TiCodec was trained with torch.nn.utils.weight_norm's hook
# VITA-1.5's demos decode with this global-token set (web_demo/server.py); model.json carries it too.
RELEASED_GLOBAL_TOKENS = (473, 975, 419, 219, 565, 121, 550, 616)


@dataclass(frozen=True)
class CodecConfig:
    """The fields of the release's codec/model.json that decoding reads (its names)."""

    resblock: str = "1"
    upsample_rates: tuple[int, ...] = (8, 5, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 11, 5)
    upsample_initial_channel: int = 512
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    n_codes: int = 1024
    n_code_groups: int = 1
    residul_layer: int = 1  # sic, the release's key
    global_code_num: int = 8
    global_feature_conv: tuple[int, ...] = (128, 64, 128, 3, 1)
    global_tokens: tuple[int, ...] = RELEASED_GLOBAL_TOKENS
    sampling_rate: int = 24000
    code_dim: int = 512  # the generator's conv_pre input: fixed at 512 in the release, not in its model.json

    def __post_init__(self) -> None:
        if self.resblock != "1":
            raise ConfigError(f"codec resblock {self.resblock!r} is not supported; VITA-1.5's TiCodec uses '1'")
        if (self.n_code_groups, self.residul_layer) != (1, 1):
            raise ConfigError("codec: one code group and one residual layer are supported (VITA-1.5's TiCodec); "
                              f"got n_code_groups {self.n_code_groups}, residul_layer {self.residul_layer}")  # fmt: skip
        if self.global_width % self.global_code_num:
            raise ConfigError(f"codec: global width {self.global_width} is not a multiple of global_code_num {self.global_code_num}")
        widths = [self.upsample_initial_channel // 2 ** (i + 1) for i in range(len(self.upsample_rates))]
        if self.global_width not in widths:
            raise ConfigError(f"codec: the global voice vector ({self.global_width} wide) matches no generator stage "
                              f"(channels {widths}); the release adds it where the widths agree")  # fmt: skip
        if len(self.global_tokens) != self.global_code_num or not all(0 <= t < self.n_codes for t in self.global_tokens):
            raise ConfigError(f"codec: global_tokens must be {self.global_code_num} ids below {self.n_codes}; got {list(self.global_tokens)}")

    @classmethod
    def from_released(cls, d: dict[str, Any], where: str) -> CodecConfig:
        """Read the release's model.json: the fields above, each checked; other keys are training's."""
        kw = {}
        for f in fields(cls):
            if f.name in d:
                v = d[f.name]
                kw[f.name] = tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
        try:
            return cls(**kw)
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def to_released(self) -> dict[str, Any]:
        """The release's keys, plus ``code_dim`` when it is not the release's fixed 512 (a small
        synthetic codec); a released file without it reads as 512."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "code_dim" or self.code_dim != 512}

    @property
    def hop(self) -> int:
        return math.prod(self.upsample_rates)

    @property
    def sample_rate(self) -> int:
        return self.sampling_rate

    @property
    def global_width(self) -> int:
        return self.global_feature_conv[0]

    @property
    def n_global(self) -> int:
        return self.global_code_num


class CodeBook(nn.Module):
    def __init__(self, n: int, d: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n, d)


class Quantizer(nn.Module):
    """Decoding half of TiCodec's quantizer: code and global-token lookups."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        self.quantizer_modules = nn.ModuleList([CodeBook(cfg.n_codes, cfg.code_dim)])
        self.quantizer_modules_globaltokens = nn.ModuleList(
            CodeBook(cfg.n_codes, cfg.global_width // cfg.global_code_num) for _ in range(cfg.global_code_num)
        )

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, T] -> [B, code_dim, T]."""
        return self.quantizer_modules[0].embedding(codes).transpose(1, 2)

    def embed_gst(self, global_codes: torch.Tensor) -> torch.Tensor:
        """global codes [B, n] -> the voice vector [B, n * width]: each book's row, concatenated."""
        return torch.cat([book.embedding(global_codes[:, j]) for j, book in enumerate(self.quantizer_modules_globaltokens)], dim=-1)


class ResBlock1(nn.Module):
    def __init__(self, ch: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        conv = lambda d: weight_norm(nn.Conv1d(ch, ch, kernel, dilation=d, padding=d * (kernel - 1) // 2), OLD_HOOK)  # noqa: E731
        self.convs1 = nn.ModuleList(conv(d) for d in dilations)
        self.convs2 = nn.ModuleList(conv(1) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2, strict=True):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class Generator(nn.Module):
    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        ch0, nk = cfg.upsample_initial_channel, len(cfg.resblock_kernel_sizes)
        self.nk = nk
        self.conv_pre = weight_norm(nn.Conv1d(cfg.code_dim, ch0, 7, padding=3), OLD_HOOK)
        self.ups = nn.ModuleList(
            weight_norm(nn.ConvTranspose1d(ch0 // 2**i, ch0 // 2 ** (i + 1), k, u, padding=(k - u) // 2), OLD_HOOK)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True))
        )
        self.resblocks = nn.ModuleList(
            ResBlock1(ch0 // 2 ** (i + 1), k, tuple(d))
            for i in range(len(cfg.upsample_rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True)
        )
        self.conv_post = weight_norm(nn.Conv1d(ch0 // 2 ** len(cfg.upsample_rates), 1, 7, padding=3), OLD_HOOK)

    def forward(self, x: torch.Tensor, voice: torch.Tensor) -> torch.Tensor:
        """x [B, code_dim, T], voice [B, W] -> waveform [B, T * hop]."""
        x = self.conv_pre(x)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            x = sum(self.resblocks[i * self.nk + j](x) for j in range(self.nk)) / self.nk
            if x.shape[1] == voice.shape[-1]:
                x = x + voice[:, :, None]
        return torch.tanh(self.conv_post(F.leaky_relu(x, LRELU_SLOPE))).squeeze(1)


class CodecDecoder(Component, nn.Module):
    role = Role.VOCODER

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.quantizer = Quantizer(cfg)
        self.generator = Generator(cfg)

    @property
    def default_global_codes(self) -> torch.Tensor:
        """The voice the release's demos speak in (model.json's ``global_tokens``)."""
        return torch.tensor(self.cfg.global_tokens, dtype=torch.long)

    def forward(self, codes: torch.Tensor, global_codes: torch.Tensor) -> torch.Tensor:
        """codes [1, T] (0..n_codes-1), global_codes [1, n_global] -> waveform [1, T * hop]."""
        return self.generator(self.quantizer.embed(codes), self.quantizer.embed_gst(global_codes))

    # -- as a component ---------------------------------------------------------------------
    def export_methods(self, limits):  # type: ignore[no-untyped-def]
        c = self.cfg
        codes = dim("codes", 2, limits.max_speech_tokens)
        return [MethodSpec("forward", Call(self), (torch.randint(0, c.n_codes, (1, 40)), torch.randint(0, c.n_codes, (1, c.n_global))),
                           ({1: codes}, None),
                           (Tensor("codes", I64, (1, "codes")), Tensor("global_codes", I64, (1, c.n_global))),
                           (Tensor("wav", F32, (1, f"codes*{c.hop}")),))]  # fmt: skip

    def golden_script(self, ctx, ref):  # type: ignore[no-untyped-def]
        g = torch.Generator().manual_seed(ctx.seed)
        codes = torch.randint(0, self.cfg.n_codes, (1, 40), generator=g)
        return [("forward", (codes, self.default_global_codes[None].clone()))]
