"""QuantResult: the integers, scales and zero points of every quantized weight, computed once
per (checkpoint, recipe, calibration) and encoded unchanged by every target."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from omni_export.errors import OmniExportError
from omni_export.files import replace_dir, staged_dir
from omni_export.quantize.grid import Grid
from omni_export.quantize.recipe import QuantConfig


class QuantCacheError(OmniExportError):
    """A cached QuantResult is unreadable; delete it and run again."""


@dataclass
class QTensor:
    """``w ~= (q - zero) * scale`` per group of ``group_size`` input channels.

    q: int8 [out, in] holding ``bits``-bit codes; scale: fp32 [out, in // group_size], every
    value exact in bf16 and fp16; zero: int8 like scale (all zero when symmetric)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    config: QuantConfig
    # Quantized activations (w8a8): the input's per-tensor scale, absmax / 127 over the
    # calibration data, for targets that quantize activations statically (TensorRT). None when
    # the config keeps activations float.
    act_scale: torch.Tensor | None = None

    @property
    def group_size(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]

    @property
    def grid(self) -> Grid:
        return Grid(self.config.bits, self.group_size, self.config.symmetric)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, k = self.q.shape
        g = self.group_size
        w = Grid.dequant(self.q.reshape(out, k // g, g), self.scale, self.zero)
        return w.reshape(out, k).to(dtype)

    def nbytes(self) -> int:
        return stored_bytes(self.q.numel(), self.scale.numel(), self.config)


def stored_bytes(codes: int, groups: int, cfg: QuantConfig) -> int:
    """Deployed size of ``codes`` quantized weights in ``groups`` groups: packed codes, a bf16
    scale per group, an int8 zero point per group when asymmetric."""
    return codes * cfg.bits // 8 + groups * 2 + (0 if cfg.symmetric else groups)


def weight_bytes(shape: tuple[int, int], cfg: QuantConfig) -> int:
    """``stored_bytes`` of an [out, in] weight under ``cfg``, without quantizing it."""
    out, k = shape
    return stored_bytes(out * k, out * (k // (cfg.group_size or k)), cfg)


def _under(entries: dict[str, Any], component: str) -> dict[str, Any]:
    """``component.path`` keys of ``entries`` as module paths within that component."""
    prefix = component + "."
    return {k[len(prefix):]: v for k, v in entries.items() if k.startswith(prefix)}


@dataclass
class QuantResult:
    recipe: str
    source_fingerprint: str
    tensors: dict[str, QTensor] = field(default_factory=dict)
    # Float tensors an algorithm changed (AWQ folds its scales into the preceding norm).
    floats: dict[str, torch.Tensor] = field(default_factory=dict)
    # Per quantized weight: method, relative weight error, calibration output error when measured.
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    def for_component(self, component: str) -> dict[str, QTensor]:
        return _under(self.tensors, component)

    def floats_for(self, component: str) -> dict[str, torch.Tensor]:
        return _under(self.floats, component)

    def shares(self, name: str) -> str | None:
        """The table whose codes and scales the tied head ``name`` holds (None: its own)."""
        return self.layers.get(name, {}).get("shares")

    # -- storage ---------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        directory = Path(directory)
        with staged_dir(directory) as tmp:
            self._write(tmp)
            replace_dir(tmp, directory)

    def _write(self, tmp: Path) -> None:
        from omni_export.export.safetensors_io import write_streaming

        blobs: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"recipe": self.recipe, "source_fingerprint": self.source_fingerprint,
                                "seconds": self.seconds, "layers": self.layers, "tensors": {}}  # fmt: skip
        for name, t in self.tensors.items():
            if self.shares(name):  # a tied head holding its table's tensors: written once, as the table
                continue
            blobs[f"{name}::q"], blobs[f"{name}::scale"], blobs[f"{name}::zero"] = t.q, t.scale, t.zero
            if t.act_scale is not None:
                blobs[f"{name}::act_scale"] = t.act_scale.reshape(1)
            meta["tensors"][name] = t.config.__dict__
        for name, w in self.floats.items():
            blobs[f"{name}::float"] = w
        # one tensor at a time: a 4B model's codes are never serialized as one bytes object
        write_streaming(tmp / "tensors.safetensors", [(k, tuple(v.shape), v.dtype) for k, v in blobs.items()], blobs.__getitem__)
        (tmp / "result.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: Path) -> QuantResult:
        """Memory-mapped: codes are read from the file as a build uses them."""
        from omni_export.export.safetensors_io import SafetensorsFile

        try:
            meta = json.loads((directory / "result.json").read_text())
            store = SafetensorsFile(directory / "tensors.safetensors")
            blobs = {k: store.get(k) for k in store.keys()}
            tensors = {
                name: QTensor(blobs[f"{name}::q"], blobs[f"{name}::scale"], blobs[f"{name}::zero"], QuantConfig(**cfg),
                              blobs[f"{name}::act_scale"].reshape(()) if f"{name}::act_scale" in blobs else None)
                for name, cfg in meta["tensors"].items()
            }
            tensors.update({name: tensors[info["shares"]] for name, info in meta["layers"].items() if info.get("shares")})
        except Exception as exc:  # a corrupt file, JSON, missing keys: all mean "re-run"
            raise QuantCacheError(f"cached quantization at {directory} is unreadable ({exc}); delete that directory and run again") from None
        floats = {k[: -len("::float")]: v for k, v in blobs.items() if k.endswith("::float")}
        return cls(meta["recipe"], meta["source_fingerprint"], tensors, floats, meta["layers"], meta["seconds"])
