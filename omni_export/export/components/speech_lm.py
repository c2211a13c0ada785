"""CosyVoice2-style speech-token LM for InteractiveOmni.

A Qwen2-architecture decoder over 6561 FSQ speech codes plus specials. It is fed the LLM's
text-side hidden states (projected to its width) interleaved with its own speech tokens:
[sos] T*N S*M T*N S*M ... [task] S... (N text states, then M speech tokens; after the text ends,
speech runs to end-of-speech). Positions run through one KV cache, so it streams.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from omni_export.export.components.base import Component, Role
from omni_export.export.components.qwen import QwenConfig, QwenModel
from omni_export.export.trace_specs import F32, I64, Call, DecoderStep, MethodSpec, Tensor, dim, dtype_of, lm_steps

SOS, TASK = 0, 1  # rows of llm_embedding


@dataclass(frozen=True)
class SpeechLMConfig:
    llm: QwenConfig
    text_dim: int
    speech_vocab: int = 6561
    text_chunk: int = 5
    speech_chunk: int = 15
    max_speech_per_text: int = 20

    @property
    def eos(self) -> int:
        return self.speech_vocab

    @property
    def fill(self) -> int:
        """'Need more text' token of the bistream mode: CosyVoice2's fill_token (speech_vocab + 2;
        speech_vocab + 1 is unused at inference)."""
        return self.speech_vocab + 2

    @property
    def out_vocab(self) -> int:
        return self.speech_vocab + 3


class SpeechLM(Component, nn.Module):
    role = Role.DECODER

    def __init__(self, cfg: SpeechLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.llm.hidden_size
        self.text_projector = nn.Linear(cfg.text_dim, h)
        self.llm_embedding = nn.Embedding(2, h)
        self.speech_embedding = nn.Embedding(cfg.out_vocab, h)
        self.llm = QwenModel(cfg.llm, with_embeddings=False)
        self.llm_decoder = nn.Linear(h, cfg.out_vocab)

    def embed_text(self, text_states: torch.Tensor) -> torch.Tensor:
        return self.text_projector(text_states)

    def embed_speech(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.speech_embedding(tokens)

    def hidden(self, inputs_embeds: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.llm(inputs_embeds, input_pos)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm_decoder(hidden)

    def forward(self, inputs_embeds: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """[1, T, H] at positions [T] -> speech logits [1, T, out_vocab] (KV cache updated)."""
        return self.logits(self.hidden(inputs_embeds, input_pos))

    # -- as a component ---------------------------------------------------------------------
    def export_methods(self, limits):  # type: ignore[no-untyped-def]
        c = self.cfg
        h = c.llm.hidden_size
        ids = dim("ids", 1, limits.max_context)
        text = dim("text", 1, limits.max_text_chunk)
        outs = lambda n: (Tensor("logits", F32, (1, 1, c.out_vocab)),)  # noqa: E731
        return [
            MethodSpec("embed_text", Call(self, "embed_text"), (torch.randn(1, 5, c.text_dim, dtype=dtype_of(self)),), ({1: text},),
                       (Tensor("text_states", F32, (1, "text", c.text_dim)),), (Tensor("embeds", F32, (1, "text", h)),)),
            MethodSpec("embed_speech", Call(self, "embed_speech"), (torch.tensor([[1, 2]]),), ({1: ids},),
                       (Tensor("ids", I64, (1, "ids")),), (Tensor("embeds", F32, (1, "ids", h)),)),
            MethodSpec("embed_special", Call(self, "llm_embedding"), (torch.tensor([[0]]),), None,
                       (Tensor("which", I64, (1, 1)),), (Tensor("embeds", F32, (1, 1, h)),)),
            *lm_steps(DecoderStep(self), h, outs, limits, dtype_of(self)),
        ]  # fmt: skip

    def golden_script(self, ctx, ref):  # type: ignore[no-untyped-def]
        """sos, a chunk of text states and a few speech tokens, then 16 teacher-forced steps."""
        from omni_export.export.golden import teacher_forced

        g = torch.Generator().manual_seed(ctx.seed)
        c = self.cfg
        text = torch.randn(1, c.text_chunk, c.text_dim, generator=g)
        speech = torch.randint(0, c.speech_vocab, (1, 4), generator=g)
        sos = ref.run("embed_special", (torch.tensor([[0]]),))[0]
        prefix = torch.cat([sos, ref.run("embed_text", (text,))[0], ref.run("embed_speech", (speech,))[0]], 1)
        steps = min(16, ctx.limits.max_context - prefix.shape[1])
        script = teacher_forced(ref, prefix, lambda t: ref.run("embed_speech", (torch.tensor([[t]]),))[0], c.speech_vocab, steps)
        return [("embed_special", (torch.tensor([[0]]),)), ("embed_text", (text,)), ("embed_speech", (speech,)), *script]
