import pytest
import torch
from torch import nn

from omni_export.export import trace_specs
from omni_export.export.components.base import Component, NotAComponentError, Role
from omni_export.export.trace import TraceError, trace_component
from omni_export.export.trace_specs import Call, Limits, MethodSpec, Tensor, dim


class Inner(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # Python control flow on a tensor value: no single graph can represent it
            return x * 2
        return x


class Broken(Component, nn.Module):
    role = Role.ENCODER

    def __init__(self) -> None:
        super().__init__()
        self.block = Inner()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) * 2

    def export_methods(self, limits):
        return [MethodSpec("forward", Call(self), (torch.randn(8),), ({0: dim("n", 2, 64)},),
                           (Tensor("x", "float32", ("n",)),), (Tensor("y", "float32", ("m",)),))]


def test_untraceable_component_names_module_and_line():
    with pytest.raises(TraceError) as exc:
        trace_component("broken", Broken(), Limits())
    msg = str(exc.value)
    assert msg.startswith("cannot trace broken.forward:")
    assert "module: broken.block" in msg
    assert "test_trace.py" in msg and "Inner.forward" in msg


def test_a_module_that_is_not_a_component_is_refused_by_name():
    with pytest.raises(NotAComponentError, match="Linear is not an omni-export component"):
        trace_specs.method_specs(nn.Linear(2, 2), Limits())
