"""A decoder stack and its KV cache, whichever way the backend holds the cache.

*Stateful* sessions (ExecuTorch mutable buffers, Core ML states, the eager reference) keep the
cache inside the artifact: ``reset`` zeroes it and each call writes at its positions. *Explicit*
sessions (ONNX Runtime, TensorRT) take the cache after the method's inputs and return the grown
cache after its outputs (the manifest's ``kv_cache`` names them); the session keeps the tensors
in its own memory and hands ``KVStack`` an opaque value. ``KVStack`` hides the difference and owns
the one number both need: how many positions are filled."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from omni_export.errors import ContextOverflowError
from omni_export.runtime_py.backends.base import Session


class KVStack:
    def __init__(self, name: str, session: Session, prefill_chunk: int, max_len: int, methods: Sequence[str] = ("prefill", "decode")) -> None:
        self.name, self.session, self.chunk, self.max_len = name, session, prefill_chunk, max_len
        self.methods = tuple(methods)
        self.position = 0
        self._cache: Any = None

    def reset(self) -> None:
        self.position = 0
        if self.session.stateful:
            self.session.reset()
        else:
            # Let the old cache go before the new one is made: both alive at once would set the
            # backend arena's high-water mark at two caches (a 100-turn soak showed +87 MB at the reset).
            self._cache = None
            self._cache = self.session.new_cache()

    @property
    def free(self) -> int:
        return self.max_len - self.position

    def feed(self, embeds: torch.Tensor) -> list[torch.Tensor]:
        """Append ``embeds`` [1, T, H] at the next positions: prefill in chunks of the traced size,
        decode for a single token. Returns the last call's outputs (logits first)."""
        n = embeds.shape[1]
        if n > self.free:
            raise ContextOverflowError(
                f"{self.name}: {n} more positions do not fit its KV cache ({self.position} of {self.max_len} filled); "
                "start a new conversation or shorten the input."
            )
        out: list[torch.Tensor] = []
        for i in range(0, n, self.chunk):
            part = embeds[:, i : i + self.chunk]
            pos = torch.arange(self.position, self.position + part.shape[1])
            out = self.call("decode" if part.shape[1] == 1 else "prefill", [part, pos])
        return out

    def call(self, method: str, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One cached call with explicit positions (inputs[1]); the filled length follows them."""
        if self.session.stateful:
            out = self.session.run(method, inputs)
        else:
            if self._cache is None:
                self._cache = self.session.new_cache()
            out, self._cache = self.session.run_cached(method, inputs, self._cache)
        self.position = int(inputs[1][-1]) + 1
        return out

    @property
    def holds_cache(self) -> bool:
        """An explicit session's cache has been handed to this stack."""
        return self._cache is not None
