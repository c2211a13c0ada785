"""Peer toolchains run on the same weights as ours (shared/research/peer-baseline-cpu.md says how
each was installed and run here): onnxruntime-genai's model builder, fed the checkpoint's LLM in
transformers' own layout."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from omni_export.export.checkpoint import load_checkpoint


def hf_llm(checkpoint: Path, out: Path) -> Path:
    """The checkpoint's LLM as a transformers Qwen2/Qwen3 directory (config.json, safetensors,
    tokenizer): the input every peer's builder takes."""
    if (out / "model.safetensors").is_file():
        return out
    ck = load_checkpoint(checkpoint, dtype=torch.float32, components=["llm"])
    llm = ck.components["llm"]
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in llm.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = llm.cfg.to_hf()
    ids = ck.special_ids
    config.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], torch_dtype="bfloat16")
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": ids["<|im_end|>"], "do_sample": False}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(checkpoint) / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def ort_genai_build(hf_dir: Path, out: Path, threads: int = 2) -> tuple[Path, float]:
    """onnxruntime-genai's builder at int4, block 32, accuracy level 4 (its CPU defaults), with
    the decoder session set to ``threads`` intra-op threads (its default picked 1 on this VM).
    Returns the model directory and the build's wall seconds (0 when cached)."""
    if (out / "genai_config.json").is_file():
        return out, 0.0
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out), "-p", "int4",
                    "-e", "cpu", "-c", str(out.with_name(out.name + "-cache")), "--extra_options", "block_size=32", "accuracy_level=4"],
                   check=True, capture_output=True, text=True)  # fmt: skip
    seconds = time.perf_counter() - t
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    cfg_path.write_text(json.dumps(cfg, indent=1))
    return out, seconds


def ort_genai_speed(model_dir: Path, prompt: list[int], n_tokens: int) -> tuple[float, float, list[int]]:
    """(prefill tok/s, decode tok/s, tokens) with the Generator API, as the peer baseline measured
    it: prefill is append_tokens(prompt); decode is the next n_tokens generate_next_token calls
    after the one that only samples the prefill's logits."""
    import onnxruntime_genai as og

    model = _OG_MODELS.get(model_dir) or _OG_MODELS.setdefault(model_dir, og.Model(str(model_dir)))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n_tokens + 1, min_length=len(prompt) + n_tokens + 1, do_sample=False)
    gen = og.Generator(model, params)
    t = time.perf_counter()
    gen.append_tokens(prompt)
    prefill_s = time.perf_counter() - t
    gen.generate_next_token()
    tokens = [int(gen.get_next_tokens()[0])]
    t = time.perf_counter()
    for _ in range(n_tokens):
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return len(prompt) / prefill_s, n_tokens / (time.perf_counter() - t), tokens


_OG_MODELS: dict = {}
