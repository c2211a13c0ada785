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

from omni_export.export.components.qwen import QwenConfig, QwenModel

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
        """'Need more text' token of the bistream mode."""
        return self.speech_vocab + 1

    @property
    def out_vocab(self) -> int:
        return self.speech_vocab + 3


class SpeechLM(nn.Module):
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

    def embed_special(self, which: int) -> torch.Tensor:
        return self.llm_embedding.weight[which][None, None]

    def forward(self, inputs_embeds: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """[1, T, H] at positions [T] -> speech logits [1, T, out_vocab] (KV cache updated)."""
        return self.llm_decoder(self.llm(inputs_embeds, input_pos))
