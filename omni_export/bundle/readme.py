"""The bundle's README for the app team: what each file is, how to load it, the I/O contract, the
measured parity and build figures. Generated from the manifest and reports, so it cannot drift."""

from __future__ import annotations

from typing import Any


def _shape(t: dict[str, Any]) -> str:
    return f"{t['name']}: {t['dtype']}[{', '.join(str(d) for d in t['shape'])}]"


def render(manifest: dict[str, Any], parity: list[dict[str, Any]]) -> str:
    m = manifest
    lines = [
        f"# {m['family']} bundle for {m['profile']['name']}",
        "",
        f"{m['profile']['description']}. Target `{m['profile']['target']}`, precision `{m['quant']['preset']}`, "
        f"max context {m['profile']['max_context']} tokens. Built by omni-export {m['toolchain']['omni_export']} "
        f"from a checkpoint with fingerprint `{m['source']['fingerprint'][:16]}...`.",
        "",
        "Check it before use: `omni-export verify .` (every file's sha256 against `manifest.json`). "
        "Re-check numerics on any host with the backend: `omni-export parity .`. "
        "Talk to it as the app will (audio streamed in chunks, speech out while the text decodes, multi-turn): "
        "`omni-export run . --audio question.wav --out reply.wav`; measure it on the device: "
        "`omni-export profile . --device ssh://user@device`.",
        "",
        "## Files",
        "",
        "| file | what it is |",
        "| --- | --- |",
        "| `manifest.json` | everything the runtime needs: components, methods and their I/O, ids, rates, KV layout, hashes |",
    ]
    for name, c in m["components"].items():
        lines.append(f"| `{c['file']}` | {name}: {c.get('description', '')} ({c['backend']}, methods {', '.join(c['methods'])}) |")
    lines += [
        "| `tokenizer/` | byte-level BPE tokenizer (`tokenizer.json`, Hugging Face tokenizers format) |",
        "| `golden/COMPONENT.npz` | golden inputs and eager reference outputs (fp32 and fp16), call by call |",
        "| `assets/*.npy` | arrays the runtime needs beside the weights (default voice) |",
        "| `reports/parity.json`, `reports/build.json` | parity metrics per component and output; build times, sizes, delegation |",
        "| `reports/quant.json` | quantized bundles: every quantized layer's method, bits, group and weight/output error |",
        "",
        "## Loading (ExecuTorch, Python)",
        "",
        "```python",
        "from executorch.runtime import Runtime",
        "program = Runtime.get().load_program('artifacts/llm.pte')",
        "# Load every method before running any: prefill and decode share the KV cache (mutable buffers).",
        "methods = {n: program.load_method(n) for n in program.method_names}",
        "logits, hidden = methods['prefill'].execute([embeds, input_pos])",
        "```",
        "",
        "On Android use the ExecuTorch `Module` API with the same method names. Reset a conversation by reloading the program.",
        "",
    ]
    quantized = {n: c["quant"] for n, c in m["components"].items() if c.get("quant")}
    if quantized:
        lines += ["## Quantization", "", f"Recipe `{m['quant']['requested']}`. Unquantized tensors are fp32.", "",
                  "| component | quantized linears | kinds | weight bytes | activations |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
        for n, q in quantized.items():
            kinds = ", ".join(f"{k} x{v}" for k, v in q["kinds"].items())
            lines.append(f"| {n} | {q['linears']} | {kinds} | {q['weight_bytes'] / 1e6:.2f} MB | {q['activations']} |")
        lines.append("")
    lines += [
        "## I/O contract",
        "",
    ]
    for name, c in m["components"].items():
        lines.append(f"### {name}")
        lines.append("")
        for meth, io in c["methods"].items():
            ins = "; ".join(_shape(t) for t in io["inputs"])
            outs = "; ".join(_shape(t) for t in io["outputs"])
            lines.append(f"- `{meth}({ins})` -> `{outs}`")
        if c.get("kv_cache"):
            kv = c["kv_cache"]
            lines.append(f"- KV cache: {kv['layers']} layers x {kv['kv_heads']} heads x {kv['max_len']} positions x {kv['head_dim']}, "
                         f"{kv['dtype']}, held as {kv['held_as']}")  # fmt: skip
        lines.append("")
    lines += ["## Measured parity (vs the eager reference)", "", "| component | gate | worst cosine | worst PSNR dB | LLM top-1 | max KL | result |",
              "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for p in parity:
        rows = [r for r in p["results"] if r["reference"] == p["gate_reference"]]
        cos = min(r["cosine"] for r in rows)
        ps = min(r["psnr"] for r in rows)
        tops = [r["top1"] for r in rows if r["top1"] is not None]
        kls = [r["kl"] for r in rows if r["kl"] is not None]
        lines.append(f"| {p['component']} | vs {p['gate_reference']} | {cos:.6f} | {ps:.1f} | "
                     f"{min(tops) if tops else '-'} | {f'{max(kls):.2e}' if kls else '-'} | {'pass' if p['passed'] else 'FAIL'} |")  # fmt: skip
    lines += ["", "The fp16 figures are in `reports/parity.json` beside the gate's.", "", "## Runtime settings", "", "```json"]
    import json

    lines += [json.dumps(m["model"], indent=2), "```", ""]
    return "\n".join(lines)
