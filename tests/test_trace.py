import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lean.errors import LeanError
from lean.quant.qdq import QDQ
from lean.simplify import simplify
from lean.trace import CastIO, annotate, exact_float32, reference, to_opset, to_proto, trace


def export(module, inputs, outputs, opset):
    model = trace(module, inputs, outputs, opset)
    simplify(model)
    return to_proto(model, opset)


@pytest.mark.parametrize("opset", [13, 17, 19, 20])
def test_trace_names_the_graph_at_the_asked_opset(opset):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    proto = export(module, {"img": x}, ["feat"], opset)
    assert [i.name for i in proto.graph.input] == ["img"] and [o.name for o in proto.graph.output] == ["feat"]
    assert proto.opset_import[0].version == opset
    onnx.checker.check_model(proto, full_check=True)
    # The module scopes stay, the stack traces (with this machine's paths) do not.
    keys = {p.key for n in proto.graph.node for p in n.metadata_props}
    assert "pkg.torch.onnx.name_scopes" in keys and not any("stack_trace" in k for k in keys)
    ref = reference(module, {"img": x}, ["feat"])
    assert torch.equal(ref["feat"], module(x).detach()) and not ref["feat"].requires_grad


@pytest.mark.parametrize("opset,dtype,onnx_type", [(13, torch.float32, TensorProto.FLOAT),
                                                    (19, torch.float16, TensorProto.FLOAT16)])
def test_qdq_exports_as_one_quantize_dequantize_pair(opset, dtype, onnx_type):
    layer = torch.nn.Sequential(QDQ(torch.tensor(2.0)), torch.nn.Conv2d(3, 4, 3)).to(dtype)
    proto = export(layer, {"x": torch.randn(1, 3, 8, 8, dtype=dtype)}, ["y"], opset)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1 and "Cast" not in ops
    consts = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node if n.op_type == "Constant"})
    q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear")
    assert consts[q.input[1]].item() == pytest.approx(2 / 127, rel=1e-3) and consts[q.input[2]].dtype.name == "int8"
    scale = next(i for i in proto.graph.initializer if i.name == q.input[1])
    assert scale.data_type == onnx_type


def test_cast_io_gives_fp32_bindings_around_fp16():
    module = CastIO(torch.nn.Conv2d(3, 4, 3).half())
    proto = export(module, {"x": torch.randn(1, 3, 8, 8)}, ["y"], 19)
    assert [v.type.tensor_type.elem_type for v in (*proto.graph.input, *proto.graph.output)] == [TensorProto.FLOAT] * 2
    assert [n.op_type for n in proto.graph.node].count("Cast") == 2


def test_to_opset_refuses_what_opset_13_cannot_say():
    node = helper.make_node("Resize", ["x", "", "s"], ["y"], mode="linear", antialias=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(torch.ones(4).numpy(), "s")])
    with pytest.raises(LeanError, match="antialias"):
        to_opset(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), 13)


def test_annotate_replaces_metadata():
    proto = export(torch.nn.ReLU(), {"x": torch.randn(2)}, ["y"], 13)
    annotate(proto, {"a": 1})
    annotate(proto, {"precision": "int8"})
    assert proto.producer_name == "lean"
    assert {p.key: p.value for p in proto.metadata_props} == {"precision": "int8"}


def test_exact_float32_restores_the_flags():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    with exact_float32():
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before
