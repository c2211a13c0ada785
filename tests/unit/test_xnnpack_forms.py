"""Norms traced for ExecuTorch in forms XNNPACK delegates: the same function, one delegate call
where the standard forms left each norm to the portable kernels."""

from __future__ import annotations

import torch
from torch import nn

from omni_export.export.components.layers import RMSNorm
from omni_export.targets.executorch import xnnpack_forms


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln, self.fc1, self.rms, self.fc2 = nn.LayerNorm(48), nn.Linear(48, 48), RMSNorm(48), nn.Linear(48, 48)
        with torch.no_grad():
            for p in (self.ln.weight, self.ln.bias, self.rms.weight):
                p.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.fc1(self.ln(x))
        return x + self.fc2(self.rms(x))


def _delegate_calls(module: nn.Module, x: torch.Tensor) -> int:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    program = torch.export.export(module, (x,), dynamic_shapes=({1: torch.export.Dim("T", min=2, max=64)},))
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()], compile_config=EdgeCompileConfig(_check_ir_validity=False))
    return sum(n.target is torch.ops.higher_order.executorch_call_delegate for n in edge.exported_program().graph.nodes)


def test_norms_in_xnnpack_form_compute_the_same_and_lower_to_one_delegate():
    torch.manual_seed(0)
    block = Block().eval()
    x = torch.randn(1, 9, 48) * 3 + 1
    with torch.no_grad():
        want = block(x)
        standard = _delegate_calls(block, x)
        with xnnpack_forms(block):
            got = block(x)
            formed = _delegate_calls(block, x)
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
    assert formed == 1 < standard  # each standard norm cut the graph
    # put back as they were, with nothing left behind
    assert type(block.ln) is nn.LayerNorm and type(block.rms) is RMSNorm
    assert not dict(block.named_buffers())


def test_preprocess_copies_share_the_weights_and_not_the_graph():
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    from omni_export.targets.executorch import _weights_shared_with_preprocess

    program = torch.export.export(Block().eval(), (torch.randn(1, 4, 48),))
    weight = program.state_dict["fc1.weight"]
    plain = XnnpackBackend.copy_exported_program_for_preprocess(program, [])
    with _weights_shared_with_preprocess():
        shared = XnnpackBackend.copy_exported_program_for_preprocess(program, [])
    assert plain.state_dict["fc1.weight"].data_ptr() != weight.data_ptr()  # ExecuTorch's own copy
    assert shared.state_dict["fc1.weight"].data_ptr() == weight.data_ptr()
    assert shared.graph_module is not program.graph_module and shared.graph is not program.graph
    # put back: the class has no override of its own again
    assert "copy_exported_program_for_preprocess" not in XnnpackBackend.__dict__


def _lowered_alive(leave) -> int:  # type: ignore[no-untyped-def]
    """Lower a small block with a dynamic token count (so torch's shape environments and their
    caches take part), drop every reference, and count the lowered modules still alive."""
    import gc
    import weakref

    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    x = torch.randn(1, 5, 48)
    program = torch.export.export(Block().eval(), (x,), dynamic_shapes=({1: torch.export.Dim("t", min=2, max=64)},))
    with leave():
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        lowered = [weakref.ref(m) for _, m in edge.exported_program().graph_module.named_children()]
        edge.to_executorch()
    assert lowered
    del edge, program
    gc.collect()
    return sum(w() is not None for w in lowered)


def test_lowering_leaves_no_graph_reachable_once_it_is_done():
    from contextlib import nullcontext

    from omni_export.targets.executorch import _no_graphs_left_behind

    assert _lowered_alive(nullcontext) > 0  # ExecuTorch and torch's caches keep them
    assert _lowered_alive(_no_graphs_left_behind) == 0
