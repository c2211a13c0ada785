"""What the device could do at best, beside what was measured.

A call cannot beat reading its weights once from memory (bytes / bandwidth), nor its operations
at the device's peak. The larger of the two is the call's floor; a latency report shows
measured / floor per stage. Both are floors, not predictions: caches, kernel efficiency and the
runtime's own work sit between them and the measurement; weights small enough to stay in the
device's caches are read faster than its memory bandwidth, so a small model's decode can come in
under its bandwidth floor (a ratio below 1 says just that). Operations are counted at export on the
float module's golden calls (torch's FlopCounterMode over linear layers and convolutions, so a
vocoder's upsampling convolutions count as they run; attention is left out) per position of the call's first input (tokens,
frames, tiles), and scaled by the call's positions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omni_export.profiles import Profile

# Methods that read a row or two, not the component's weights: no meaningful floor.
NO_FLOOR = ("embed", "reset_cache", "speaker", "embed_text", "embed_speech", "embed_special", "embed_codes")


@dataclass(frozen=True)
class Weights:
    bytes: float  # weights a full call reads (the LLM's embedding table excluded)
    params: float
    quantized: bool


def bundle_weights(bundle: Path, manifest: Any) -> dict[str, Weights]:
    """From artifact sizes; params estimated from each component's precision class."""
    from omni_export.quantize.recipe import BYTES_PER_PARAM

    out = {}
    for name, c in manifest.components.items():
        size = float(sum((Path(bundle) / f).stat().st_size for f in c.files))
        per = BYTES_PER_PARAM.get(c.precision, 4.0)
        if name == "llm":  # one fp32 table serves `embed`, a row per token (a quantized head is its own copy)
            llm = manifest.model["llm"]
            size -= llm["vocab_size"] * llm["hidden_size"] * 4.0
        out[name] = Weights(size, size / per, per < 2)
    return out


def module_weights(components: dict[str, Any]) -> dict[str, Weights]:
    """Exact, from eager modules."""
    out = {}
    for name, m in components.items():
        params = sum(p.numel() for p in m.parameters())
        size = float(sum(p.numel() * p.element_size() for p in m.parameters()))
        if name == "llm" and getattr(m, "lm_head", None) is not None:  # a tied table is read whole as the head
            emb = m.model.embed_tokens.weight
            params, size = params - emb.numel(), size - emb.numel() * emb.element_size()
        out[name] = Weights(size, float(params), False)
    return out


def add_floors(report: dict[str, Any], profile: Profile, weights: dict[str, Weights], components: dict[str, Any]) -> dict[str, Any]:
    """Floors beside each measured stage. Operations per call come from the manifest's
    ``flops_per_position`` (counted on the float module's golden calls at export), times the
    call's positions; without it, 2 x params x positions."""
    bw = profile.bandwidth_gbs * 1e9
    floors = {}
    for stage, s in report["stages"].items():
        component, method = stage.split(".", 1)
        w = weights.get(component)
        if w is None or method in NO_FLOOR:
            continue
        entry = components.get(component)
        per = entry.methods[method].flops_per_position if entry is not None and method in entry.methods else None
        positions = s["positions_p50"] or 1
        ops = per * positions if per is not None else 2 * w.params * positions
        if not ops and not w.bytes:
            continue
        peak = (profile.peak_int8_tops if w.quantized else profile.peak_fp16_tflops) * 1e12
        mem, compute = w.bytes / bw, ops / peak
        floor_ms = max(mem, compute) * 1000
        floors[stage] = {"floor_ms": floor_ms, "bound": "memory" if mem >= compute else "compute", "ops": ops,
                         "ops_source": "counted" if per is not None else "2 x params",
                         "measured_over_floor": s["p50_ms"] / floor_ms if s["p50_ms"] and floor_ms else None}  # fmt: skip
    llm = weights.get("llm")
    report["roofline"] = {
        "profile": profile.name, "device": profile.description, "bandwidth_gbs": profile.bandwidth_gbs,
        "peak_fp16_tflops": profile.peak_fp16_tflops, "peak_int8_tops": profile.peak_int8_tops,
        "decode_tok_s_ceiling": bw / llm.bytes if llm else None, "stages": floors,
    }  # fmt: skip
    return report
