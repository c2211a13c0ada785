"""The full-size HiFT vocoder (CosyVoice2's 24 kHz generator, 20.8 M parameters): lowered to
ExecuTorch (android profile, fp32 XNNPACK) and run as the speech stream runs it, window by window
(8 context frames, one flow chunk of new mel, 6 held back), against the eager module in the same
process. Each phase runs in its own interpreter so its peak RSS is its own. Prints a table and
writes JSON.

    .venv/bin/python benchmarks/full_vocoder.py --out docs/runtime/full-vocoder
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from phases import phase  # benchmarks/phases.py (this script's own folder is on sys.path)

WINDOWS = 12

COMMON = """
import resource, sys, time, torch
from omni_export.export.components.flow import FlowConfig
from omni_export.export.components.hift import HiFT, HiFTConfig
from omni_export.runtime_py.sampler import frame_noise
torch.manual_seed(0)
cfg = HiFTConfig()
new = FlowConfig().token_chunk * FlowConfig().token_mel_ratio
frames = 8 + new + 6  # the stream's window: left context, one flow chunk, lookahead
g = torch.Generator().manual_seed(0)
mel = torch.randn(1, 80, frames, generator=g) * 2 - 4
noise = frame_noise(g, cfg.harmonics, cfg.hop, frames)
phase0, anchor = torch.zeros(1, cfg.harmonics), torch.tensor([8])
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
"""

EAGER = COMMON + """
m = HiFT(cfg).eval()
times = []
with torch.inference_mode():
    for _ in range(int(sys.argv[1]) + 1):
        t = time.perf_counter()
        s, _ = m.source(mel, phase0, anchor, noise)
        wav = m.decode(mel, s)
        times.append(time.perf_counter() - t)
print({"ms": [x * 1000 for x in times[1:]], "new_audio_s": new * cfg.hop / cfg.sampling_rate, "frames": frames,
       "params": sum(p.numel() for p in m.parameters()), "peak_rss_gib": peak()})
"""

LOWER = COMMON + """
from pathlib import Path
from omni_export.export.trace import trace_component
from omni_export.export.trace_specs import Limits
from omni_export.profiles import get_profile
from omni_export.targets import TARGETS
m = HiFT(cfg).eval()
limits = Limits(max_context=4096)
target = TARGETS.get("executorch")
t = time.perf_counter()
traced = trace_component("vocoder", m, limits, target.kv_mode)
trace_s = time.perf_counter() - t
art = target.lower(traced, get_profile("android"), Path(sys.argv[1]), {}, {})
torch.save({k: v for k, v in m.state_dict().items()}, Path(sys.argv[1]) / "ref.pt")
print({"trace_s": trace_s, "lower_s": art.build_s, "file": art.files[0], "bytes": (Path(sys.argv[1]) / art.files[0]).stat().st_size,
       "peak_rss_gib": peak()})
"""

RUN = COMMON + """
from pathlib import Path
from executorch.runtime import Runtime
root = Path(sys.argv[1])
prog = Runtime.get().load_program(root / sys.argv[2])
src_m, dec_m = prog.load_method("source"), prog.load_method("decode")
rss_load = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024**2
times = []
for _ in range(int(sys.argv[3]) + 1):
    t = time.perf_counter()
    s, _ = src_m.execute([mel, phase0, anchor, noise])
    wav = dec_m.execute([mel, s])[0]
    times.append(time.perf_counter() - t)
m = HiFT(cfg).eval()
m.load_state_dict(torch.load(root / "ref.pt", weights_only=True))
with torch.inference_mode():
    ref = m.decode(mel, m.source(mel, phase0, anchor, noise)[0])
cos = torch.nn.functional.cosine_similarity(wav.flatten(), ref.flatten(), dim=0).item()
print({"ms": [x * 1000 for x in times[1:]], "rss_after_load_gib": rss_load, "cosine_vs_eager": cos, "peak_rss_gib": peak()})
"""


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/full-vocoder"))
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.txt")
    ap.add_argument("--windows", type=int, default=WINDOWS)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    _, eager = phase(EAGER, str(a.windows))
    lower_wall, lowered = phase(LOWER, str(a.work))
    _, run = phase(RUN, str(a.work), lowered["file"], str(a.windows))
    audio_ms = eager["new_audio_s"] * 1000
    rows = [
        ("parameters", f"{eager['params'] / 1e6:.1f} M"),
        ("window", f"{eager['frames']} mel frames ({audio_ms:.0f} ms of new audio)"),
        ("eager fp32, ms per window (median)", f"{median(eager['ms']):.0f} (RTF {median(eager['ms']) / audio_ms:.3f})"),
        ("executorch fp32, ms per window (median)", f"{median(run['ms']):.0f} (RTF {median(run['ms']) / audio_ms:.3f})"),
        ("executorch / eager", f"{median(run['ms']) / median(eager['ms']):.2f}x"),
        ("executorch output vs eager, cosine", f"{run['cosine_vs_eager']:.6f}"),
        ("trace + lower (s), process wall", f"{lowered['trace_s']:.0f} + {lowered['lower_s']:.0f}, {lower_wall:.0f}"),
        ("lowering peak RSS", f"{lowered['peak_rss_gib']:.2f} GiB"),
        (".pte size", f"{lowered['bytes'] / 1e6:.1f} MB"),
        ("runtime RSS after load / peak", f"{run['rss_after_load_gib']:.2f} / {run['peak_rss_gib']:.2f} GiB"),
        ("eager peak RSS", f"{eager['peak_rss_gib']:.2f} GiB"),
    ]
    width = max(len(k) for k, _ in rows)
    text = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".json").write_text(json.dumps({"eager": eager, "lower": lowered, "executorch": run}, indent=2))
        a.out.with_suffix(".txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
