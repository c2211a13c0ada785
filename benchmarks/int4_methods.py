"""How much of an int4 LLM's error each choice accounts for, before anything is lowered (issue 13,
item 4): the whole LLM of a checkpoint quantized under a recipe, no layer promoted, its logits on
the held-out text against the fp32 model's, by the LLM gate's cosine and mean KL (the estimate
the main job makes before lowering; sensitivity.py).

Variants: round-to-nearest int4 g32 with the head reading the 8-bit table (the `int4` preset),
GPTQ instead of round-to-nearest, and the head with its own 4-bit codes. GPTQ runs one thread
(its column sweep is many small ops, which thread barriers slow on a shared 2-core host).

    .venv/bin/python benchmarks/int4_methods.py --checkpoint /tmp/q06/checkpoint --out docs/quantization/int4-methods
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import publish  # noqa: E402

from omni_export.export.checkpoint import load_checkpoint  # noqa: E402
from omni_export.quantize.calibrate import Sources  # noqa: E402
from omni_export.quantize.engine import apply_dequantized, quantize_components, untie_heads  # noqa: E402
from omni_export.quantize.presets import DECODERS, ROWS8, W4_GPTQ, W4G32, by_role  # noqa: E402
from omni_export.quantize.recipe import QuantRecipe  # noqa: E402
from omni_export.quantize.sensitivity import _damage, _evaluator  # noqa: E402

VARIANTS = {
    "rtn, head reads the 8-bit table (int4)": QuantRecipe("rtn", (by_role(*DECODERS, config=W4G32),), embeddings=ROWS8),
    "gptq, head reads the 8-bit table": QuantRecipe("gptq", (by_role(*DECODERS, config=W4_GPTQ),), embeddings=ROWS8),
    "rtn, head with its own 4-bit codes": QuantRecipe("rtn-own", (by_role(*DECODERS, config=W4G32),), embeddings=ROWS8, tied_head="own"),
}


def damage(checkpoint: Path, recipe: QuantRecipe) -> dict:
    ck = load_checkpoint(checkpoint, dtype=torch.float32, components=["llm"])
    llm = ck.components["llm"].eval()
    evaluate = _evaluator(llm, Sources({"llm": llm}, ck.tokenizer))
    with torch.no_grad():
        ref = [r.clone() for r in evaluate()]
    t = time.perf_counter()
    res = quantize_components({"llm": llm}, recipe, "int4-methods", ck.tokenizer)
    seconds = time.perf_counter() - t
    if recipe.tied_head == "own":
        untie_heads({"llm": llm})
    apply_dequantized(llm, res, "llm.")
    with torch.no_grad():
        d = _damage(evaluate(), ref, True)
    return {"cosine": round(d.cosine, 4), "mean_kl": round(d.kl, 4), "quantize_s": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.txt")
    a = ap.parse_args()
    torch.set_num_threads(1)
    res = {name: damage(a.checkpoint, recipe) for name, recipe in VARIANTS.items()}
    from rich.table import Table

    t = Table(title=f"{a.checkpoint}: whole LLM at int4 g32, nothing promoted, against fp32 (held-out text)")
    for col in ("variant", "cosine", "mean KL", "quantize s"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for name, r in res.items():
        t.add_row(name, f"{r['cosine']:.4f}", f"{r['mean_kl']:.4f}", f"{r['quantize_s']:.0f}")
    publish(t, res, a.out)


if __name__ == "__main__":
    main()
