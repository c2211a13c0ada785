"""Device profiles: TOML files beside this module, one per device, looked up by name or alias."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

from omni_export.configs import from_dict
from omni_export.errors import ProfileError

TARGET_NAMES = ("executorch", "tensorrt", "coreml", "onnxruntime")


@dataclass(frozen=True)
class ParityThreshold:
    cosine_min: float
    top1_min: float = 0.0
    kl_max: float = 1e9
    psnr_min: float = 0.0


# Per precision preset; a profile may override any of them in [parity.PRESET].
DEFAULT_PARITY = {
    "fp32": ParityThreshold(cosine_min=0.9999, top1_min=1.0, kl_max=1e-4, psnr_min=60.0),
    "fp16": ParityThreshold(cosine_min=0.999, top1_min=0.98, kl_max=0.01, psnr_min=40.0),
    "int8": ParityThreshold(cosine_min=0.99, top1_min=0.9, kl_max=0.05, psnr_min=25.0),
    "w8a8": ParityThreshold(cosine_min=0.98, top1_min=0.85, kl_max=0.1, psnr_min=20.0),
    "int4": ParityThreshold(cosine_min=0.95, top1_min=0.8, kl_max=0.2, psnr_min=15.0),
    "int4-all": ParityThreshold(cosine_min=0.9, top1_min=0.7, kl_max=0.3, psnr_min=12.0),
}


@dataclass(frozen=True)
class ExecuTorchSettings:
    delegates: tuple[str, ...] = ("xnnpack",)
    threads: int = 4
    # The KV cache's element type inside the program: fp16 where the device's cores do fp16
    # arithmetic (ARM), half the memory; fp32 elsewhere (x86 runs the fp16 attention kernel slower).
    kv_dtype: str = "fp32"
    # What an fp16 float recipe lowers to: fp16 activations and weights where XNNPACK runs fp16
    # kernels natively (ARM); fp32 elsewhere (x86 has no fp16 arithmetic: XNNPACK converts).
    float_dtype: str = "fp32"

    def __post_init__(self) -> None:
        for key in ("kv_dtype", "float_dtype"):
            if getattr(self, key) not in ("fp32", "fp16"):
                raise ProfileError(f"[executorch] {key} must be fp32 or fp16, got {getattr(self, key)!r}")


@dataclass(frozen=True)
class OnnxRuntimeSettings:
    # Intra-op threads; 0: every core the process may use (ONNX Runtime's own default picked
    # one thread on a 2-vCPU VM, shared/research/peer-baseline-cpu.md).
    threads: int = 0
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    # MatMulNBits accuracy level: 4 = int8 activations, int32 accumulation (the fast CPU kernel).
    accuracy_level: int = 4
    # Whether idle intra-op threads spin for more work. A bundle runs one session per component,
    # each with its own pool, and on a few cores spinning pools take the cores from the session
    # that has work (the demo conversation's LLM decode step: 7.4 ms spinning, 4.0 not). An app
    # that runs the LLM alone decodes faster spinning (docs/onnxruntime/benchmark-llm.txt).
    # (ONNX Runtime's process-wide pool would serve both, but it makes every other session in
    # the process fail unless it opts in, so a library cannot turn it on for its host app.)
    spin: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.accuracy_level <= 4:
            raise ProfileError(f"onnxruntime.accuracy_level must be 0..4, got {self.accuracy_level}")


# Lowest SM (compute capability x 10) each precision needs on NVIDIA GPUs (shared/research and
# NVIDIA's support matrices: bf16 Ampere, fp8 Ada, nvfp4 Blackwell).
MIN_SM = {"fp32": 0, "fp16": 53, "int8": 61, "int4": 75, "bf16": 80, "fp8": 89, "nvfp4": 100}


def sm_number(arch: str) -> int:
    """``sm_87`` -> 87."""
    try:
        return int(arch.removeprefix("sm_"))
    except ValueError:
        raise ProfileError(f"tensorrt.sm_arch must look like sm_87, got {arch!r}") from None


@dataclass(frozen=True)
class TensorRTSettings:
    sm_arch: str
    precision_flags: tuple[str, ...] = ("fp16",)
    workspace_mb: int = 1024  # MiB

    def __post_init__(self) -> None:
        sm = sm_number(self.sm_arch)
        for flag in self.precision_flags:
            if flag not in MIN_SM:
                raise ProfileError(f"tensorrt.precision_flags: unknown precision {flag!r}; known: {sorted(MIN_SM)}")
            if sm < MIN_SM[flag]:
                raise ProfileError(f"tensorrt.precision_flags: {flag} needs SM {MIN_SM[flag] / 10:.1f} or newer; this device is {self.sm_arch}")
        if self.workspace_mb <= 0:
            raise ProfileError(f"tensorrt.workspace_mb must be positive, got {self.workspace_mb}")


@dataclass(frozen=True)
class CoreMLSettings:
    compute_units: str = "ALL"
    minimum_deployment_target: str = "iOS18"

    def __post_init__(self) -> None:
        if self.compute_units not in ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"):
            raise ProfileError(f"coreml.compute_units {self.compute_units!r} is not a Core ML compute unit set")


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    target: str
    memory_gb: float
    usable_memory_gb: float
    bandwidth_gbs: float
    peak_int8_tops: float
    peak_fp16_tflops: float
    default_quant: str
    max_context: int
    aliases: tuple[str, ...] = ()
    sources: str = ""
    # Image tiles the vision encoder takes per call (None: all of an image's tiles at once). Fewer
    # tiles per call shrink the encoder's planned activations by the same factor at the same work.
    tiles_per_call: int | None = None
    executorch: ExecuTorchSettings | None = None
    onnxruntime: OnnxRuntimeSettings | None = None
    tensorrt: TensorRTSettings | None = None
    coreml: CoreMLSettings | None = None
    parity: dict[str, ParityThreshold] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.target not in TARGET_NAMES:
            raise ProfileError(f"profile {self.name}: target {self.target!r} is not one of {TARGET_NAMES}")
        if getattr(self, self.target, None) is None:
            raise ProfileError(f"profile {self.name}: target {self.target} needs a [{self.target}] table")
        if not 0 < self.usable_memory_gb <= self.memory_gb:
            raise ProfileError(f"profile {self.name}: usable_memory_gb must be in (0, memory_gb]")

    def threshold(self, precision_class: str) -> ParityThreshold:
        """The threshold of a precision class (quantize.recipe.precision_class: what a component's
        weights are, whatever its recipe is called); the profile's [parity.CLASS] overrides."""
        if precision_class in self.parity:
            return self.parity[precision_class]
        if precision_class not in DEFAULT_PARITY:
            raise ProfileError(f"no parity threshold for precision class {precision_class!r}; known: {sorted(DEFAULT_PARITY)}")
        return DEFAULT_PARITY[precision_class]


def _parse(name: str, text: str) -> Profile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"profile {name}: invalid TOML: {exc}") from None
    return from_dict(Profile, {"name": name, **data}, where=f"profile {name}")


@cache
def all_profiles() -> dict[str, Profile]:
    out = {}
    for entry in sorted(resources.files(__package__).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            name = entry.name[: -len(".toml")]
            out[name] = _parse(name, entry.read_text())
    return out


def aliases() -> dict[str, str]:
    return {a: p.name for p in all_profiles().values() for a in p.aliases}


def get_profile(name: str) -> Profile:
    profiles = all_profiles()
    resolved = aliases().get(name, name)
    if resolved not in profiles:
        known = sorted(profiles) + sorted(aliases())
        raise ProfileError(f"unknown profile {name!r}; known: {', '.join(known)} (see `omni-export profiles`)")
    return profiles[resolved]
