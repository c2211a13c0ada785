"""InternViT vision encoder (names as InternVL's InternVisionModel), pixel shuffle and projectors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omni_export.errors import ConfigError
from omni_export.export.components.base import Component, Role
from omni_export.export.components.layers import RMSNorm, merge_heads, sdpa, split_heads
from omni_export.export.trace_specs import F32, Call, MethodSpec, Tensor, dim, dtype_of


@dataclass(frozen=True)
class InternViTConfig:
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 448
    patch_size: int = 14
    qkv_bias: bool = True
    qk_normalization: bool = False
    layer_norm_eps: float = 1e-6
    norm_type: str = "layer_norm"
    initializer_factor: float = 0.1

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], where: str = "vision_config") -> InternViTConfig:
        fields = cls.__dataclass_fields__
        kwargs = {k: d[k] for k in fields if k in d}
        if kwargs.get("norm_type", "layer_norm") not in ("layer_norm", "rms_norm"):
            raise ConfigError(f"{where}.norm_type must be layer_norm or rms_norm, got {kwargs['norm_type']!r}")
        if kwargs.get("image_size", 448) % kwargs.get("patch_size", 14):
            raise ConfigError(f"{where}: image_size must be a multiple of patch_size")
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.update(architectures=["InternVisionModel"], model_type="intern_vit_6b", num_channels=3, hidden_act="gelu",
                 drop_path_rate=0.0, use_flash_attn=False)
        return d

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


def _norm(cfg: InternViTConfig, dim: int) -> nn.Module:
    return RMSNorm(dim, cfg.layer_norm_eps) if cfg.norm_type == "rms_norm" else nn.LayerNorm(dim, eps=cfg.layer_norm_eps)


class InternVisionEmbeddings(nn.Module):
    def __init__(self, cfg: InternViTConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, d))
        self.patch_embedding = nn.Conv2d(3, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.patches_per_side**2 + 1, d))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([cls, x], dim=1) + self.position_embedding.to(x.dtype)


class InternAttention(nn.Module):
    def __init__(self, cfg: InternViTConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.qkv = nn.Linear(d, 3 * d, bias=cfg.qkv_bias)
        self.proj = nn.Linear(d, d)
        self.qk_normalization = cfg.qk_normalization
        if cfg.qk_normalization:
            self.q_norm = RMSNorm(d, cfg.layer_norm_eps)
            self.k_norm = RMSNorm(d, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (split_heads(t, self.heads) for t in (q, k, v))
        return self.proj(merge_heads(sdpa(q, k, v, None)))


class InternMLP(nn.Module):
    def __init__(self, d: int, inter: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, inter)
        self.fc2 = nn.Linear(inter, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, cfg: InternViTConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.attn = InternAttention(cfg)
        self.mlp = InternMLP(d, cfg.intermediate_size)
        self.norm1 = _norm(cfg, d)
        self.norm2 = _norm(cfg, d)
        self.ls1 = nn.Parameter(cfg.initializer_factor * torch.ones(d))
        self.ls2 = nn.Parameter(cfg.initializer_factor * torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class InternVisionEncoder(nn.Module):
    def __init__(self, cfg: InternViTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class InternVisionModel(nn.Module):
    def __init__(self, cfg: InternViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = InternVisionEmbeddings(cfg)
        self.encoder = InternVisionEncoder(cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embeddings(pixels))


def pixel_shuffle(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """InternVL's pixel shuffle (ps_version v2): [n, w, h, c] -> [n, w*s, h*s, c/(s*s)]."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


def mlp1_projector(vit_hidden: int, llm_hidden: int, scale: float = 0.5) -> nn.Sequential:
    """InternVL's ``mlp1``: LayerNorm -> Linear -> GELU -> Linear (keys mlp1.0/.1/.3)."""
    d = int(vit_hidden / (scale * scale))
    return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))


def mlp2x_gelu_projector(in_dim: int, llm_hidden: int) -> nn.Sequential:
    """LLaVA/VITA ``mlp2x_gelu``: Linear -> GELU -> Linear (keys 0/2)."""
    return nn.Sequential(nn.Linear(in_dim, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))


class VisionEncoder(Component, nn.Module):
    """Tiles [N, 3, S, S] (ImageNet-normalised) -> LLM tokens [N * (S/patch/2)^2, llm_hidden]."""

    role = Role.ENCODER

    def __init__(self, cfg: InternViTConfig, projector: nn.Module, downsample: float = 0.5) -> None:
        super().__init__()
        self.cfg = cfg
        self.downsample = downsample
        self.encoder = InternVisionModel(cfg)
        self.projector = projector

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.encoder(pixels)[:, 1:]
        side = self.cfg.patches_per_side
        x = pixel_shuffle(x.reshape(x.shape[0], side, side, -1), self.downsample)
        x = self.projector(x.reshape(x.shape[0], -1, x.shape[-1]))
        return x.reshape(-1, x.shape[-1])

    def tokens_per_tile(self) -> int:
        return int((self.cfg.patches_per_side * self.downsample) ** 2)

    # -- as a component ---------------------------------------------------------------------
    def export_methods(self, limits):  # type: ignore[no-untyped-def]
        s = self.cfg.image_size
        bound = min(limits.tiles_per_call or limits.max_tiles, limits.max_tiles)
        h = self.projector[-1].out_features
        if bound == 1:  # one tile per call: a static shape (an export Dim needs a range)
            n, dyn, tiles, tokens = 1, (None,), 1, self.tokens_per_tile()
        else:
            n, dyn, tiles, tokens = 2, ({0: dim("tiles", 1, bound)},), "tiles", f"tiles*{self.tokens_per_tile()}"
        return [MethodSpec("forward", Call(self), (torch.randn(n, 3, s, s, dtype=dtype_of(self)),), dyn,
                           (Tensor("pixels", F32, (tiles, 3, s, s)),), (Tensor("tokens", F32, (tokens, h)),))]  # fmt: skip

    def golden_script(self, ctx, ref):  # type: ignore[no-untyped-def]
        from omni_export.export.golden import image_tiles

        n = 1 if (ctx.limits.tiles_per_call or 2) == 1 else 2
        return [("forward", (image_tiles(n, self.cfg.image_size),))]

    def photo_tiles(self) -> torch.Tensor:
        """A real photo (matplotlib's sample) through the InternVL tiling, up to 4 tiles."""
        from omni_export.quantize.calibrate import photo_path
        from omni_export.runtime_py.image import preprocess_image

        return torch.from_numpy(preprocess_image(photo_path(), tile=self.cfg.image_size, max_num=4)).to(dtype_of(self))

    def calibration(self, sources):  # type: ignore[no-untyped-def]
        from omni_export.quantize.calibrate import Calibration

        return Calibration(calls=[lambda t=t: self(t[None]) for t in self.photo_tiles()])

    def calibration_tokens(self) -> torch.Tensor:
        """LLM-width tokens of one real photo tile, as the LLM sees them in use."""
        return self(self.photo_tiles()[:1]).reshape(1, -1, self.projector[-1].out_features)
