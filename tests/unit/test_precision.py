"""Which layers an fp16 target keeps in fp32 is measured, not guessed: a layer whose fp16 output
loses its information (cancellation) or leaves fp16's range is kept, a well-conditioned one is
not, and a kept layer runs in fp32 in the exported graph behind a Cast pair."""

import torch
from torch import nn

from omni_export.export.precision import CastIO, KeepFloat32, to_half
from omni_export.targets.precision import FP16_MAX, TOLERANCE, fp16_forms, measure_fp16


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fine = nn.Linear(16, 16)
        self.cancel = nn.Linear(2, 1, bias=False)  # w0 - w1 of two nearly equal weights
        self.big = nn.Linear(16, 4)
        with torch.no_grad():
            self.cancel.weight.copy_(torch.tensor([[1.0003, -1.0]]))  # fp16 rounds 1.0003 to 1.0
            self.big.weight.mul_(1e5)

    def forward(self, x, pair):
        return self.fine(x), self.cancel(pair), self.big(x)


def _inputs():
    return torch.rand(3, 16) + 1.0, torch.tensor([[1.0, 1.0]])


def test_cancellation_and_overflow_are_kept_fp32_and_a_fine_layer_is_not():
    toy = Toy()
    plan = measure_fp16(toy, lambda: toy(*_inputs()))
    by = {lp.path: lp for lp in plan.layers}
    assert set(by) == {"", "fine", "cancel", "big"}  # "": the component, kept for big (below)
    assert not by["fine"].kept_fp32 and by["fine"].rel_err < TOLERANCE / 5
    assert by["cancel"].kept_fp32 and by["cancel"].rel_err > 0.5 and "relative error" in by["cancel"].reason
    assert by["big"].kept_fp32 and by["big"].max_abs > FP16_MAX and "exceed fp16's range" in by["big"].reason
    # big is a top-level layer whose output fp16 cannot hold: the whole component stays fp32
    assert plan.keep == [""] and plan.whole
    report = plan.report()
    assert {r["path"] for r in report[:-1]} == {"", "big", "cancel"} and report[-1]["measured_layers"] == 3


def _nested():
    toy = Toy()
    toy.big = nn.Sequential(toy.big, nn.Hardtanh(-1e4, 1e4))  # clipped back into range by its parent
    return toy


def test_a_kept_layer_runs_fp32_in_the_graph_and_restores_the_answer():
    toy = _nested()
    x, pair = _inputs()
    ref = toy(x, pair)
    plan = measure_fp16(toy, lambda: toy(x, pair))
    with fp16_forms(toy, plan):
        assert sorted(plan.keep) == ["big", "cancel"]
        assert isinstance(toy.cancel, KeepFloat32) and isinstance(toy.big, KeepFloat32) and toy.fine.weight.dtype == torch.float16
        wrapped = CastIO(toy, [torch.float16, torch.float16], [torch.float32] * 3)
        got = wrapped(x, pair)
        model = torch.onnx.export(wrapped, (x, pair), dynamo=True, verbose=False).model
    assert not isinstance(toy.cancel, KeepFloat32)  # put back after tracing
    assert torch.allclose(got[1], ref[1], rtol=1e-3) and torch.allclose(got[2], ref[2], rtol=1e-2)  # x rounded to fp16 at the boundary
    gemms = {n.name: n for n in model.graph if n.op_type in ("Gemm", "MatMul")}
    dtypes = sorted(str(n.inputs[0].dtype) for n in gemms.values())
    assert dtypes.count("FLOAT") == 2 and dtypes.count("FLOAT16") == 1  # cancel and big in fp32, fine in fp16
    assert [n for n in model.graph if n.op_type == "Cast"]


def test_to_half_keeps_a_broadcast_placeholder_a_broadcast():
    m = nn.Linear(4, 4)
    m.register_buffer("weight_t", torch.zeros(()).expand(4096, 4096))
    to_half(m)
    assert m.weight.dtype == torch.float16 and m.weight_t.dtype == torch.float16 and m.weight_t.stride() == (0, 0)


def test_core_ml_converts_the_kept_layers_in_fp32_and_the_rest_in_fp16(tmp_path):
    """Core ML gets the same plan as an op selector over its fp16 pass: the ops of the kept
    layers compute in fp32 in the package, a fine layer's in fp16."""
    from omni_export.export.trace_specs import MethodSpec, Tensor
    from omni_export.targets.coreml_package import convert, function_ops, load_spec

    toy = _nested()
    x, pair = _inputs()
    plan = measure_fp16(toy, lambda: toy(x, pair))
    program = torch.export.export(toy, (x, pair))
    spec = MethodSpec("forward", toy, (x, pair), None, (Tensor("x", "float32", (3, 16)), Tensor("pair", "float32", (1, 2))),
                      tuple(Tensor(n, "float32", ()) for n in ("fine", "cancel", "big")))  # fmt: skip
    path = convert(program, spec, "iOS18", {}, tmp_path / "toy.mlpackage", plan)
    ops = function_ops(load_spec(path))["main"]
    linear = {op.outputs[0].name: op.outputs[0].type.tensorType.dataType for op in ops if op.type == "linear"}
    from coremltools.proto.MIL_pb2 import DataType

    kinds = sorted(DataType.Name(d) for d in linear.values())
    assert kinds == ["FLOAT16", "FLOAT32", "FLOAT32"], linear  # cancel and big fp32, fine fp16
