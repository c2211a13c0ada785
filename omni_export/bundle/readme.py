"""The bundle's README for the app team: what each file is, how to load it, the I/O contract, the
measured parity and build figures. Generated from the manifest and reports, so it cannot drift.
How to load a component is written once per backend (``LOADING``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omni_export.bundle.manifest import ComponentEntry, Manifest, TensorSpec
from omni_export.registry import Registry

# backend -> the README's loading section, from the manifest and the bundle's own files
LOADING: Registry[Callable[[Manifest, Path | None], list[str]]] = Registry("bundle README loading section")


def _shape(t: TensorSpec) -> str:
    return f"{t.name}: {t.dtype}[{', '.join(str(d) for d in t.shape)}]"


def _kv_component(m: Manifest) -> tuple[str, ComponentEntry] | None:
    return next(((n, c) for n, c in m.components.items() if c.kv_cache is not None), None)


@LOADING.decorator("executorch")
def _executorch(m: Manifest, root: Path | None = None) -> list[str]:
    llm = m.components.get("llm")
    data = next((f for f in llm.files if f.endswith(".ptd")), None) if llm else None
    step = llm.methods["prefill"].entry if llm and "prefill" in llm.methods else "prefill"
    return [
        "## Loading (ExecuTorch)",
        "",
        "```python",
        "from executorch.runtime import Runtime",
        *(["from omni_export.runtime_py.backends import et_options",
           f"et_options.apply({dict(m.profile.runtime.options)!r})  # process-wide, before loading (below)"]
          if m.profile.runtime.options else []),
        f"program = Runtime.get().load_program('artifacts/llm.pte'{f', data_path={data!r}' if data else ''})",
        *(["# its weights are in the .ptd beside it (the tied head and the embedding table share one copy)"] if data else []),
        "# Load every method before running any: prefill and decode share the KV cache (mutable buffers).",
        "methods = {n: program.load_method(n) for n in program.method_names}",
        "methods['reset_cache'].execute([])  # planned memory starts undefined: zero the cache first",
        "# logits: the last position's only [1, 1, vocab]; hidden: every position's [1, T, hidden]",
        f"logits, hidden = methods[{step!r}].execute([embeds, input_pos])  # prefill: T tokens",
        *([f"logits, hidden = methods[{step!r}].execute([embed_1, pos_1])  # decode: the same method at one token"]
          if step != "prefill" else []),
        "```",
        "",
        "On Android use the ExecuTorch `Module` API with the same method names; `reset_cache` starts a new conversation.",
        *([f"Prefill and decode are one method, `{step}`, whose token count is dynamic (1 to the prefill chunk): "
           "its weights are packed once and its activations planned once."] if step != "prefill" else []),
        *(["Set the profile's backend options (`profile.runtime.options` in `manifest.json`) before loading, with "
           "`executorch::runtime::set_option(backend, options)`: `XnnpackBackend.weight_cache_enabled` lets prefill and "
           "decode share one packing of each weight instead of one each (about the `.ptd`'s size saved)."]
          if m.profile.runtime.options else []),
        "",
    ]


@LOADING.decorator("onnxruntime")
def _onnxruntime(m: Manifest, root: Path | None = None) -> list[str]:
    found = _kv_component(m)
    name, c = found if found else ("llm", None)
    step = c.methods["prefill"].entry if c else "artifacts/llm/step.onnx"
    kv = c.kv_cache if c else None
    layers = kv.layers if kv else 0
    static = kv is not None and kv.in_place
    positions = str(kv.max_len) if static and kv else "0"
    shape = f"[1, {kv.kv_heads}, {{}}, {kv.head_dim}]" if kv else "[1, kv_heads, {}, head_dim]"
    threads = m.profile.runtime.threads or "all cores"
    outs = [t.name for t in c.methods["prefill"].outputs] if c else ["logits"]
    if static:
        contract = (f"each float32 {shape.format(positions)}); after its outputs come `present_key_0`, ... (`kv_cache.outputs`). "
                    "Allocate the caches once, zeroed, and bind each `past_*` buffer also as its `present_*` output: every call "
                    "writes its own positions (`input_pos`, consecutive from 0) into them in place, and nothing is copied. A new "
                    "conversation zeroes them (or simply starts again at position 0).")  # fmt: skip
        present_py = "for n, v in past.items(): io.bind_ortvalue_output(n.replace('past', 'present'), v)  # written in place"
        present_cpp = "for (size_t i = 0; i < past.size(); ++i) io.BindOutput(present_names[i].c_str(), past[i]);  // in place"
    else:
        contract = (f"each float32 {shape.format('positions')}); after its outputs come `present_key_0`, ... "
                    "(`kv_cache.outputs`), the same tensors with this call's positions appended. Start a conversation with 0 "
                    "positions and feed each call's `present_*` back as the next call's `past_*`.")  # fmt: skip
        present_py = "for n in past: io.bind_output(n.replace('past', 'present'), 'cpu')  # bind as the next past_*"
        present_cpp = "for (auto& n : present_names) io.BindOutput(n.c_str(), cpu);  // become the next past_*"
    return [
        "## Loading (ONNX Runtime)",
        "",
        "Each method is one ONNX graph (`entry` in `manifest.json`); a component's graphs share one external-data file, "
        "which must stay beside them. `prefill` and `decode` of a decoder stack are the same graph (`step`): its token count "
        "is dynamic (1 to the prefill chunk). The KV cache is passed explicitly: after the method's inputs come "
        f"`past_key_0`, `past_value_0`, ... (`kv_cache.inputs`, {2 * layers} tensors for {name}, " + contract + " "
        f"Open sessions with {threads} intra-op threads and full graph optimisation (the quantized linears become "
        "`MatMulNBits` at load). Decoder steps use ONNX Runtime's `com.microsoft.GroupQueryAttention` (in every "
        "standard ONNX Runtime package; a reduced-operator build must keep the contrib ops).",
        "",
        "Python:",
        "",
        "```python",
        "import numpy as np, onnxruntime as ort",
        "so = ort.SessionOptions(); so.intra_op_num_threads = 2",
        f"step = ort.InferenceSession('{step}', so)",
        f"past = {{f'past_{{k}}_{{i}}': ort.OrtValue.ortvalue_from_numpy(np.zeros({shape.format(positions)}, np.float32)) "
        f"for i in range({layers}) for k in ('key', 'value')}}",
        "io = step.io_binding()  # keeps the cache in ORT memory between steps",
        "io.bind_cpu_input('embeds', embeds); io.bind_cpu_input('input_pos', input_pos)",
        "for n, v in past.items(): io.bind_ortvalue_input(n, v)",
        f"for n in {outs!r}: io.bind_output(n, 'cpu')",
        present_py,
        "step.run_with_iobinding(io)",
        "logits = io.get_outputs()[0].numpy()  # the method's outputs first, in manifest order",
        "```",
        "",
        "C++ (`onnxruntime_cxx_api.h`):",
        "",
        "```cpp",
        "Ort::Env env; Ort::SessionOptions so; so.SetIntraOpNumThreads(2);",
        "so.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);",
        f'Ort::Session step(env, "{step}", so);',
        "Ort::IoBinding io(step);",
        'io.BindInput("embeds", embeds); io.BindInput("input_pos", pos);',
        "for (size_t i = 0; i < past.size(); ++i) io.BindInput(past_names[i].c_str(), past[i]);",
        "Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);",
        f"for (auto n : {{{', '.join(repr(o).replace(chr(39), chr(34)) for o in outs)}}}) io.BindOutput(n, cpu);",
        present_cpp,
        "step.Run(Ort::RunOptions{}, io);",
        "```",
        "",
        "C# (`Microsoft.ML.OnnxRuntime`): `new InferenceSession(path, new SessionOptions { IntraOpNumThreads = 2 })`, "
        "then `session.CreateIoBinding()`, `BindInput(name, OrtValue)`, "
        + ("`BindOutput(presentName, pastOrtValue)` for the cache" if static else "`BindOutputToDevice(name, OrtMemoryInfo.DefaultInstance)`")
        + ", `session.RunWithBinding(new RunOptions(), binding)` and `binding.GetOutputValues()`.",
        "",
        "Java (`ai.onnxruntime`): `env.createSession(path, opts)` with `opts.setIntraOpNumThreads(2)`; "
        "`session.run(Map<String, OnnxTensor>)` with the `past_*` tensors in the map, and the `present_*` results "
        "(`result.get(name)`) passed as the next call's `past_*` (Java has no I/O binding: the cache crosses the JNI boundary "
        "and is copied each call).",
        "",
    ]


@LOADING.decorator("coreml")
def _coreml(m: Manifest, root: Path | None = None) -> list[str]:
    units = m.profile.runtime.compute_units or "ALL"
    rows = []
    for name, c in m.components.items():
        for method, e in c.methods.items():
            package, _, function = e.entry.rpartition("#")
            shapes = "; ".join(_shape(t) for t in e.inputs) + " -> " + "; ".join(_shape(t) for t in e.outputs)
            sizes = "; ".join(f"{d} in {list(v)}" for d, v in e.enumerated.items())
            where = f"{e.compute_units} ({e.compute_units_reason})" if e.compute_units else units
            state = "KV state" if c.kv_cache is not None and method in c.kv_cache.methods else ""
            rows.append(f"| `{package}` | `{function}` | {shapes} | {sizes or '-'} | {state or '-'} | {where} |")
    found = _kv_component(m)
    llm, c = found if found else ("llm", None)
    kv = c.kv_cache if c else None
    pkg = (c.methods["prefill"].entry.rpartition("#")[0] if c else "artifacts/llm/llm.mlpackage").rpartition("/")[2]
    sizes = list(c.methods["prefill"].enumerated.get("tokens", ())) if c else []
    rate_in, rate_out = m.model.get("audio_sample_rate", 16000), m.model.get("output_sample_rate", 24000)
    enc = next((n for n, x in m.components.items() if x.role == "encoder" and "audio" in n), "audio_encoder")
    voc = next((n for n, x in m.components.items() if x.role == "vocoder"), "vocoder")
    speech = [n for n, x in m.components.items() if x.role in ("decoder", "acoustic") and n != llm]
    stateful = next((n for n in speech if m.components[n].kv_cache is not None), None)
    return [
        "## Loading (Core ML: iOS 18 / macOS 15)",
        "",
        "Each component is one ML Program package (`.mlpackage`, compile it into the app or with `MLModel.compileModel(at:)`); "
        "each method is a *function* of it, loaded with `MLModelConfiguration.functionName`. Functions of one package share "
        "their weights. Inputs and outputs are float32 (the model computes in fp16, with the layers measured to need fp32 "
        "kept in fp32); int64 ids and positions are Int32 MLMultiArrays, and a scalar is a one-element array. "
        f"Compute units: `{units}` (this profile) unless the table says otherwise.",
        "",
        "| package | function | I/O | enumerated sizes | state | compute units |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"**KV cache.** `prefill` and `decode` of {llm} read and write one Core ML state "
        + (f"({2 * kv.layers} fp16 tensors [1, {kv.kv_heads}, {kv.max_len}, {kv.head_dim}], K and V per layer) " if kv else "")
        + "that both functions share: make it once per conversation with `model.makeState()` from the `decode` function's "
        "model and pass the same `MLState` to every `prefill` and `decode` call; a new conversation is a new state (nothing to "
        "zero). Positions (`input_pos`) are consecutive from 0, and a call must not go past the cache's length. "
        + (f"`prefill` takes exactly {sizes} tokens (enumerated shapes, so it runs on the Neural Engine): split a prompt into "
           "the largest of these that fit and send the remainder through `decode` one token at a time; never pad." if sizes else ""),
        "",
        f"**Audio.** Microphone audio goes in at {rate_in} Hz mono float32 in [-1, 1] (resample first); speech comes out at "
        f"{rate_out} Hz from `{voc}`.",
        "",
        "One spoken turn in Swift (error handling left out; names as in the table):",
        "",
        "```swift",
        "import CoreML",
        "",
        "func load(_ url: URL, _ function: String, _ units: MLComputeUnits = .cpuAndNeuralEngine) throws -> MLModel {",
        "    let config = MLModelConfiguration()",
        "    config.functionName = function",
        "    config.computeUnits = units",
        "    return try MLModel(contentsOf: url, configuration: config)  // a compiled .mlmodelc URL",
        "}",
        "func features(_ dict: [String: MLMultiArray]) throws -> MLFeatureProvider {",
        "    try MLDictionaryFeatureProvider(dictionary: dict.mapValues { MLFeatureValue(multiArray: $0) })",
        "}",
        "",
        f'let prefill = try load({llm}URL, "prefill"), decode = try load({llm}URL, "decode")  // {pkg}',
        "let state = decode.makeState()  // one per conversation, shared by prefill and decode",
        f"// 1. audio -> features -> tokens ({enc}); splice them into the prompt's embeddings at the audio placeholders",
        "// 2. prefill the prompt in enumerated chunks, all with the same state",
        'var out = try prefill.prediction(from: features(["embeds": chunk, "input_pos": positions]), using: state)',
        "// 3. decode: one token per call until an end-of-turn id, the same state",
        'out = try decode.prediction(from: features(["embeds": next, "input_pos": position]), using: state)',
        *([f"// 4. speech: {', '.join(speech)} ({f'its own state: `{stateful}`' + chr(39) + 's decode.makeState()' if stateful else 'no state'}) on each chunk of the text's",
           f"//    hidden states, then `{voc}`: {rate_out} Hz samples to play while the text goes on decoding"] if speech else []),
        "```",
        "",
    ]


def _tied(q, table: str) -> str:  # type: ignore[no-untyped-def]
    heads = [h for h, t in q.tied_heads.items() if t == table]
    if not heads:
        return "none (or its own codes, as the recipe's linears)"
    return f"`{heads[0]}` reads the same codes: " + ("stored once" if q.stored_once else "a second copy (this target cannot share it)")


def render(manifest: Manifest, parity: list[dict[str, Any]], root: Path | None = None) -> str:
    m = manifest
    lines = [
        f"# {m.family} bundle for {m.profile.name}",
        "",
        f"{m.profile.description}. Target `{m.profile.target}`, recipe `{m.quant.recipe}`, "
        f"max context {m.profile.max_context} tokens. Built by omni-export {m.toolchain['omni_export']} "
        f"from a checkpoint with fingerprint `{m.source.fingerprint[:16]}...`.",
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
        "| `manifest.schema.json` | the JSON Schema of `manifest.json` |",
    ]
    for name, c in m.components.items():
        files = ", ".join(f"`{f}`" for f in c.files)
        lines.append(f"| {files} | {name} ({c.role}): {c.description} ({c.backend}, {c.precision}, methods {', '.join(c.methods)}) |")
    lines += [
        "| `tokenizer/` | byte-level BPE tokenizer (`tokenizer.json`, Hugging Face tokenizers format) |",
        "| `golden/COMPONENT.npz` | golden inputs and eager reference outputs (fp32 and fp16), call by call |",
        "| `assets/*.npy` | arrays the runtime needs beside the weights (default voice) |",
        *(["| `assets/*.onnx` | files the release ships that the runtime runs as they are (the speaker encoder for `--voice`, ONNX Runtime) |"]
          if m.model.get("asset_files") else []),
        "| `reports/parity.json`, `reports/build.json` | parity metrics per component and output; build times, sizes, delegation |",
        "| `reports/quant.json` | quantized bundles: every quantized layer's method, bits, group and weight/output error |",
        "",
    ]
    for backend in dict.fromkeys(c.backend for c in m.components.values()):
        if backend in LOADING:
            lines += LOADING.get(backend)(m, root)
    quantized = {n: c.quant for n, c in m.components.items() if c.quant}
    if quantized:
        lines += ["## Quantization", "", f"Recipe `{m.quant.recipe}`. Unquantized tensors are {m.quant.float_dtype}.", "",
                  "| component | precision class | quantized linears | kinds | weight bytes | activations |",
                  "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for n, q in quantized.items():
            kinds = ", ".join(f"{k} x{v}" for k, v in q.kinds.items())
            lines.append(f"| {n} | {m.components[n].precision} | {q.linears} | {kinds} | {q.weight_bytes / 1e6:.2f} MB | {q.activations} |")
        lines.append("")
        tables = [(n, path, kind, _tied(q, path)) for n, q in quantized.items() for path, kind in q.tables.items()]
        if tables:
            lines += ["Embedding tables are stored quantized: a call gathers its token rows and scales only those.", "",
                      "| component | table | stored as | tied head |", "| --- | --- | --- | --- |",
                      *(f"| {n} | `{path}` | {kind} | {tied} |" for n, path, kind, tied in tables), ""]  # fmt: skip
    lines += ["## I/O contract", ""]
    for name, c in m.components.items():
        lines += [f"### {name}", ""]
        for meth, io in c.methods.items():
            ins = "; ".join(_shape(t) for t in io.inputs)
            outs = "; ".join(_shape(t) for t in io.outputs)
            lines.append(f"- `{meth}({ins})` -> `{outs}` (runs `{io.entry}`)")
        kv = c.kv_cache
        if kv is not None:
            lines.append(f"- KV cache: {kv.layers} layers x {kv.kv_heads} heads x {kv.max_len} positions x {kv.head_dim}, "
                         f"{kv.dtype}, held as {kv.held_as}, axes {list(kv.axes)}"
                         + (f"; inputs `{kv.inputs[0]}` ... `{kv.inputs[-1]}`, outputs `{kv.outputs[0]}` ... `{kv.outputs[-1]}`" if kv.inputs else ""))  # fmt: skip
        lines.append("")
    lines += ["## Measured parity (vs the eager reference)", "",
              "| component | replayed on | gate | worst cosine | worst PSNR dB | LLM top-1 | max KL | result |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for p in parity:
        rows = [r for r in p["results"] if r["reference"] == p["gate_reference"]]
        if not rows:
            lines.append(f"| {p['component']} | - | vs {p['gate_reference']} | - | - | - | - | {p['status']}: {p['not_run']} |")
            continue
        cos = min(r["cosine"] for r in rows)
        ps = min(r["psnr"] for r in rows)
        tops = [r["top1"] for r in rows if r["top1"] is not None]
        kls = [r["kl"] for r in rows if r["kl"] is not None]
        lines.append(f"| {p['component']} | {p['backend']} | vs {p['gate_reference']} | {cos:.6f} | {ps:.1f} | "
                     f"{min(tops) if tops else '-'} | {f'{max(kls):.2e}' if kls else '-'} | {p['status']} |")  # fmt: skip
    lines += ["", "The fp16 figures are in `reports/parity.json` beside the gate's.", "", "## Runtime settings", "", "```json",
              json.dumps(m.model, indent=2), "```", ""]  # fmt: skip
    return "\n".join(lines)
