"""VITA-1.5: InternViT + mlp2x_gelu, Whale audio encoder + CNN adapter, Qwen2.5-7B, and the
NAR/AR codec-token TTS with a TiCodec-style decoder.

Checkpoint layout (VITAQwen2ForCausalLM conventions):

| file / prefix                                   | component      | module prefix |
| ----------------------------------------------- | -------------- | ------------- |
| safetensors `model.vision_tower.vision_tower.`  | vision_encoder | encoder.      |
| safetensors `model.mm_projector.`               | vision_encoder | projector.    |
| safetensors `model.audio_encoder.encoder.`      | audio_encoder  | encoder.      |
| safetensors `model.audio_encoder.adpter.`       | audio_encoder  | adpter.       |
| safetensors `model.`, `lm_head.`                | llm            | (Qwen2ForCausalLM names) |
| `vita_tts_ckpt/decoder/final.pt` (+ model.json) | tts_nar, tts_ar | layers_pre_nn. -> pre_nn.layers.; layers./norm. -> ar.; embedding. -> codec_embedding.; out_fnn. -> codec_head. (layers_prefix. not read) |
| `vita_tts_ckpt/codec/final.pt` (+ model.json)   | codec_decoder  | generator., quantizer. (its `encoder` is not read) |

config.json is the flat Qwen2 config with ``model_type: vita-Qwen2`` and VITA's ``mm_*`` keys; the
vision tower's and audio encoder's configs, which the release fetches from the hub by name, are
localised into ``vision_config`` and ``audio_config``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omni_export.configs import from_dict, to_dict
from omni_export.errors import ConfigError
from omni_export.export.components.frontends import FbankFrontend
from omni_export.export.components.codec import CodecConfig, CodecDecoder
from omni_export.export.components.internvit import (
    InternViTConfig,
    VisionEncoder,
    mlp2x_gelu_projector,
)
from omni_export.export.components.qwen import QwenConfig, QwenForCausalLM
from omni_export.export.components.vita_tts import VitaTTSAr, VitaTTSConfig, VitaTTSNar
from omni_export.export.components.whale import WhaleAudioEncoder, WhaleConfig
from omni_export.export.families.base import ComponentSpec, Family, register
from omni_export.export.families.common import require
from omni_export.export.trace_specs import Limits
from omni_export.files import read_json

TTS_DIR = "vita_tts_ckpt/decoder"
CODEC_DIR = "vita_tts_ckpt/codec"
MM_KEYS = {
    "mm_vision_tower", "mm_audio_encoder", "mm_hidden_size", "mm_projector_type", "mm_use_im_start_end",
    "mm_use_im_patch_token", "mm_vision_select_layer", "mm_vision_select_feature", "mm_projector_lr",
}  # fmt: skip


@dataclass(frozen=True)
class Vita15Config:
    llm: QwenConfig
    vision: InternViTConfig
    audio: WhaleConfig
    tts: VitaTTSConfig
    codec: CodecConfig
    downsample_ratio: float = 0.5
    max_dynamic_patch: int = 12


def _llm(vocab: int, hidden: int, layers: int, heads: int, kv: int, inter: int) -> QwenConfig:
    return QwenConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
                      rope_theta=1e6, attention_bias=True, tie_word_embeddings=False)


def _preset(size: str) -> Vita15Config:
    if size == "tiny":
        llm = _llm(640, 64, 2, 4, 2, 128)
        vision = InternViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=112)
        audio = WhaleConfig(output_size=32, attention_heads=2, linear_units=64, num_blocks=2, adapter_hidden=64)
        tts = VitaTTSConfig(hidden_size=32, num_heads=2, intermediate_size=64, num_blocks=2)  # 2 frames per LLM token
        # 32 -> 16 -> 8 -> 4 -> 2 channels; the 8-wide voice vector (eight 1-d books) joins after stage 1
        codec = CodecConfig(upsample_initial_channel=32, resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1,),),
                            global_feature_conv=(8, 8, 8, 3, 1), global_tokens=(1, 2, 3, 4, 5, 6, 7, 8), code_dim=32)
    elif size == "small":
        llm = _llm(16384, 768, 12, 12, 2, 2048)
        vision = InternViTConfig(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=1024)
        audio = WhaleConfig(output_size=256, attention_heads=4, linear_units=1024, num_blocks=4, adapter_hidden=512)
        tts = VitaTTSConfig(hidden_size=256, num_heads=4, intermediate_size=704, num_blocks=4)  # 3 frames per LLM token
        codec = CodecConfig(upsample_initial_channel=128, global_feature_conv=(32, 64, 32, 3, 1), code_dim=128)
    elif size == "full":
        llm = _llm(152064, 3584, 28, 28, 4, 18944)  # Qwen2.5-7B
        vision, audio = InternViTConfig(), WhaleConfig()
        # Freeze-Omni's decoder/model.json (VITA-1.5's TTS): 896 wide, 14 heads, 4 blocks, with the
        # prefix layers it never uses at inference; 4 frames per Qwen2.5-7B token
        tts, codec = VitaTTSConfig(kv_cache_prefix_finetune=True), CodecConfig()
    else:
        raise ConfigError(f"unknown size {size!r} for vita15; choose tiny, small or full")
    return Vita15Config(llm=llm, vision=vision, audio=audio, tts=tts, codec=codec)


class Vita15(Family):
    name = "vita15"
    model_types = ("vita-Qwen2",)
    description = "VITA-1.5: InternViT + Whale audio encoder + Qwen2.5-7B + NAR/AR codec TTS"
    sizes = ("tiny", "small", "full")
    image_token = "<image>"
    # VITA-1.5's video demo: 1 fps, 4 to 16 frames, one 448 frame each through CLIP's processor
    # (centre square), the frames' placeholders back to back then one newline.
    video = {"sampling": "fps", "fps": 1.0, "min_frames": 4, "max_frames": 16, "fit": "center_crop", "joined": True}
    audio_token = "<audio>"
    special_tokens = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<audio>", "<video>")

    def preset(self, size: str) -> Vita15Config:
        return _preset(size)

    def read_config(self, root: Path, d: dict[str, Any]) -> Vita15Config:
        where = str(root / "config.json")
        unknown_mm = sorted(k for k in d if k.startswith("mm_") and k not in MM_KEYS)
        if unknown_mm:
            raise ConfigError(f"{where}: unknown VITA key(s) {unknown_mm}; known: {sorted(MM_KEYS)}")
        if d.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
            raise ConfigError(f"{where}: mm_projector_type {d['mm_projector_type']!r} is not supported; VITA-1.5 uses mlp2x_gelu")
        llm = QwenConfig.from_hf({**d, "model_type": "qwen2"}, where)
        tts = VitaTTSConfig.from_released(read_json(root / TTS_DIR / "model.json", kind=list), f"{root / TTS_DIR / 'model.json'}")
        tts.frames_per_token(llm.hidden_size)  # refuses a width the LLM's embeddings do not split into
        codec = CodecConfig.from_released(read_json(root / CODEC_DIR / "model.json"), f"{root / CODEC_DIR / 'model.json'}")
        if codec.n_codes != tts.codebook_size:
            raise ConfigError(f"{CODEC_DIR}/model.json: n_codes {codec.n_codes} differs from the TTS's codebook size {tts.codebook_size}")
        return Vita15Config(
            llm=llm,
            vision=InternViTConfig.from_hf(require(d, "vision_config", where), f"{where}: vision_config"),
            audio=from_dict(WhaleConfig, require(d, "audio_config", where), where=f"{where}: audio_config"),
            tts=tts,
            codec=codec,
            max_dynamic_patch=int(d.get("max_dynamic_patch", 12)),
        )

    def config_files(self, cfg: Vita15Config) -> dict[str, dict[str, Any]]:
        config = {**cfg.llm.to_hf()}
        config.update(
            architectures=["VITAQwen2ForCausalLM"], model_type="vita-Qwen2",
            mm_vision_tower="OpenGVLab/InternViT-300M-448px", mm_audio_encoder="VITA-MLLM/VITA-1.5_AudioEnc",
            mm_hidden_size=int(cfg.vision.hidden_size / cfg.downsample_ratio**2), mm_projector_type="mlp2x_gelu",
            image_aspect_ratio="square", max_dynamic_patch=cfg.max_dynamic_patch, tokenizer_model_max_length=6200,
            vision_config=cfg.vision.to_hf(), audio_config=to_dict(cfg.audio), transformers_version="4.41.1",
        )  # fmt: skip
        return {
            "config.json": config,
            "generation_config.json": {"do_sample": False, "max_new_tokens": 512},
            f"{TTS_DIR}/model.json": cfg.tts.to_released(),
            f"{CODEC_DIR}/model.json": cfg.codec.to_released(),
        }

    def specs(self, cfg: Vita15Config) -> list[ComponentSpec]:
        d_llm = cfg.llm.hidden_size
        vit_out = int(cfg.vision.hidden_size / cfg.downsample_ratio**2)
        return [
            ComponentSpec("audio_frontend", lambda: FbankFrontend(cfg.audio.input_dim), (),
                          description="Kaldi fbank: 16 kHz samples -> 80-bin features (100 Hz)"),
            ComponentSpec("vision_encoder", lambda: VisionEncoder(cfg.vision, mlp2x_gelu_projector(vit_out, d_llm), cfg.downsample_ratio),
                          (("model.vision_tower.vision_tower.", "encoder."), ("model.mm_projector.", "projector.")),
                          description="InternViT + pixel shuffle + mlp2x_gelu: tiles -> LLM tokens"),
            ComponentSpec("audio_encoder", lambda: WhaleAudioEncoder(cfg.audio, d_llm),
                          (("model.audio_encoder.encoder.", "encoder."), ("model.audio_encoder.adpter.", "adpter.")),
                          description="Whale encoder + CNN adapter: fbank -> LLM tokens (12.5 Hz)"),
            ComponentSpec("llm", lambda: QwenForCausalLM(cfg.llm), (("model.", "model."), ("lm_head.", "lm_head.")),
                          description="Qwen2.5 decoder with static KV cache"),
            ComponentSpec("tts_nar", lambda: VitaTTSNar(cfg.tts), (("layers_pre_nn.", "pre_nn.layers."),), source=f"{TTS_DIR}/final.pt",
                          ignored=("layers_prefix.",), description="LLM text embeddings as frames -> layers_pre_nn (both ways)"),
            ComponentSpec("tts_ar", lambda: VitaTTSAr(cfg.tts),
                          (("layers.", "ar.layers."), ("norm.", "ar.norm."), ("embedding.", "codec_embedding."), ("out_fnn.", "codec_head.")),
                          source=f"{TTS_DIR}/final.pt", ignored=("layers_prefix.",),
                          description="[bos, NAR output] both ways, then sos and codec tokens through the cache"),
            ComponentSpec("codec_decoder", lambda: CodecDecoder(cfg.codec), (("generator.", "generator."), ("quantizer.", "quantizer.")),
                          source=f"{CODEC_DIR}/final.pt", ignored=("encoder.",), nested=True,
                          description="TiCodec: codec tokens (40 Hz) + global voice tokens -> 24 kHz"),
        ]  # fmt: skip

    def runtime_config(self, ckpt) -> dict[str, Any]:
        from omni_export.export.components.whale import MAX_FRAMES as WHALE_MAX_FRAMES

        t, c = ckpt.config.tts, ckpt.config.codec
        out = super().runtime_config(ckpt)
        out["max_audio_frames"] = WHALE_MAX_FRAMES  # longer audio is encoded in windows
        out["speech"] = {
            "kind": "vita_codec", "codebook_size": t.codebook_size, "pad": t.pad, "bos": t.bos, "sos": t.sos, "eos": t.eos,
            "frames_per_token": t.frames_per_token(ckpt.config.llm.hidden_size),
            "top_k": t.top_k, "penalty_window": t.penalty_window, "penalty": t.penalty, "max_codec_per_text": t.max_codec_per_text, "codec_rate_hz": c.sample_rate // c.hop,
            "codec_hop": c.hop, "n_global": c.n_global, "max_segment_text": Limits.max_text_chunk,
        }  # fmt: skip
        return out

    def assets(self, ckpt) -> dict[str, np.ndarray]:
        return {"default_global_codes": ckpt.components["codec_decoder"].default_global_codes.numpy()}


register(Vita15())
