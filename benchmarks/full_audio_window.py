"""What InteractiveOmni's 30 s Whisper window costs at full size: the Whisper-large-v3-shaped
audio encoder (+ pooling adapter, random weights), eager fp32 on this host, on a 5 s clip as it
is and padded to the 3000 frames the release's encoder takes. Prints a table and writes JSON.

    .venv/bin/python benchmarks/full_audio_window.py --out docs/runtime/full-audio-window
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

RUNS = 2


def main() -> None:
    from omni_export.export.components.whisper import WhisperAudioEncoder
    from omni_export.export.families import FAMILIES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.txt")
    ap.add_argument("--clip-s", type=float, default=5.0)
    a = ap.parse_args()
    cfg = FAMILIES.get("interactiveomni").preset("full")
    enc = WhisperAudioEncoder(cfg.audio, cfg.llm.hidden_size).eval()
    clip = int(a.clip_s * 100) // 4 * 4
    rows = {}
    with torch.inference_mode():
        for name, frames in (("clip as it is", clip), ("padded to 30 s", 3000)):
            x = torch.randn(1, cfg.audio.num_mel_bins, frames)
            enc(x)  # warm-up
            times = []
            for _ in range(RUNS):
                t = time.perf_counter()
                out = enc(x)
                times.append(time.perf_counter() - t)
            rows[name] = {"frames": frames, "tokens": out.shape[-2], "s": min(times)}
    rows["padded / as it is"] = rows["padded to 30 s"]["s"] / rows["clip as it is"]["s"]
    params = sum(p.numel() for p in enc.parameters())
    text = "\n".join([f"audio encoder: {params / 1e6:.0f} M parameters, eager fp32, {torch.get_num_threads()} threads, {a.clip_s:g} s clip",
                      *(f"{k:<16} {v['frames']:>5} frames -> {v['tokens']:>4} tokens  {v['s']:.2f} s" for k, v in rows.items() if isinstance(v, dict)),
                      f"padded / as it is: {rows['padded / as it is']:.1f}x",
                      f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GiB"])  # fmt: skip
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".json").write_text(json.dumps({"params": params, **rows}, indent=2))
        a.out.with_suffix(".txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
