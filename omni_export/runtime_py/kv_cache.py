"""A decoder stack and its KV cache, whichever way the backend holds the cache.

*Stateful* sessions (ExecuTorch mutable buffers, Core ML states, the eager reference) keep the
cache inside the artifact: ``reset`` zeroes it and each call writes at its positions. *Explicit*
sessions (ONNX Runtime, TensorRT) take the cache as trailing inputs and return the updated cache
as trailing outputs, 2 tensors (K, V) per layer shaped by the manifest's ``kv_cache`` entry
(``shape``, or [1, max_len, kv_heads, head_dim]).
``KVStack`` hides the difference and owns the one number both need: how many positions are
filled."""

from __future__ import annotations

from typing import Any

import torch

from omni_export.errors import ContextOverflowError
from omni_export.runtime_py.backends.base import Session

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class KVStack:
    def __init__(self, name: str, session: Session, prefill_chunk: int, max_len: int, kv: dict[str, Any] | None = None) -> None:
        self.name, self.session, self.chunk, self.max_len, self.kv = name, session, prefill_chunk, max_len, kv or {}
        self.position = 0
        self._cache: list[torch.Tensor] = []

    def reset(self) -> None:
        self.position = 0
        if self.session.stateful:
            self.session.reset()
        else:
            shape = tuple(self.kv.get("shape") or (1, self.kv["max_len"], self.kv["kv_heads"], self.kv["head_dim"]))
            dtype = _DTYPES[self.kv.get("dtype", "float32")]
            self._cache = [torch.zeros(shape, dtype=dtype) for _ in range(2 * self.kv["layers"])]

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
            out = self._call("decode" if part.shape[1] == 1 else "prefill", part)
        return out

    def _call(self, method: str, part: torch.Tensor) -> list[torch.Tensor]:
        pos = torch.arange(self.position, self.position + part.shape[1])
        if self.session.stateful:
            out = self.session.run(method, [part, pos])
        else:
            res = self.session.run(method, [part, pos, *self._cache])
            out, self._cache = res[: len(res) - len(self._cache)], res[len(res) - len(self._cache) :]
        self.position += part.shape[1]
        return out
