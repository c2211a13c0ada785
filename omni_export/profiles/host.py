"""Will the export itself fit this build host? The device fit (fit.py) asks whether the bundle
fits the phone; this asks whether making it fits the machine doing it, before any weight is read.

The main job keeps the checkpoint as stored and memory-mapped, and works one component at a
time (compiler.py): its references run with one linear widened at a time and hand each linear's
pages back after its call; each component is freed once lowered. What it cannot go under is
the larger of two phases:

- quantizing: every quantized weight's codes (one byte each, plus a scale and zero point per
  group of 32) are held until the quantization cache is written, then mapped back from it;
- building the largest component: its weights as traced (those codes, or 4 bytes a parameter
  where it stays float: ExecuTorch traces float weights in fp32) and what lowering adds on top,
  and parity's runtime, measured on the 4B run (docs/export/README.md) as LOWERING_FACTOR
  times the traced bytes.

A checkpoint whose floor exceeds the host's available memory is refused with what it needs."""

from __future__ import annotations

from dataclasses import dataclass

from omni_export.profiles.fit import MemoryPlan

# Python, torch and the exporters imported, measured on this project's host before any weight.
RUNTIME_BYTES = int(0.6e9)
CODE_BYTES = 1 + (4 + 1) / 32  # an int8 code per weight, an fp32 scale and an int8 zero point per group of 32
FLOAT_BYTES = 4
# Peak of a component's build over its traced weight bytes: the 4B LLM at int4 (4.41 B
# parameters, 5.10 GB of codes) peaked at 15.65 GB resident in its lowering, the whole job's peak
# (docs/export/, run 3: prefill and decode still lowered as two methods; run 2 peaked at 22.11 GB
# in parity before the runtime shared one packing of the weights).
LOWERING_FACTOR = 3.1


def host_available_bytes() -> int | None:
    """Memory the kernel says a new allocation can have now (MemAvailable); None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


@dataclass(frozen=True)
class HostFit:
    params: int
    largest: tuple[str, int]  # the component whose build needs most, and its parameter count
    quantize_bytes: int  # every quantized weight's codes, held until cached
    build_bytes: int  # the largest component's traced weights, times what lowering adds
    available_bytes: int | None

    @property
    def floor_bytes(self) -> int:
        return max(self.quantize_bytes, self.build_bytes) + RUNTIME_BYTES

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.floor_bytes <= self.available_bytes

    def explain(self) -> str:
        have = "unknown" if self.available_bytes is None else f"{self.available_bytes / 1e9:.1f} GB"
        name, n = self.largest
        return (f"exporting this checkpoint needs at least {self.floor_bytes / 1e9:.1f} GB on this host (the larger of "
                f"{self.quantize_bytes / 1e9:.1f} GB of quantized codes held until cached and {self.build_bytes / 1e9:.1f} GB "
                f"to trace and lower {name} ({n / 1e9:.2f} B parameters), plus {RUNTIME_BYTES / 1e9:.1f} GB of libraries); "
                f"{have} is available")  # fmt: skip


def _is_float(precision: str) -> bool:
    return precision.startswith("fp")


def _traced_bytes(precision: str, params: int) -> float:
    return params * (FLOAT_BYTES if _is_float(precision) else CODE_BYTES)


def host_fit(plan: MemoryPlan, available: int | None = None) -> HostFit:
    quantized = sum(c.params for c in plan.components if not _is_float(c.precision))
    big = max(plan.components, key=lambda c: _traced_bytes(c.precision, c.params))
    return HostFit(sum(c.params for c in plan.components), (big.name, big.params), int(quantized * CODE_BYTES),
                   int(LOWERING_FACTOR * _traced_bytes(big.precision, big.params)),
                   host_available_bytes() if available is None else available)  # fmt: skip
