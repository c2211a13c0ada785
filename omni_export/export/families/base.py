"""What a model family is: its config, its components (specs) and how checkpoint tensor names map
onto component parameters. A new family adds a module here, not branches elsewhere."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from omni_export.registry import Registry
from omni_export.runtime_py.prompt import SYSTEM_PROMPT


def chat_template(root: Path) -> str | None:
    """The checkpoint's own chat template (tokenizer_config.json's ``chat_template``, a Jinja
    string), which the runtime renders each turn with; None: ChatML, Qwen's."""
    path = Path(root) / "tokenizer_config.json"
    if not path.is_file():
        return None
    template = json.loads(path.read_text()).get("chat_template")
    if isinstance(template, list):  # the newer list form: [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) and template.strip() else None

if TYPE_CHECKING:
    from omni_export.export.checkpoint import Checkpoint

SIZES = ("tiny", "small", "full")
MAIN_WEIGHTS = ""  # the safetensors set at the checkpoint root


@dataclass(frozen=True)
class ComponentSpec:
    """One deployable component.

    ``weights`` maps checkpoint-name prefixes to module-parameter prefixes; a checkpoint tensor
    belongs to the spec with the longest matching prefix within the same ``source`` (the root
    safetensors set, or a ``.pt`` file relative to the checkpoint directory).
    """

    name: str
    build: Callable[[], nn.Module]
    weights: tuple[tuple[str, str], ...]
    source: str = MAIN_WEIGHTS
    description: str = ""
    # Checkpoint-name prefixes in ``source`` that the release ships for something no exported
    # method reads (a codec's training encoder): loaded as nothing, and not refused as unexpected.
    ignored: tuple[str, ...] = ()
    # A .pt source that holds one state dict per top-level module ({"generator": {...}, ...}), as
    # TiCodec's does; the loader reads either shape, the synthetic writer writes this one.
    nested: bool = False

    def to_checkpoint_name(self, module_key: str) -> str:
        for ckpt_prefix, mod_prefix in sorted(self.weights, key=lambda w: -len(w[1])):
            if module_key.startswith(mod_prefix):
                return ckpt_prefix + module_key[len(mod_prefix) :]
        raise KeyError(f"{self.name}: parameter {module_key!r} is not covered by any weight prefix")


class Family(ABC):
    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    description: ClassVar[str]
    audio_sample_rate: ClassVar[int] = 16000
    output_sample_rate: ClassVar[int] = 24000
    special_tokens: ClassVar[tuple[str, ...]]
    eos_tokens: ClassVar[tuple[str, ...]] = ("<|im_end|>", "<|endoftext|>")

    # -- configuration ------------------------------------------------------------------------
    @abstractmethod
    def preset(self, size: str) -> Any:
        """The family config for a synthetic size (tiny / small / full)."""

    @abstractmethod
    def read_config(self, root: Path, config_json: dict[str, Any]) -> Any:
        """Parse config.json (and any side files) into the family config."""

    @abstractmethod
    def config_files(self, cfg: Any) -> dict[str, dict[str, Any]]:
        """Relative path -> JSON content of every config file a checkpoint carries."""

    @abstractmethod
    def specs(self, cfg: Any) -> Sequence[ComponentSpec]:
        """The components, in pipeline order."""

    def llm_config(self, cfg: Any) -> Any:
        return cfg.llm

    image_token: ClassVar[str]
    audio_token: ClassVar[str]
    # How the placeholders are wrapped in the user turn: (prefix, suffix).
    image_wrap: ClassVar[tuple[str, str]] = ("", "\n")
    audio_wrap: ClassVar[tuple[str, str]] = ("", "\n")
    # How a clip is taken: runtime_py/video.py's VideoConfig (None: the family takes no video).
    video: ClassVar[dict[str, Any] | None] = None

    # -- what a bundle carries for the runtime --------------------------------------------------
    def runtime_config(self, ckpt: Checkpoint) -> dict[str, Any]:
        """Everything the runtime needs beyond the artifacts: ids, rates, tiling, chunking."""
        vision = ckpt.components["vision_encoder"]
        ids = ckpt.special_ids
        return {
            "special_ids": dict(ids),
            "eos_ids": [ids[t] for t in self.eos_tokens],
            "image_token_id": ids[self.image_token],
            "audio_token_id": ids[self.audio_token],
            "prompt": {"system": SYSTEM_PROMPT, "image_token": self.image_token, "audio_token": self.audio_token,
                       "image": list(self.image_wrap), "audio": list(self.audio_wrap), "chat_template": chat_template(ckpt.root)},
            "audio_sample_rate": self.audio_sample_rate,
            "output_sample_rate": self.output_sample_rate,
            "image": {"tile_size": vision.cfg.image_size, "tokens_per_tile": vision.tokens_per_tile(),
                      "max_tiles": ckpt.config.max_dynamic_patch, "thumbnail": True,
                      "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
            "llm": {"hidden_size": self.llm_config(ckpt.config).hidden_size, "vocab_size": self.llm_config(ckpt.config).vocab_size},
            **({"video": dict(self.video)} if self.video else {}),
        }  # fmt: skip

    def assets(self, ckpt: Checkpoint) -> dict[str, np.ndarray]:
        """Arrays the runtime needs that are not artifact weights (default voices)."""
        return {}

    def asset_files(self, ckpt: Checkpoint) -> dict[str, Path]:
        """Files the release ships beside its weights that the runtime runs as they are (a speaker
        encoder in ONNX), checked: key -> path in the checkpoint. A bundle carries them under assets/."""
        return {}

    def write_side_files(self, cfg: Any, out: Path, gen: torch.Generator) -> None:
        """Synthetic checkpoints: write the release's files of that kind."""


FAMILIES: Registry[Family] = Registry("model family")
MODEL_TYPES: Registry[Family] = Registry("model_type")


def register(family: Family) -> Family:
    FAMILIES.register(family.name, family)
    for mt in family.model_types:
        MODEL_TYPES.register(mt, family)
    return family
