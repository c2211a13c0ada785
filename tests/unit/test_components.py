"""Every registered component has a tiny fixture; each runs, has the right output contract, and
traces with torch.export (dynamic shapes, no graph breaks) to a program that matches eager."""

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.export import Dim, export

from omni_export.export.components.internvit import (
    InternViTConfig,
    VisionEncoder,
    mlp1_projector,
)
from omni_export.export.families import FAMILIES
from omni_export.runtime_py.audio import KaldiFbank, WhisperLogMel
from omni_export.runtime_py.prompt import merge_placeholders

g = torch.Generator().manual_seed(0)


class Method(nn.Module):
    """Exposes one method of a component as forward, the way tracing sees it."""

    def __init__(self, module: nn.Module, name: str) -> None:
        super().__init__()
        self.module, self.name = module, name

    def forward(self, *args):
        return getattr(self.module, self.name)(*args)


def _cached(m: nn.Module, stack: str, n: int = 64) -> nn.Module:
    getattr(m, stack).setup_cache(n) if stack else m.model.setup_cache(n)
    return m


T = Dim("T", min=2, max=48)
M = Dim("M", min=2, max=400)
# (family, component) -> (module -> traced module, example inputs, dynamic shapes, second-length inputs)
FIXTURES: dict[tuple[str, str], Callable] = {
    ("*", "audio_frontend"): lambda m, h: (m, (torch.randn(16000, generator=g),), ({0: Dim("N", min=1600, max=480000)},),
                                           (torch.randn(12345, generator=g),)),
    ("*", "vision_encoder"): lambda m, h: (m, (torch.randn(2, 3, 112, 112, generator=g),), ({0: Dim("tiles", min=1, max=13)},),
                                           (torch.randn(3, 3, 112, 112, generator=g),)),
    ("interactiveomni", "audio_encoder"): lambda m, h: (m, (torch.randn(1, 128, 200, generator=g),), ({2: 4 * Dim("F4", min=2, max=750)},),
                                                        (torch.randn(1, 128, 76, generator=g),)),
    ("vita15", "audio_encoder"): lambda m, h: (m, (torch.randn(1, 200, 80, generator=g),), ({1: Dim("F", min=16, max=3000)},),
                                               (torch.randn(1, 123, 80, generator=g),)),
    ("*", "llm"): lambda m, h: (_cached(m, ""), (torch.randn(1, 8, h, generator=g), torch.arange(8)), ({1: T}, {0: T}),
                                (torch.randn(1, 3, h, generator=g), torch.arange(8, 11))),
    ("interactiveomni", "speech_lm"): lambda m, h: (_cached(m, "llm"), (torch.randn(1, 8, 32, generator=g), torch.arange(8)), ({1: T}, {0: T}),
                                                    (torch.randn(1, 1, 32, generator=g), torch.tensor([8]))),
    ("interactiveomni", "flow"): lambda m, h: (
        Method(m, "step"),
        (torch.randn(1, 80, 50), torch.randn(1, 80, 50), torch.rand(1), torch.tensor(0.1), torch.randn(1, 80), torch.randn(1, 80, 50)),
        ({2: M}, {2: M}, None, None, None, {2: M}),
        (torch.randn(1, 80, 30), torch.randn(1, 80, 30), torch.rand(1), torch.tensor(0.2), torch.randn(1, 80), torch.zeros(1, 80, 30)),
    ),
    ("interactiveomni", "vocoder"): lambda m, h: (m, (torch.randn(1, 80, 50, generator=g), torch.randn(1, 9, 50, 480, generator=g)), ({2: M}, {2: M}),
                                                  (torch.randn(1, 80, 17, generator=g), torch.randn(1, 9, 17, 480, generator=g))),
    ("vita15", "tts_nar"): lambda m, h: (m, (torch.randn(1, 8, 32, generator=g),), ({1: T},), (torch.randn(1, 5, 32, generator=g),)),
    ("vita15", "tts_ar"): lambda m, h: (_cached(m, "ar"), (torch.randn(1, 8, 32, generator=g), torch.arange(8)), ({1: T}, {0: T}),
                                        (torch.randn(1, 1, 32, generator=g), torch.tensor([8]))),
    ("vita15", "codec_decoder"): lambda m, h: (m, (torch.randint(0, 1024, (1, 40)), torch.randint(0, 64, (1, 8))), ({1: M}, None),
                                               (torch.randint(0, 1024, (1, 13)), torch.randint(0, 64, (1, 8)))),
}


def fixture_for(family: str, component: str):
    return FIXTURES.get((family, component)) or FIXTURES.get(("*", component))


ALL = [(f, s.name) for f in FAMILIES for s in FAMILIES.get(f).specs(FAMILIES.get(f).preset("tiny"))]


def test_every_registered_component_has_a_tiny_fixture():
    missing = [c for c in ALL if fixture_for(*c) is None]
    assert not missing, f"components without a tiny fixture: {missing}"


@pytest.mark.parametrize("family,component", ALL)
def test_component_exports_and_matches_eager(tiny, family, component):
    ckpt = tiny[family]
    module = ckpt.components[component]
    traced, args, dyn, other = fixture_for(family, component)(module, ckpt.config.llm.hidden_size)
    with torch.no_grad():
        # A *args forward takes its dynamic shapes as one nested tuple.
        program = export(traced, args, dynamic_shapes=(dyn,) if isinstance(traced, Method) else dyn, strict=False)
        # A fresh cache for both runs so the KV buffers start equal.
        for buf_owner in (traced,):
            for name, buf in buf_owner.named_buffers():
                if "_cache_" in name:
                    buf.zero_()
        eager = traced(*other)
        for name, buf in program.module().named_buffers():
            if "_cache_" in name:
                buf.zero_()
        got = program.module()(*other)
    assert got.shape == eager.shape
    assert torch.allclose(got, eager, atol=1e-5, rtol=1e-4)


def test_vision_encoder_gives_256_tokens_per_448px_tile():
    cfg = InternViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=448)
    enc = VisionEncoder(cfg, mlp1_projector(16, 24)).eval()
    with torch.no_grad():
        out = enc(torch.randn(3, 3, 448, 448))
    assert enc.tokens_per_tile() == 256 and out.shape == (3 * 256, 24)


def test_speech_output_rates(tiny):
    io, vita = tiny["interactiveomni"], tiny["vita15"]
    with torch.no_grad():
        mel = io.components["flow"].encode(torch.randint(0, 6561, (1, 25)))
        wav = io.components["vocoder"](torch.randn(1, 80, 50), torch.randn(1, 9, 50, 480))
        codec = vita.components["codec_decoder"](torch.randint(0, 1024, (1, 40)), torch.zeros(1, 8, dtype=torch.long))
    assert mel.shape == (1, 80, 50)  # 25 Hz tokens -> 50 Hz mel
    assert wav.shape == (1, 50 * 480)  # 50 Hz mel -> 24 kHz
    assert codec.shape == (1, 24000)  # 40 codes = 1 s at 24 kHz


@pytest.mark.parametrize("changed_from", [0, 3])
def test_flow_is_chunk_causal(tiny, changed_from):
    """Changing tokens past a chunk's three look-ahead tokens must not change that chunk's mel
    (the flow streams); changing its look-ahead changes it all (the chunk attends within itself)."""
    flow = tiny["interactiveomni"].components["flow"]
    chunk, ahead = flow.cfg.token_chunk, flow.cfg.pre_lookahead
    a = torch.randint(0, 6561, (1, 2 * chunk), generator=g)
    b = a.clone()
    b[0, chunk + changed_from :] = torch.randint(0, 6561, (chunk - changed_from,), generator=g)
    with torch.no_grad():
        ma, mb = flow.encode(a), flow.encode(b)
        frames = chunk * flow.cfg.token_mel_ratio
        noise = torch.randn(ma.shape, generator=g)
        spk = flow.speaker(torch.randn(1, flow.cfg.spk_dim, generator=g))
        xa, xb = flow.solve(ma, spk, noise), flow.solve(mb, spk, noise)
    assert not torch.allclose(ma[..., frames:], mb[..., frames:])
    if changed_from < ahead:
        assert (ma[..., :frames] - mb[..., :frames]).abs().amax(dim=1).min() > 1e-6  # every frame of the chunk (fp32 noise: ~1e-8)
    else:
        assert torch.allclose(ma[..., :frames], mb[..., :frames], atol=1e-6)
        assert torch.allclose(xa[..., :frames], xb[..., :frames], atol=1e-5)


@pytest.mark.parametrize("front_end,n", [(WhisperLogMel(128), 16000), (KaldiFbank(80), 16000)])
def test_front_ends_export(front_end, n):
    program = export(front_end, (torch.randn(n),), dynamic_shapes=({0: Dim("N", min=1600, max=480000)},), strict=False)
    x = torch.randn(12345, generator=g)
    assert torch.allclose(program.module()(x), front_end(x), atol=1e-4)


def test_kaldi_fbank_frames_and_tone():
    fb = KaldiFbank(80)
    sr, f0 = 16000, 1000.0
    t = torch.arange(sr) / sr
    out = fb(0.5 * torch.sin(2 * torch.pi * f0 * t))[0]
    assert out.shape == (1 + (sr - 400) // 160, 80)
    # The loudest bin sits where a 1 kHz tone falls on Kaldi's mel scale (bins 20 Hz..8 kHz).
    mel = lambda f: 1127 * torch.log1p(torch.tensor(f) / 700)  # noqa: E731
    expected = int((mel(f0) - mel(20.0)) / ((mel(8000.0) - mel(20.0)) / 81)) - 1
    assert abs(int(out.mean(0).argmax()) - expected) <= 1


def test_merge_placeholders_places_features_in_order():
    embeds = torch.zeros(1, 6, 4)
    ids = torch.tensor([[1, 9, 9, 2, 9, 3]])
    feats = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    out = merge_placeholders(embeds, ids, feats, 9)
    assert torch.equal(out[0, [1, 2, 4]], feats)
    assert torch.equal(out[0, [0, 3, 5]], torch.zeros(3, 4))
