"""One turn of a conversation, driven through Sessions: preprocess -> encoders -> LLM prefill (in
chunks) and decode with the KV cache -> speech decoder -> 24 kHz PCM. Everything it needs comes
from the manifest; the same code drives a bundle's ExecuTorch artifacts and a checkpoint's eager
modules. (Non-streaming: the streaming, multi-turn Pipeline builds on these pieces.)"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omni_export.errors import ContextOverflowError, InputError
from omni_export.runtime_py.audio import pad_to_multiple, read_audio
from omni_export.runtime_py.backends.base import Session
from omni_export.runtime_py.image import preprocess_image
from omni_export.runtime_py.prompt import chat_prompt, merge_placeholders, user_turn
from omni_export.runtime_py.sampler import sample
from omni_export.runtime_py.speech import SPEECH


@dataclass
class Reply:
    text: str
    token_ids: list[int]
    audio: np.ndarray
    sample_rate: int
    prompt_tokens: int
    timings_ms: dict[str, float] = field(default_factory=dict)


class Pipeline:
    def __init__(self, sessions: dict[str, Session], components: dict[str, Any], config: dict[str, Any],
                 tokenizer: Any, assets: dict[str, np.ndarray]) -> None:  # fmt: skip
        self.sessions, self.components, self.config = sessions, components, config
        self.tokenizer, self.assets = tokenizer, assets
        self.timings: dict[str, float] = {}

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_bundle(cls, path: str | Path) -> Pipeline:
        """Open a bundle; it must pass verify (a bundle that does not match its manifest is refused)."""
        from tokenizers import Tokenizer

        from omni_export.bundle import read_manifest, verify_bundle
        from omni_export.bundle.manifest import BundleError
        from omni_export.runtime_py.backends import open_session

        path = Path(path)
        problems = verify_bundle(path)
        if problems:
            raise BundleError(f"{path} fails verify ({len(problems)} problem(s)): " + "; ".join(problems[:5]))
        m = read_manifest(path)
        sessions = {name: open_session(c["backend"], path / c["file"]) for name, c in m["components"].items()}
        assets = {k: np.load(path / rel) for k, rel in m["model"].get("assets", {}).items()}
        return cls(sessions, m["components"], m["model"], Tokenizer.from_file(str(path / "tokenizer" / "tokenizer.json")), assets)

    # -- helpers --------------------------------------------------------------------------------
    def _time(self, name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        out = fn()
        self.timings[name] = self.timings.get(name, 0.0) + (time.perf_counter() - t) * 1000
        return out

    def feed(self, component: str, embeds: torch.Tensor, start: int) -> list[torch.Tensor]:
        """Run embeddings through a cached stack at positions start.. : prefill in chunks of the
        traced size, decode for single tokens. Returns the last call's outputs."""
        session, chunk = self.sessions[component], self.config["prefill_chunk"]
        out: list[torch.Tensor] = []
        for i in range(0, embeds.shape[1], chunk):
            part = embeds[:, i : i + chunk]
            pos = torch.arange(start + i, start + i + part.shape[1])
            out = session.run("decode" if part.shape[1] == 1 else "prefill", [part, pos])
        return out

    def _axis(self, component: str, method: str, name: str, dim: str) -> int:
        shape = next(t["shape"] for t in self.components[component]["methods"][method]["inputs"] if t["name"] == name)
        return shape.index(dim)

    # -- encoders -------------------------------------------------------------------------------
    def encode_audio(self, wav: np.ndarray) -> torch.Tensor:
        """16 kHz mono -> LLM-width audio tokens [N, H]."""
        feats = self.sessions["audio_frontend"].run("forward", [torch.from_numpy(np.asarray(wav, dtype=np.float32))])[0]
        axis = self._axis("audio_encoder", "forward", "features", "frames")
        feats = pad_to_multiple(feats, axis, self.config.get("audio_frames_multiple", 1))  # whole strides only
        window = self.config.get("max_audio_frames") or feats.shape[axis]
        parts = [self.sessions["audio_encoder"].run("forward", [w.contiguous()])[0][0] for w in feats.split(window, dim=axis)]
        return torch.cat(parts)

    def encode_image(self, image: str | Path) -> torch.Tensor:
        cfg = self.config["image"]
        tiles = preprocess_image(image, cfg["tile_size"], cfg["max_tiles"])
        return self.sessions["vision_encoder"].run("forward", [torch.from_numpy(tiles)])[0]

    # -- one turn -------------------------------------------------------------------------------
    @torch.inference_mode()
    def respond(self, audio: str | Path | np.ndarray | None = None, image: str | Path | None = None, text: str | None = None,
                max_new_tokens: int = 32, top_k: int = 1, seed: int = 0, speech: bool = True) -> Reply:  # fmt: skip
        if audio is None and image is None and not text:
            raise InputError("nothing to answer: give audio, an image or text")
        cfg, self.timings = self.config, {}
        wav = read_audio(audio, cfg["audio_sample_rate"]) if isinstance(audio, (str, Path)) else audio
        audio_tok = None if wav is None else self._time("audio_encoder", lambda: self.encode_audio(wav))
        image_tok = None if image is None else self._time("vision_encoder", lambda: self.encode_image(image))
        p = cfg["prompt"]
        user = user_turn(p, 0 if image_tok is None else image_tok.shape[0], 0 if audio_tok is None else audio_tok.shape[0],
                         text, p["image_token"], p["audio_token"])  # fmt: skip
        ids = self.tokenizer.encode(chat_prompt(user, p["system"]), add_special_tokens=False).ids
        if len(ids) + max_new_tokens > cfg["max_context"]:
            raise ContextOverflowError(
                f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds the context of {cfg['max_context']}; "
                "shorten the audio, use fewer image tiles or lower --max-new-tokens."
            )
        llm = self.sessions["llm"]
        llm.reset()
        ids_t = torch.tensor([ids])
        embeds = llm.run("embed", [ids_t])[0]
        for feats, token_id in ((image_tok, cfg["image_token_id"]), (audio_tok, cfg["audio_token_id"])):
            if feats is not None:
                embeds = merge_placeholders(embeds, ids_t, feats, token_id)
        logits = self._time("llm_prefill", lambda: self.feed("llm", embeds, 0))[0]
        gen = torch.Generator().manual_seed(seed)
        out_ids: list[int] = []
        states: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            tok = sample(logits[0, -1], top_k, gen)
            if tok in cfg["eos_ids"]:
                break
            out_ids.append(tok)
            step = lambda t=tok: llm.run("decode", [llm.run("embed", [torch.tensor([[t]])])[0], torch.tensor([len(ids) + len(out_ids) - 1])])  # noqa: E731
            logits, hidden = self._time("llm_decode", step)
            states.append(hidden)
        text_out = self.tokenizer.decode(out_ids, skip_special_tokens=True)
        pcm = np.zeros(0, dtype=np.float32)
        if speech and out_ids:
            decoder = SPEECH.get(cfg["speech"]["kind"])
            pcm = self._time("speech", lambda: decoder(self, torch.tensor([out_ids]), torch.cat(states, dim=1), seed))
        return Reply(text_out, out_ids, np.asarray(pcm, dtype=np.float32), cfg["output_sample_rate"], len(ids), dict(self.timings))
