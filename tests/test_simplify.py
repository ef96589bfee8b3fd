import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from lean.simplify import simplify


def test_simplify_folds_constant_work_and_counts_nodes():
    # y = x + (a * b): the product of two initializers folds into one constant.
    a = numpy_helper.from_array(np.full((2,), 2.0, np.float32), "a")
    b = numpy_helper.from_array(np.full((2,), 3.0, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["a", "b"], ["ab"]), helper.make_node("Add", ["x", "ab"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [a, b])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]))
    assert simplify(model) == (2, 1)
    assert [n.op_type for n in model.graph] == ["Add"]
