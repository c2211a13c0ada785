"""InteractiveOmni-4B/8B: InternViT + mlp1, Whisper-large-v3 + pooling adapter, Qwen3 LLM, and a
CosyVoice2-style speech decoder (speech-token LM -> flow matching -> HiFT vocoder).

Checkpoint layout (InternVL conventions), all in the root safetensors set:

| checkpoint prefix    | component        | module prefix |
| -------------------- | ---------------- | ------------- |
| vision_model.        | vision_encoder   | encoder.      |
| mlp1.                | vision_encoder   | projector.    |
| audio_model.         | audio_encoder    | encoder.      |
| audio_projector.     | audio_encoder    | adapter.      |
| language_model.      | llm              | (Qwen3ForCausalLM names) |
| voicelm.llm.         | speech_lm        | (llm.model.model. -> llm.) |
| voicelm.flow.        | flow             |               |
| voicelm.hift.        | vocoder          |               |

Beside the weights, ``campplus.onnx`` (optional): CosyVoice2's CAM++ speaker encoder, run as it
is for voice cloning (runtime_py/voice.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omni_export.configs import from_dict, to_dict
from omni_export.errors import CheckpointError, ConfigError
from omni_export.export.components.flow import FlowConfig, FlowDecoder
from omni_export.export.components.frontends import WhisperFrontend
from omni_export.export.components.hift import F0PredictorConfig, HiFT, HiFTConfig
from omni_export.export.components.internvit import (
    InternViTConfig,
    VisionEncoder,
    mlp1_projector,
)
from omni_export.export.components.qwen import QwenConfig, QwenForCausalLM
from omni_export.export.components.speech_lm import SOS, TASK, SpeechLM, SpeechLMConfig
from omni_export.export.components.whisper import (
    WhisperAudioEncoder,
    WhisperEncoderConfig,
)
from omni_export.export.families.base import MAIN_WEIGHTS, ComponentSpec, Family, register
from omni_export.export.families.common import check_keys, require
from omni_export.export.speaker_encoder import FILE as SPEAKER_ENCODER
from omni_export.export.trace_specs import Limits
from omni_export.export.speaker_encoder import TOKENIZER_FILE as SPEECH_TOKENIZER
from omni_export.export.speaker_encoder import write_speaker_encoder, write_speech_tokenizer

TOP_KEYS = {
    "architectures", "model_type", "llm_config", "vision_config", "audio_config", "voicelm_config",
    "downsample_ratio", "force_image_size", "max_dynamic_patch", "min_dynamic_patch", "use_thumbnail",
    "ps_version", "select_layer", "template", "dynamic_image_size", "torch_dtype", "transformers_version",
    "use_flash_attn", "auto_map",
}  # fmt: skip


SPK2INFO = "spk2info.pt"  # CosyVoice's saved voices: {speaker id: {"embedding": [1, 192], ...}}
DEFAULT_SPEAKER = "default"
DEFAULT_SPEAKER_TENSOR = "default_speaker_embedding"


def default_voice(path: Path, dim: int) -> np.ndarray:
    """The voice a reply takes without ``--voice`` (the model card's ``model.default_speaker_embedding``;
    where the release keeps it is not public): a top-level ``default_speaker_embedding`` tensor in
    the weights, else the checkpoint's ``spk2info.pt`` (CosyVoice's saved voices) entry named
    ``default``, else its first; with neither, the zero embedding (the flow's speaker projection
    then adds only its bias: no speaker)."""
    from omni_export.export.checkpoint import TensorSource  # it imports the families

    weights = TensorSource(path.parent, MAIN_WEIGHTS)
    if DEFAULT_SPEAKER_TENSOR in weights.locations:
        emb = weights.get(DEFAULT_SPEAKER_TENSOR)
        if emb.numel() != dim:
            raise CheckpointError(f"{path.parent}: {DEFAULT_SPEAKER_TENSOR} holds {emb.numel()} values, not the flow's {dim}")
        return emb.detach().float().reshape(dim).numpy()
    if not path.is_file():
        return np.zeros(dim, dtype=np.float32)
    try:
        info = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for non-tensor payloads, RuntimeError for truncation
        raise CheckpointError(f"cannot load {path} with torch.load(weights_only=True): {exc}; "
                              "it must hold {speaker id: {'embedding': tensor}} as CosyVoice saves voices") from None  # fmt: skip
    entry = info.get(DEFAULT_SPEAKER, next(iter(info.values()), None)) if isinstance(info, dict) else None
    emb = next((entry[k] for k in ("embedding", "flow_embedding") if k in entry), None) if isinstance(entry, dict) else None
    if not isinstance(emb, torch.Tensor) or emb.numel() != dim:
        raise CheckpointError(f"{path}: no speaker entry with an 'embedding' of {dim} values; it must hold "
                              f"{{speaker id: {{'embedding': tensor [1, {dim}]}}}} as CosyVoice saves voices, "
                              "or be removed to speak without a default voice")  # fmt: skip
    return emb.detach().float().reshape(dim).numpy()


@dataclass(frozen=True)
class VoiceLMConfig:
    speech_lm: SpeechLMConfig
    flow: FlowConfig
    hift: HiFTConfig


@dataclass(frozen=True)
class InteractiveOmniConfig:
    llm: QwenConfig
    vision: InternViTConfig
    audio: WhisperEncoderConfig
    voicelm: VoiceLMConfig
    downsample_ratio: float = 0.5
    max_dynamic_patch: int = 12


def _qwen2(hidden: int, layers: int, heads: int, kv: int, inter: int) -> QwenConfig:
    return QwenConfig(vocab_size=0, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
                      rope_theta=1e6, attention_bias=True)


def _qwen3(vocab: int, hidden: int, layers: int, heads: int, kv: int, inter: int, head_dim: int) -> QwenConfig:
    return QwenConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, rope_theta=1e6,
                      tie_word_embeddings=True, qk_norm=True, max_position_embeddings=40960)


def _preset(size: str) -> InteractiveOmniConfig:
    if size == "tiny":
        llm = _qwen3(640, 64, 2, 4, 2, 128, 16)
        vision = InternViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=112)
        audio = WhisperEncoderConfig(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64)
        slm = _qwen2(32, 2, 2, 1, 64)
        # No mid blocks (the full flow has 12): every other kind of block is there, at fewer
        # operators to lower in each test build; the unit tests stream a flow with mid blocks.
        flow = FlowConfig(dim=32, encoder_layers=1, up_layers=1, heads=2, ffn=64, estimator_dim=32, estimator_heads=2,
                          estimator_head_dim=16, estimator_blocks=1, estimator_mid_blocks=0, n_timesteps=4,
                          estimator_left_chunks=8)
        # Two up-sampling stages (x8, x15) instead of three: the same x480 hop and every kind of
        # block, at about half the operators to lower in each test build.
        hift = HiFTConfig(base_channels=32, upsample_rates=(8, 15), upsample_kernel_sizes=(16, 31), resblock_kernel_sizes=(3,),
                          resblock_dilation_sizes=((1,),), source_resblock_kernel_sizes=(3, 3), source_resblock_dilation_sizes=((1,), (1,)),
                          f0_predictor=F0PredictorConfig(cond_channels=32))
        spk_limit = 8
    elif size == "small":
        llm = _qwen3(16384, 768, 12, 12, 4, 2048, 64)
        vision = InternViTConfig(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=1024)
        audio = WhisperEncoderConfig(d_model=256, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=1024)
        slm = _qwen2(256, 4, 4, 2, 704)
        flow = FlowConfig(dim=192, encoder_layers=2, up_layers=2, heads=4, ffn=768, estimator_dim=128, estimator_heads=4,
                          estimator_head_dim=32, estimator_blocks=1, estimator_mid_blocks=2)
        hift = HiFTConfig(base_channels=128, f0_predictor=F0PredictorConfig(cond_channels=128))
        spk_limit = 12
    elif size in ("full", "full-8b"):
        llm = (_qwen3(151936, 2560, 36, 32, 8, 9728, 128) if size == "full"
               else replace(_qwen3(151936, 4096, 36, 32, 8, 12288, 128), tie_word_embeddings=False))
        vision = InternViTConfig()  # InternViT-300M-448px
        audio = WhisperEncoderConfig(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120)
        slm = _qwen2(896, 24, 14, 2, 4864)  # Qwen2.5-0.5B, as CosyVoice2's LM
        flow, hift, spk_limit = FlowConfig(), HiFTConfig(), 20  # HiFT as in CosyVoice2-0.5B
    else:
        raise ConfigError(f"unknown size {size!r} for interactiveomni; choose tiny, small, full or full-8b")
    return InteractiveOmniConfig(
        llm=llm, vision=vision, audio=audio,
        voicelm=VoiceLMConfig(SpeechLMConfig(llm=slm, text_dim=llm.hidden_size, max_speech_per_text=spk_limit), flow, hift),
    )  # fmt: skip


class InteractiveOmni(Family):
    name = "interactiveomni"
    model_types = ("interactiveomni",)
    description = "InteractiveOmni-4B/8B (SenseTime): InternViT + Whisper-large-v3 + Qwen3 + CosyVoice2-style speech"
    sizes = ("tiny", "small", "full", "full-8b")
    image_token = "<IMG_CONTEXT>"
    audio_token = "<AUDIO_CONTEXT>"
    image_wrap = ("<img>", "</img>\n")
    # The README's default of 8 frames; its chat code is not public: frames, one tile each and the
    # "Frame{i}: " prompt follow InternVL's load_video and video chat example, which it builds on.
    video = {"sampling": "segments", "frames": 8, "fit": "resize", "frame_label": "Frame{i}: ", "joined": False}
    audio_wrap = ("<audio>", "</audio>\n")
    special_tokens = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
                      "<audio>", "</audio>", "<AUDIO_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")

    def preset(self, size: str) -> InteractiveOmniConfig:
        return _preset(size)

    def read_config(self, root: Path, d: dict[str, Any]) -> InteractiveOmniConfig:
        where = str(root / "config.json")
        check_keys(d, TOP_KEYS, where)
        llm = QwenConfig.from_hf(require(d, "llm_config", where), f"{where}: llm_config")
        voicelm = from_dict(VoiceLMConfig, require(d, "voicelm_config", where), where=f"{where}: voicelm_config")
        if voicelm.speech_lm.text_dim != llm.hidden_size:
            raise ConfigError(f"{where}: voicelm_config.speech_lm.text_dim {voicelm.speech_lm.text_dim} "
                              f"must equal the LLM hidden size {llm.hidden_size}")
        return InteractiveOmniConfig(
            llm=llm,
            vision=InternViTConfig.from_hf(require(d, "vision_config", where), f"{where}: vision_config"),
            audio=WhisperEncoderConfig.from_hf(require(d, "audio_config", where), f"{where}: audio_config"),
            voicelm=voicelm,
            downsample_ratio=float(d.get("downsample_ratio", 0.5)),
            max_dynamic_patch=int(d.get("max_dynamic_patch", 12)),
        )

    def config_files(self, cfg: InteractiveOmniConfig) -> dict[str, dict[str, Any]]:
        config = {
            "architectures": ["InteractiveOmniModel"],
            "model_type": "interactiveomni",
            "llm_config": cfg.llm.to_hf(),
            "vision_config": cfg.vision.to_hf(),
            "audio_config": cfg.audio.to_hf(),
            "voicelm_config": to_dict(cfg.voicelm),
            "downsample_ratio": cfg.downsample_ratio,
            "force_image_size": cfg.vision.image_size,
            "max_dynamic_patch": cfg.max_dynamic_patch,
            "min_dynamic_patch": 1,
            "use_thumbnail": True,
            "ps_version": "v2",
            "select_layer": -1,
            "template": "interactiveomni_chat",
            "torch_dtype": "bfloat16",
            "transformers_version": "4.51.3",
            "use_flash_attn": False,
        }
        gen = {"bos_token_id": None, "eos_token_id": None, "do_sample": False, "max_new_tokens": 512}
        return {"config.json": config, "generation_config.json": gen}

    def specs(self, cfg: InteractiveOmniConfig) -> list[ComponentSpec]:
        d_llm = cfg.llm.hidden_size
        v = cfg.voicelm
        return [
            ComponentSpec("audio_frontend", lambda: WhisperFrontend(cfg.audio.num_mel_bins), (),
                          description="Whisper log-mel: 16 kHz samples -> 128-bin features (100 Hz)"),
            ComponentSpec("vision_encoder", lambda: VisionEncoder(cfg.vision, mlp1_projector(cfg.vision.hidden_size, d_llm, cfg.downsample_ratio), cfg.downsample_ratio),
                          (("vision_model.", "encoder."), ("mlp1.", "projector.")), description="InternViT + pixel shuffle + mlp1: tiles -> LLM tokens"),
            ComponentSpec("audio_encoder", lambda: WhisperAudioEncoder(cfg.audio, d_llm),
                          (("audio_model.", "encoder."), ("audio_projector.", "adapter.")), description="Whisper encoder + pooling adapter: log-mel -> LLM tokens (25 Hz)"),
            ComponentSpec("llm", lambda: QwenForCausalLM(cfg.llm), (("language_model.", ""),),
                          description="Qwen3 decoder with static KV cache"),
            # CosyVoice2's Qwen2LM wraps a Qwen2ForCausalLM as llm.model: its layers under
            # llm.model.model., its text embedding and head unused here (text arrives as states).
            ComponentSpec("speech_lm", lambda: SpeechLM(v.speech_lm), (("voicelm.llm.llm.model.model.", "llm."), ("voicelm.llm.", "")),
                          ignored=("voicelm.llm.llm.model.model.embed_tokens.", "voicelm.llm.llm.model.lm_head."),
                          description="speech-token LM over text-side states"),
            ComponentSpec("flow", lambda: FlowDecoder(v.flow), (("voicelm.flow.", ""),), ignored=(DEFAULT_SPEAKER_TENSOR,),
                          description="CosyVoice2's causal flow matching: speech tokens -> mel, a chunk at a time"),
            ComponentSpec("vocoder", lambda: HiFT(v.hift), (("voicelm.hift.", ""),),
                          description="HiFT (neural source filter + iSTFT): mel -> 24 kHz"),
        ]  # fmt: skip

    def runtime_config(self, ckpt) -> dict[str, Any]:
        v = ckpt.config.voicelm
        out = super().runtime_config(ckpt)
        out["audio_frames_multiple"] = WhisperAudioEncoder.FRAME_MULTIPLE
        out["max_audio_frames"] = 2 * ckpt.config.audio.max_source_positions
        # transformers' WhisperEncoder, which the release runs (its requirements: transformers, no
        # openai-whisper), takes only full 30 s windows (3000 frames): every clip is padded to one.
        out["audio_pad_samples"] = out["max_audio_frames"] * self.audio_sample_rate // 100
        out["speech"] = {
            "kind": "cosyvoice2", "speech_vocab": v.speech_lm.speech_vocab, "eos": v.speech_lm.eos, "fill": v.speech_lm.fill,
            "sos_row": SOS, "task_row": TASK, "text_chunk": v.speech_lm.text_chunk, "speech_chunk": v.speech_lm.speech_chunk,
            "max_speech_per_text": v.speech_lm.max_speech_per_text, "token_rate_hz": 25, "token_mel_ratio": v.flow.token_mel_ratio,
            "flow_chunk_tokens": v.flow.token_chunk, "flow_lookahead": v.flow.pre_lookahead, "n_timesteps": v.flow.n_timesteps, "cfg_rate": v.flow.cfg_rate,
            "mel_bins": v.flow.mel_bins, "vocoder_hop": v.hift.hop, "vocoder_harmonics": v.hift.harmonics,
            "vocoder_window": Limits.vocoder_window, "speaker_dim": v.flow.spk_dim,
            "flow_caches": {group: {name: list(shape) for name, shape in caches.items()}
                            for group, caches in v.flow.cache_shapes().items()},
        }  # fmt: skip
        return out

    def assets(self, ckpt) -> dict[str, np.ndarray]:
        return {"default_speaker_embedding": default_voice(ckpt.root / SPK2INFO, ckpt.config.voicelm.flow.spk_dim)}

    def asset_files(self, ckpt) -> dict[str, Path]:
        from omni_export.runtime_py.voice import SpeakerEncoder

        from omni_export.runtime_py.voice import SpeechTokenizer

        files = {}
        # each refuses a file of another contract, naming it
        if (path := ckpt.root / SPEAKER_ENCODER).is_file():
            SpeakerEncoder(path, ckpt.config.voicelm.flow.spk_dim)
            files["speaker_encoder"] = path
        if (path := ckpt.root / SPEECH_TOKENIZER).is_file():
            SpeechTokenizer(path, ckpt.config.voicelm.flow.vocab)
            files["speech_tokenizer"] = path
        return files

    def write_side_files(self, cfg: InteractiveOmniConfig, out: Path, gen) -> None:  # type: ignore[no-untyped-def]
        dim = cfg.voicelm.flow.spk_dim
        write_speaker_encoder(out / SPEAKER_ENCODER, gen, dim=dim)
        write_speech_tokenizer(out / SPEECH_TOKENIZER, gen, codes=cfg.voicelm.flow.vocab)
        torch.save({DEFAULT_SPEAKER: {"embedding": torch.randn(1, dim, generator=gen)}}, str(out / SPK2INFO))


register(InteractiveOmni())
