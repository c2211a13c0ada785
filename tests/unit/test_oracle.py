"""Our Qwen and Whisper implementations against transformers' own, on the same weights, on
deliberately odd sizes (3 layers, hidden 96, 6 heads, 2 KV heads, vocabulary 517)."""

import numpy as np
import pytest
import torch
from transformers import (
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    WhisperConfig,
    WhisperFeatureExtractor,
)
from transformers.models.whisper.modeling_whisper import (
    WhisperEncoder as HFWhisperEncoder,
)

from omni_export.export.components.qwen import QwenConfig, QwenForCausalLM
from omni_export.export.components.whisper import WhisperEncoder, WhisperEncoderConfig
from omni_export.runtime_py.audio import WhisperLogMel

TOL = 1e-4
ODD = dict(vocab_size=517, hidden_size=96, intermediate_size=200, num_hidden_layers=3,
           num_attention_heads=6, num_key_value_heads=2, head_dim=16, rope_theta=1e6)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("arch,tied", [("qwen3", True), ("qwen3", False), ("qwen2", False)])
def test_qwen_logits_match_transformers(arch, tied):
    hf_cfg = (Qwen3Config if arch == "qwen3" else Qwen2Config)(**ODD, tie_word_embeddings=tied)
    hf = (Qwen3ForCausalLM if arch == "qwen3" else Qwen2ForCausalLM)(hf_cfg).eval()
    _randomize(hf, 1)
    cfg = QwenConfig.from_hf(hf_cfg.to_dict())
    assert cfg.qk_norm == (arch == "qwen3") and cfg.attention_bias == (arch == "qwen2")
    ours = QwenForCausalLM(cfg).eval()
    state = {k: v for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
    ours.load_state_dict(state, strict=True)
    ids = torch.randint(0, 517, (1, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids).logits
        full = ours(ours.embed(ids), torch.arange(19))
        # Through the static cache: prefill 11 tokens, then decode the rest one at a time.
        ours.model.setup_cache(32)
        pre = ours(ours.embed(ids[:, :11]), torch.arange(11))
        steps = [ours(ours.embed(ids[:, i : i + 1]), torch.tensor([i])) for i in range(11, 19)]
    assert (ref - full).abs().max() < TOL
    assert (ref - torch.cat([pre, *steps], 1)).abs().max() < TOL


def test_whisper_encoder_matches_transformers():
    hf_cfg = WhisperConfig(d_model=96, encoder_layers=3, encoder_attention_heads=6, encoder_ffn_dim=200,
                           num_mel_bins=128, max_source_positions=50)
    hf = HFWhisperEncoder(hf_cfg).eval()
    _randomize(hf, 3)
    ours = WhisperEncoder(WhisperEncoderConfig.from_hf(hf_cfg.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(1, 128, 100, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (hf(x).last_hidden_state - ours(x)).abs().max() < TOL


@pytest.mark.parametrize("n", [16000, 16123, 4000])
def test_log_mel_matches_whisper_feature_extractor(n):
    wav = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1
    ref = WhisperFeatureExtractor(feature_size=128)(wav, sampling_rate=16000, return_tensors="np", padding=False).input_features
    ours = WhisperLogMel(128)(torch.from_numpy(wav)).numpy()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < TOL
