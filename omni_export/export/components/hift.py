"""CosyVoice2's HiFT vocoder: a neural source filter (F0 predictor -> harmonic source) and a
HiFi-GAN-style filter whose last layer predicts an STFT (magnitude, phase) that an inverse STFT
turns into 24 kHz audio. 80-bin mel at 50 Hz in, x480 out (upsample 8*5*3, iSTFT hop 4).

Module tree and tensor names follow the released generator (FunAudioLLM/CosyVoice,
``cosyvoice/hifigan/generator.py`` and ``f0_predictor.py``, hyper-parameters from
``cosyvoice2.yaml``): ``f0_predictor.condnet.{0,2,4,6,8}``, ``f0_predictor.classifier``,
``m_source.l_linear``, ``conv_pre``, ``ups.i``, ``source_downs.i``, ``source_resblocks.i``,
``resblocks.j`` (convs1/convs2 with Snake ``activations1/2``), ``conv_post``; weight-normalised
where the release is (folded at load, export/weight_norm.py).

Two exported methods instead of the release's one call, so that streaming can join windows:
``source`` (mel -> harmonic source and per-frame phase) and ``decode`` (mel + source -> audio).
The release draws its noise inside the call; here the caller passes it, one draw per frame, so a
sample's noise does not depend on how audio was chunked, and every backend replays the same call.
The STFT and iSTFT are convolutions over a fixed DFT basis (strided conv, transposed conv and an
overlap-add window envelope), which torch.export, ONNX and Core ML all take; they equal
``torch.stft`` / ``torch.istft`` (center=True, periodic Hann), tested against them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omni_export.export.components.base import Component, Role
from omni_export.export.trace_specs import F32, I64, Call, Limits, MethodSpec, Tensor, dim, dtype_of
from omni_export.export.weight_norm import weight_norm
from omni_export.runtime_py.sampler import frame_noise


@dataclass(frozen=True)
class ISTFTParams:
    n_fft: int = 16
    hop_len: int = 4


@dataclass(frozen=True)
class F0PredictorConfig:
    num_class: int = 1
    in_channels: int = 80
    cond_channels: int = 512


@dataclass(frozen=True)
class HiFTConfig:
    """CosyVoice2's ``hift`` block; defaults are the released 24 kHz model."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    istft_params: ISTFTParams = field(default_factory=ISTFTParams)
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_predictor: F0PredictorConfig = field(default_factory=F0PredictorConfig)

    @property
    def hop(self) -> int:
        """Audio samples per mel frame."""
        return math.prod(self.upsample_rates) * self.istft_params.hop_len

    @property
    def harmonics(self) -> int:
        return self.nb_harmonics + 1


# -- fixed transforms --------------------------------------------------------------------------


# The bases are cached as numpy arrays, never as tensors: a tensor made while torch.export traces
# is a fake tensor, and a cache would hand it to every later eager call.
@lru_cache(maxsize=8)
def _hann(n: int) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)  # periodic, as torch.hann_window


def _dft(n_fft: int) -> tuple[np.ndarray, np.ndarray]:
    ang = 2 * np.pi * np.arange(n_fft // 2 + 1)[:, None] * np.arange(n_fft) / n_fft
    return np.cos(ang), np.sin(ang)


@lru_cache(maxsize=8)
def stft_basis(n_fft: int) -> np.ndarray:
    """[n_fft + 2, 1, n_fft]: windowed cos rows then -sin rows, so a strided conv is torch.stft's
    real and imaginary parts (onesided)."""
    cos, sin = _dft(n_fft)
    return (np.concatenate([cos, -sin]) * _hann(n_fft))[:, None].astype(np.float32)


@lru_cache(maxsize=8)
def istft_basis(n_fft: int) -> np.ndarray:
    """[n_fft + 2, 1, n_fft]: the windowed inverse real DFT, for a transposed conv (overlap-add).
    Interior bins count twice (their conjugates); DC's and Nyquist's imaginary parts drop out, as
    in irfft."""
    cos, sin = _dft(n_fft)
    scale = np.full((n_fft // 2 + 1, 1), 2.0)
    scale[0] = scale[-1] = 1.0
    return (np.concatenate([scale * cos, -scale * sin]) * _hann(n_fft) / n_fft)[:, None].astype(np.float32)


@lru_cache(maxsize=8)
def window_squared(n_fft: int) -> np.ndarray:
    """[1, 1, n_fft]: the squared Hann window, whose overlap-add is the iSTFT's envelope."""
    return (_hann(n_fft) ** 2)[None, None].astype(np.float32)


def _const(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    # from a flat copy: numpy may give size-1 dims a stride of 0, which ExecuTorch refuses
    return torch.tensor(a.ravel(), dtype=like.dtype, device=like.device).reshape(a.shape)


def stft(x: torch.Tensor, n_fft: int, hop: int, basis: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, N] -> [B, n_fft + 2, N // hop + 1]: real parts then imaginary parts (torch.stft with
    center=True, reflect padding, periodic Hann window of n_fft). ``basis``: stft_basis(n_fft)
    held by the caller (HiFT keeps it as a constant attribute), else made here."""
    x = F.pad(x[:, None], (n_fft // 2, n_fft // 2), mode="reflect")
    return F.conv1d(x, _const(stft_basis(n_fft), x) if basis is None else basis.to(x.dtype), stride=hop)


def istft(spec: torch.Tensor, n_fft: int, hop: int, basis: torch.Tensor | None = None, window2: torch.Tensor | None = None) -> torch.Tensor:
    """[B, n_fft + 2, frames] (real then imaginary) -> [B, hop * (frames - 1)], as torch.istft
    with center=True: overlap-add of windowed frames over the squared-window envelope. ``basis``
    and ``window2``: istft_basis(n_fft) and window_squared(n_fft) held by the caller, else made here."""
    frames = F.conv_transpose1d(spec, _const(istft_basis(n_fft), spec) if basis is None else basis.to(spec.dtype), stride=hop)
    w2 = _const(window_squared(n_fft), spec) if window2 is None else window2.to(spec.dtype)
    envelope = F.conv_transpose1d(torch.ones_like(spec[:, :1]), w2, stride=hop)
    pad = n_fft // 2
    n = frames.shape[-1] - 2 * pad
    return (frames[..., pad : pad + n] / envelope[..., pad : pad + n])[:, 0]


# -- layers -------------------------------------------------------------------------------------


class Snake(nn.Module):
    """x + sin^2(a x) / a per channel (BigVGAN's periodic activation, linear-scale alpha)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha[:, None]  # [C, 1] broadcasts over [1, C, T]; XNNPACK unsqueezes only a trailing dim
        return x + torch.sin(x * a).pow(2) / (a + 1e-9)


class ResBlock(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        conv = lambda d: weight_norm(nn.Conv1d(channels, channels, kernel, dilation=d, padding=d * (kernel - 1) // 2))  # noqa: E731
        self.convs1 = nn.ModuleList(conv(d) for d in dilations)
        self.convs2 = nn.ModuleList(conv(1) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, a1, c2, a2 in zip(self.convs1, self.activations1, self.convs2, self.activations2, strict=True):
            x = x + c2(a2(c1(a1(x))))
        return x


class ELU(nn.Module):
    """nn.ELU (alpha 1) written as clamp and exp: XNNPACK's ExecuTorch partitioner does not take
    aten.elu, and each one left out split the F0 predictor into separate delegate calls."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, min=0) + torch.exp(torch.clamp(x, max=0)) - 1


class ConvRNNF0Predictor(nn.Module):
    """mel [1, 80, T] -> F0 in Hz per frame [1, T] (five weight-normed convs with ELU, a linear)."""

    def __init__(self, cfg: F0PredictorConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [weight_norm(nn.Conv1d(cfg.in_channels if i == 0 else cfg.cond_channels, cfg.cond_channels, 3, padding=1)), ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cfg.cond_channels, cfg.num_class)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.condnet(mel).transpose(1, 2)).squeeze(-1).abs()


class HarmonicSource(nn.Module):
    """CosyVoice2's SourceModuleHnNSF over SineGen2, at frame rate where the release works per sample.

    The release upsamples F0 to samples (nearest), takes each harmonic's per-sample phase step,
    downsamples it linearly by the hop (which picks each frame's own value back: the frame is
    constant), accumulates over frames and upsamples the phase linearly. Here the same phase is
    built from frame values directly and accumulated in whole-cycle-free fractions, so fp32 keeps
    it to ~1e-4 cycle over the longest window (the release's absolute phase grows without bound
    and loses precision with it). The
    release's random initial phase lands on a sample that the downsampling never reads, so it has
    no effect there and none here. ``phase0`` (cycles) is the phase of frame ``anchor``: a stream
    carries it across windows so harmonics never jump; 0 at frame 0 is the release's phase up to
    a constant offset per harmonic."""

    def __init__(self, cfg: HiFTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.l_linear = nn.Linear(cfg.harmonics, 1)

    def forward(self, f0: torch.Tensor, phase0: torch.Tensor, anchor: torch.Tensor, noise: torch.Tensor):
        """f0 [1, T] Hz, phase0 [1, H] cycles, anchor [1] int64, noise [1, H, T, hop] standard normal
        -> source [1, T, hop], phase [1, H, T] (cycles in [0, 1) at each frame)."""
        c, up = self.cfg, self.cfg.hop
        f0 = f0.float()
        k = torch.arange(1, c.harmonics + 1, dtype=torch.float32)[None, :, None]
        step = f0[:, None] * k / c.sampling_rate  # cycles per sample, [1, H, T]
        step = step - torch.floor(step)
        gained = step * up  # cycles gained over one frame
        cum = torch.cumsum(gained - torch.floor(gained), dim=-1)
        at = torch.index_select(cum, 2, anchor)
        rel = cum - at
        phase = rel - torch.floor(rel) + phase0.float()[..., None]
        phase = phase - torch.floor(phase)
        # linear interpolation between frame phases (align_corners=False): a frame's first half
        # leans on the previous frame, its second half on the next; the edges hold their frame.
        first = torch.arange(gained.shape[-1]) == 0
        into = torch.where(first, torch.zeros_like(gained), gained)  # phase gained from frame m-1 to m
        onward = F.pad(gained, (0, 1))[..., 1:]  # from frame m to m+1
        half = up // 2
        r = (torch.arange(up, dtype=torch.float32) + 0.5) / up
        w_left, w_right = (r[:half] + 0.5 - 1.0), (r[half:] - 0.5)
        left = phase[..., None] + w_left * into[..., None]  # [1, H, T, half]: behind frame m's phase
        right = phase[..., None] + w_right * onward[..., None]
        sines = torch.sin(2 * math.pi * torch.cat([left, right], dim=-1)) * c.nsf_alpha
        uv = (f0 > c.nsf_voiced_threshold).float()[:, None, :, None]
        noise_amp = uv * c.nsf_sigma + (1 - uv) * (c.nsf_alpha / 3)
        waves = sines * uv + noise_amp * noise.float()  # [1, H, T, hop]
        w = self.l_linear.weight.float()[0]
        source = torch.tanh(torch.einsum("bhtu,h->btu", waves, w) + self.l_linear.bias.float())
        return source, phase


class HiFT(Component, nn.Module):
    role = Role.VOCODER

    def __init__(self, cfg: HiFTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n_fft, base = cfg.istft_params.n_fft, cfg.base_channels
        rates = cfg.upsample_rates
        self.m_source = HarmonicSource(cfg)
        self.conv_pre = weight_norm(nn.Conv1d(cfg.in_channels, base, 7, padding=3))
        self.ups = nn.ModuleList(
            weight_norm(nn.ConvTranspose1d(base // 2**i, base // 2 ** (i + 1), k, u, padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(rates, cfg.upsample_kernel_sizes, strict=True))
        )
        # The source's STFT enters each stage at that stage's rate: strides are the later stages' rates.
        downs = [math.prod(rates[i + 1 :]) for i in range(len(rates))]
        self.source_downs = nn.ModuleList(
            nn.Conv1d(n_fft + 2, base // 2 ** (i + 1), 1) if d == 1 else nn.Conv1d(n_fft + 2, base // 2 ** (i + 1), 2 * d, d, padding=d // 2)
            for i, d in enumerate(downs)
        )
        self.source_resblocks = nn.ModuleList(
            ResBlock(base // 2 ** (i + 1), k, tuple(d))
            for i, (k, d) in enumerate(zip(cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes, strict=True))
        )
        self.resblocks = nn.ModuleList(
            ResBlock(base // 2 ** (i + 1), k, tuple(d))
            for i in range(len(rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True)
        )
        self.conv_post = weight_norm(nn.Conv1d(base // 2 ** len(rates), n_fft + 2, 7, padding=3))
        self.f0_predictor = ConvRNNF0Predictor(cfg.f0_predictor)
        # The fixed transforms as plain tensor attributes (neither checkpoint tensors nor buffers):
        # torch.export lifts them as constants that feed the convolutions directly, which XNNPACK
        # takes as static weights (made in the forward they sat behind lift_fresh_copy and were
        # left to portable kernels; as non-persistent buffers XNNPACK's passes broke the program's
        # signature). Built on the meta device like every module, so made again after loading.
        self._fixed_transforms()
        self.register_load_state_dict_post_hook(lambda m, _: m._fixed_transforms() if m.stft_basis.is_meta else None)

    def _fixed_transforms(self) -> None:
        # fp32 whatever the checkpoint stores (bf16 would round the transforms): forward casts
        n_fft, like = self.cfg.istft_params.n_fft, torch.empty(0, device=self.conv_pre.weight.device)
        for name, basis in (("stft_basis", stft_basis(n_fft)), ("istft_basis", istft_basis(n_fft)), ("istft_window2", window_squared(n_fft))):
            setattr(self, name, _const(basis, like))

    # -- the two halves ------------------------------------------------------------------------
    def source(self, mel: torch.Tensor, phase0: torch.Tensor, anchor: torch.Tensor, noise: torch.Tensor):
        """mel [1, 80, T] -> source [1, T, hop], phase [1, H, T]."""
        return self.m_source(self.f0_predictor(mel), phase0, anchor, noise)

    def decode(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """mel [1, 80, T], source [1, T, hop] -> waveform [1, T * hop]."""
        c = self.cfg
        n_fft, hop = c.istft_params.n_fft, c.istft_params.hop_len
        s = stft(source.reshape(1, -1).to(mel.dtype), n_fft, hop, self.stft_basis)
        x = self.conv_pre(mel)
        nk = len(c.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, c.lrelu_slope))
            if i == len(self.ups) - 1:  # the release's one-sample reflection pad, as a slice
                x = torch.cat([x[..., 1:2], x], dim=-1)
            x = x + self.source_resblocks[i](self.source_downs[i](s))
            x = sum(self.resblocks[i * nk + j](x) for j in range(nk)) / nk
        x = self.conv_post(F.leaky_relu(x))  # the release's default slope (0.01) here, not lrelu_slope
        half = n_fft // 2 + 1
        magnitude = torch.clamp(torch.exp(x[:, :half]), max=1e2)
        phase = torch.sin(x[:, half:])  # as released: a sine of the predicted phase
        spec = torch.cat([magnitude * torch.cos(phase), magnitude * torch.sin(phase)], dim=1)
        return torch.clamp(istft(spec, n_fft, hop, self.istft_basis, self.istft_window2), -c.audio_limit, c.audio_limit)

    def forward(self, mel: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One-shot: mel [1, 80, T], noise [1, H, T, hop] -> waveform [1, T * hop]."""
        h = self.cfg.harmonics
        source, _ = self.source(mel, torch.zeros(1, h, dtype=mel.dtype), torch.zeros(1, dtype=torch.long), noise)
        return self.decode(mel, source)

    # -- as a component ---------------------------------------------------------------------
    def stream_state_elements(self) -> int:
        """The stream keeps one window's noise, source and per-frame phase between calls."""
        w = Limits.vocoder_window
        return w * self.cfg.hop * (self.cfg.harmonics + 1) + w * self.cfg.harmonics

    def export_methods(self, limits):  # type: ignore[no-untyped-def]
        c, dt = self.cfg, dtype_of(self)
        h, hop = c.harmonics, c.hop
        frames = dim("mel_frames", 2, limits.vocoder_window)
        mel = Tensor("mel", F32, (1, c.in_channels, "mel_frames"))
        src = Tensor("source", F32, (1, "mel_frames", hop))
        ex_mel = torch.randn(1, c.in_channels, 50, dtype=dt)
        ex_src = (ex_mel, torch.zeros(1, h, dtype=dt), torch.zeros(1, dtype=torch.long), torch.randn(1, h, 50, hop, dtype=dt))
        return [
            MethodSpec("source", Call(self, "source"), ex_src, ({2: frames}, None, None, {2: frames}),
                       (mel, Tensor("phase0", F32, (1, h)), Tensor("anchor", I64, (1,)), Tensor("noise", F32, (1, h, "mel_frames", hop))),
                       (src, Tensor("phase", F32, (1, h, "mel_frames")))),
            MethodSpec("decode", Call(self, "decode"), (ex_mel, torch.randn(1, 50, hop, dtype=dt)), ({2: frames}, {1: frames}),
                       (mel, src), (Tensor("wav", F32, (1, f"mel_frames*{hop}")),)),
        ]  # fmt: skip

    def golden_script(self, ctx, ref):  # type: ignore[no-untyped-def]
        """Two overlapping streamed windows, the second carrying the first's phase, as the runtime
        calls them."""
        g = torch.Generator().manual_seed(ctx.seed)
        c = self.cfg
        mel = torch.randn(1, c.in_channels, 60, generator=g) * 2 - 4  # log-mel range
        noise = frame_noise(g, c.harmonics, c.hop, 60)
        first = (mel[..., :40], torch.zeros(1, c.harmonics), torch.tensor([0]), noise[:, :, :40])
        src1, phase1 = ref.run("source", first)
        second = (mel[..., 30:], phase1[..., 32], torch.tensor([2]), noise[:, :, 30:])
        src2 = ref.run("source", second)[0]
        return [("source", first), ("source", second), ("decode", (first[0], src1)), ("decode", (second[0], src2))]

