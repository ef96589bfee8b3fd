"""The FP32-over-chosen-nodes graph pass: types, Casts at the edges, FP32 weights kept."""

import numpy as np
import onnx_ir as ir
import torch

from lean.names import FP32_NOTE
from lean.widen import widen

from helpers import Massive, run_onnx, traced


def test_widened_nodes_compute_in_fp32_with_casts_at_the_edges():
    model, weights = traced(Massive(big=1.0), torch.randn(1, 3, 8))
    add = next(n for n in model.graph if n.op_type == "Add" and n.name.startswith("/fc1/"))
    casts = widen(model, {add.name}, {add.name: "test"}, source=weights)
    assert casts == 2  # the matmul's output in, the sum out to the LayerNorm
    assert add.outputs[0].dtype == ir.DataType.FLOAT and add.metadata_props[FP32_NOTE] == "test"
    assert all(v.dtype == ir.DataType.FLOAT for v in add.inputs)
    bias = next(v for v in add.inputs if v.is_initializer())
    assert bias.name == "fc1.bias" and np.array_equal(bias.const_value.numpy(), weights["fc1.bias"])
    cast_nodes = [n for n in model.graph if n.op_type == "Cast"]
    assert {n.metadata_props[FP32_NOTE] for n in cast_nodes} == {"into an FP32 island", "out of an FP32 island"}
    assert all(n.name.startswith("/fc1/Cast") for n in cast_nodes)
    assert model.graph.outputs[0].dtype == ir.DataType.FLOAT16 and model.graph.outputs[0].name == "y"
    x = torch.randn(1, 3, 8)
    got = run_onnx(ir.to_proto(model), x)
    assert np.allclose(got, Massive(big=1.0)(x).detach().numpy(), atol=1e-2)


def test_a_shared_fp16_weight_gets_an_fp32_copy_and_outputs_keep_their_binding():
    model, weights = traced(Massive(big=1.0), torch.randn(1, 3, 8))
    last = next(n for n in model.graph if n.op_type == "Add" and n.name.startswith("/fc2/"))
    widen(model, {last.name}, source=weights)
    assert model.graph.outputs[0].name == "y" and model.graph.outputs[0].dtype == ir.DataType.FLOAT16
    assert last.outputs[0].name != "y" and last.outputs[0].dtype == ir.DataType.FLOAT


def test_widening_every_node_with_io_is_the_fp32_twin():
    module = Massive()
    model, weights = traced(module, torch.randn(1, 3, 8))
    assert not np.isfinite(model.graph.initializers["fc1.bias"].const_value.numpy()).all()  # 1e5 in FP16
    widen(model, None, io=True, source=weights)
    assert not [n for n in model.graph if n.op_type == "Cast"]
    assert model.graph.inputs[0].dtype == model.graph.outputs[0].dtype == ir.DataType.FLOAT
    x = torch.randn(1, 3, 8)
    assert np.allclose(run_onnx(ir.to_proto(model), x), module(x).detach().numpy(), atol=1e-2)
