"""CosyVoice2's HiFT vocoder: the iSTFT/STFT as convolutions against torch's, the harmonic source
against the release's per-sample algorithm, weight norm folded at load, and the released tensor
names and shapes."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from omni_export.errors import CheckpointError
from omni_export.export.checkpoint import load_checkpoint
from omni_export.export.components.hift import HiFT, HiFTConfig, istft, stft
from omni_export.export.synthetic import written_layout
from omni_export.export.weight_norm import fold
from omni_export.runtime_py.sampler import frame_noise


def _released_hift_names() -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of CosyVoice2-0.5B's hift.pt (cosyvoice2.yaml's hift block through
    generator.py's constructor, torch's parametrised weight norm), written out from the release,
    not from our module."""
    t: dict[str, tuple[int, ...]] = {}

    def wn(name, shape, bias):
        t[f"{name}.parametrizations.weight.original0"] = (shape[0],) + (1,) * (len(shape) - 1)
        t[f"{name}.parametrizations.weight.original1"] = shape
        t[f"{name}.bias"] = (bias,)

    def resblock(prefix, ch, k, n):
        for j in range(n):
            wn(f"{prefix}.convs1.{j}", (ch, ch, k), ch)
            wn(f"{prefix}.convs2.{j}", (ch, ch, k), ch)
            t[f"{prefix}.activations1.{j}.alpha"] = (ch,)
            t[f"{prefix}.activations2.{j}.alpha"] = (ch,)

    t["m_source.l_linear.weight"], t["m_source.l_linear.bias"] = (1, 9), (1,)
    wn("conv_pre", (512, 80, 7), 512)
    for i, (cin, cout, k) in enumerate([(512, 256, 16), (256, 128, 11), (128, 64, 7)]):
        wn(f"ups.{i}", (cin, cout, k), cout)  # ConvTranspose1d: [in, out, k], normed over dim 0
    for i, (cout, k) in enumerate([(256, 30), (128, 6), (64, 1)]):
        t[f"source_downs.{i}.weight"], t[f"source_downs.{i}.bias"] = (cout, 18, k), (cout,)
    for i, (ch, k) in enumerate([(256, 7), (128, 7), (64, 11)]):
        resblock(f"source_resblocks.{i}", ch, k, 3)
    for i, ch in enumerate([256, 128, 64]):
        for j, k in enumerate([3, 7, 11]):
            resblock(f"resblocks.{3 * i + j}", ch, k, 3)
    wn("conv_post", (18, 64, 7), 18)
    for i in range(5):
        wn(f"f0_predictor.condnet.{2 * i}", (512, 80 if i == 0 else 512, 3), 512)
    t["f0_predictor.classifier.weight"], t["f0_predictor.classifier.bias"] = (1, 512), (1,)
    return t


def test_synthetic_writer_and_loader_use_the_released_hift_names():
    written = written_layout("interactiveomni", "vocoder", strip="voicelm.hift.")
    released = _released_hift_names()
    assert sorted(set(written) ^ set(released)) == []
    assert written == released
    assert sum(math.prod(s) for s in released.values()) == pytest.approx(20.8e6, rel=0.01)  # CosyVoice2's hift: 20.8 M


@pytest.mark.parametrize("n", [480, 4800, 481 * 4])
def test_stft_and_istft_as_convolutions_equal_torch(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(1, n, generator=g)
    ref = torch.stft(x, 16, 4, 16, window=torch.hann_window(16), return_complex=True)
    assert torch.allclose(stft(x, 16, 4), torch.cat([ref.real, ref.imag], 1), atol=1e-5)
    spec = torch.randn(1, 18, n // 4 + 1, generator=g)
    want = torch.istft(torch.complex(spec[:, :9], spec[:, 9:]), 16, 4, 16, window=torch.hann_window(16))
    got = istft(spec, 16, 4)
    assert got.shape == want.shape == (1, n)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(istft(stft(x, 16, 4), 16, 4), x, atol=1e-5)  # a round trip gives the signal back


def _release_source(m, f0, noise):
    """CosyVoice2's SineGen2 + SourceModuleHnNSF (24 kHz, non-causal), per sample as released:
    nearest-upsampled F0, per-sample phase steps, linear down/up-sampling of the phase."""
    c, up = m.cfg, m.cfg.hop
    f0_up = F.interpolate(f0[:, None], scale_factor=up, mode="nearest").transpose(1, 2)  # [1, N, 1]
    fn = f0_up * torch.arange(1, c.harmonics + 1, dtype=torch.float64)
    rad = (fn / c.sampling_rate) % 1
    rad = F.interpolate(rad.transpose(1, 2), scale_factor=1 / up, mode="linear").transpose(1, 2)
    phase = torch.cumsum(rad, dim=1) * 2 * math.pi
    phase = F.interpolate(phase.transpose(1, 2) * up, scale_factor=up, mode="linear").transpose(1, 2)
    sines = torch.sin(phase) * c.nsf_alpha
    uv = (f0_up > c.nsf_voiced_threshold).double()
    amp = uv * c.nsf_sigma + (1 - uv) * c.nsf_alpha / 3
    waves = sines * uv + amp * noise  # [1, N, H]
    return torch.tanh(waves @ m.m_source.l_linear.weight.double().T + m.m_source.l_linear.bias.double())[..., 0]


def test_harmonic_source_is_the_releases_sine_generator():
    cfg = HiFTConfig(base_channels=32)
    m = HiFT(cfg).eval()
    g = torch.Generator().manual_seed(0)
    frames = 40
    f0 = torch.rand(1, frames, generator=g) * 300 + 50
    f0[:, 10:14] = 0  # an unvoiced stretch
    noise = frame_noise(g, cfg.harmonics, cfg.hop, frames)
    per_sample = noise[0].permute(1, 2, 0).reshape(1, frames * cfg.hop, cfg.harmonics).double()
    want = _release_source(m, f0.double(), per_sample)
    # The release's phase starts at frame 0's step; ours at 0: hand it that constant offset.
    step = f0[:, :1] * torch.arange(1, cfg.harmonics + 1) / cfg.sampling_rate * cfg.hop
    with torch.no_grad():
        got, phase = m.m_source(f0, step - torch.floor(step), torch.tensor([0]), noise)
    assert got.shape == (1, frames, cfg.hop) and phase.shape == (1, cfg.harmonics, frames)
    assert torch.allclose(got.reshape(1, -1).double(), want, atol=2e-4)
    assert 0 <= phase.min() and phase.max() < 1


def test_a_window_that_carries_the_phase_continues_the_one_before():
    cfg = HiFTConfig(base_channels=32)
    m = HiFT(cfg).eval()
    g = torch.Generator().manual_seed(1)
    f0 = torch.rand(1, 60, generator=g) * 200 + 80
    noise = frame_noise(g, cfg.harmonics, cfg.hop, 60)
    zero = torch.zeros(1, cfg.harmonics)
    with torch.no_grad():
        whole, phase = m.m_source(f0, zero, torch.tensor([0]), noise)
        part, _ = m.m_source(f0[:, 25:], phase[..., 30], torch.tensor([5]), noise[:, :, 25:])
    # from the anchor on, the later window's source is the whole one's (frames 30..59)
    assert torch.allclose(part[:, 5:], whole[:, 30:], atol=1e-4)


def test_weight_norm_folds_both_stored_forms():
    from torch.nn.utils import parametrizations

    conv = parametrizations.weight_norm(torch.nn.ConvTranspose1d(6, 4, 5, 2))
    sd = conv.state_dict()
    g, v = sd["parametrizations.weight.original0"], sd["parametrizations.weight.original1"]
    assert g.shape == (6, 1, 1)
    with torch.no_grad():
        g.mul_(1.7)
        assert torch.allclose(fold(g, v), conv.weight, atol=1e-6)


def _rewrite_hift(root, rename):
    """Apply ``rename`` (name, tensor) -> [(name, tensor)] to every voicelm.hift tensor of a checkpoint."""
    index_path = root / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(root / shard)
        if not any(k.startswith("voicelm.hift.") for k in tensors):
            continue
        out = {}
        for k, t in tensors.items():
            out.update(rename(k, t) if k.startswith("voicelm.hift.") else {k: t})
        save_file(out, root / shard)
        for k in tensors:
            index["weight_map"].pop(k, None)
        index["weight_map"].update({k: shard for k in out})
    index_path.write_text(json.dumps(index))


def test_loader_takes_the_older_weight_g_weight_v_names(copy, tiny):
    root = copy("interactiveomni")
    old = {".parametrizations.weight.original0": ".weight_g", ".parametrizations.weight.original1": ".weight_v"}

    def rename(k, t):
        for a, b in old.items():
            if k.endswith(a):
                return {k.removesuffix(a) + b: t}
        return {k: t}

    _rewrite_hift(root, rename)
    loaded = load_checkpoint(root, dtype=torch.float32, components=["vocoder"]).components["vocoder"]
    want = tiny["interactiveomni"].components["vocoder"].state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_magnitude_of_the_wrong_shape_is_named(copy):
    root = copy("interactiveomni")
    key = "voicelm.hift.conv_pre.parametrizations.weight.original0"
    _rewrite_hift(root, lambda k, t: {k: t[:, :, :1].repeat(1, 1, 2) if k == key else t})
    with pytest.raises(CheckpointError, match=r"conv_pre\.parametrizations\.weight\.original0.*weight norm over dim 0"):
        load_checkpoint(root)


def test_streamed_source_noise_does_not_depend_on_grouping():
    a = frame_noise(torch.Generator().manual_seed(3), 9, 480, 7)
    g = torch.Generator().manual_seed(3)
    b = torch.cat([frame_noise(g, 9, 480, 3), frame_noise(g, 9, 480, 0), frame_noise(g, 9, 480, 4)], dim=2)
    assert torch.equal(a, b)
    assert np.isclose(float(a.std()), 1.0, atol=0.02)
