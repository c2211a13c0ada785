"""A checkpoint kept as stored (bf16, memory-mapped) gives the same references as an fp32 copy,
holds no copy of its weights afterwards, and hands its pages back on request."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from omni_export.export.checkpoint import load_checkpoint
from omni_export.export.golden import Context, make_golden
from omni_export.export.safetensors_io import release_pages
from omni_export.export.trace_specs import Limits
from omni_export.export.widen import computing_in


@pytest.mark.parametrize("name", ["llm", "audio_encoder", "vision_encoder", "vocoder"])
def test_references_from_the_stored_weights_equal_an_fp32_copys(tiny_dirs, name):
    stored = load_checkpoint(tiny_dirs["interactiveomni"], components=[name])
    wide = load_checkpoint(tiny_dirs["interactiveomni"], dtype=torch.float32, components=[name])
    module = stored.components[name]
    before = {k: (t.dtype, t.data_ptr()) for k, t in module.state_dict().items()}
    assert {d for d, _ in before.values()} == {torch.bfloat16}
    ctx = Context(stored.tokenizer, Limits(max_context=128, prefill_chunk=64))
    got, _, _, _ = make_golden(module, ctx)
    # the old way: the whole component in fp32, and an fp16 copy of it beside
    want, _, _, _ = make_golden(wide.components[name], ctx)
    assert len(got) == len(want) > 0
    for g, w in zip(got, want, strict=True):
        for ref in ("fp32", "fp16"):
            for key, arr in w.outputs[ref].items():
                assert np.array_equal(g.outputs[ref][key], arr), (name, g.method, ref, key)
    # the module still holds the checkpoint's own tensors, in their stored type
    assert {k: (t.dtype, t.data_ptr()) for k, t in module.state_dict().items()} == before


def test_computing_in_puts_everything_back_when_a_call_raises():
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.norm = nn.Linear(4, 4).bfloat16(), nn.LayerNorm(4).bfloat16()

        def forward(self, x):  # type: ignore[no-untyped-def]
            self.lin(x)
            raise RuntimeError("halfway")

    m = Boom()
    params = dict(m.named_parameters())
    with pytest.raises(RuntimeError, match="halfway"), computing_in(m, torch.float32):
        assert m.norm.weight.dtype == torch.float32  # cast for the duration
        m(torch.randn(2, 4))
    assert dict(m.named_parameters()) == params and all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert not m.lin._forward_pre_hooks and not m.lin._forward_hooks


def test_released_pages_read_back_the_same_values(tiny_dirs):
    llm = load_checkpoint(tiny_dirs["interactiveomni"], components=["llm"]).components["llm"]
    tensors = list(llm.state_dict().values())
    sums = [float(t.float().sum()) for t in tensors]
    assert release_pages(tensors) > 0  # they are views of the checkpoint's map
    assert [float(t.float().sum()) for t in tensors] == sums
    assert release_pages([torch.ones(1000)]) == 0  # an ordinary tensor is not touched
