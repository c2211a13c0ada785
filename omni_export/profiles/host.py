"""Will the export itself fit this build host? The device fit (fit.py) asks whether the bundle
fits the phone; this asks whether making it fits the machine doing it, before any weight is read.

The main job holds every component in fp32 for its whole run: the eager reference that golden
I/O and the parity gate compare against, which each component's build then quantizes, traces
and lowers from; while a component's golden I/O is made, an fp16 copy of it exists beside it
(the fp16 reference). Four bytes per parameter, plus two for the largest component, is therefore
a floor the job cannot go under, and a checkpoint whose floor exceeds the host's available
memory is refused with what it needs. What lowering adds on top depends on the target and is
measured, not modelled here: it is reported by the benchmarks (docs/quantization/)."""

from __future__ import annotations

from dataclasses import dataclass

from omni_export.profiles.fit import MemoryPlan

# Python, torch and the exporters imported, measured on this project's host before any weight.
RUNTIME_BYTES = int(0.6e9)


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
    largest: tuple[str, int]  # the component with the most parameters, and their count
    floor_bytes: int  # fp32 copies of every component, the largest one's fp16 copy, the libraries
    available_bytes: int | None

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.floor_bytes <= self.available_bytes

    def explain(self) -> str:
        have = "unknown" if self.available_bytes is None else f"{self.available_bytes / 1e9:.1f} GB"
        name, n = self.largest
        return (f"exporting this checkpoint needs at least {self.floor_bytes / 1e9:.1f} GB on this host ({self.params / 1e9:.2f} B "
                f"parameters held in fp32 for the whole job as the parity reference, {name}'s {n / 1e9:.2f} B also in fp16 "
                f"while its reference outputs are made, {RUNTIME_BYTES / 1e9:.1f} GB of libraries); {have} is available")  # fmt: skip


def host_fit(plan: MemoryPlan, available: int | None = None) -> HostFit:
    params = sum(c.params for c in plan.components)
    big = max(plan.components, key=lambda c: c.params)
    return HostFit(params, (big.name, big.params), 4 * params + 2 * big.params + RUNTIME_BYTES,
                   host_available_bytes() if available is None else available)  # fmt: skip
