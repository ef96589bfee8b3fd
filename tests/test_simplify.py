import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lean.simplify import simplify


def test_simplify_folds_constant_work_and_keeps_the_result():
    # y = x + (a * b): the product of two initializers folds into one constant.
    a = numpy_helper.from_array(np.full((2,), 2.0, np.float32), "a")
    b = numpy_helper.from_array(np.full((2,), 3.0, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["a", "b"], ["ab"]), helper.make_node("Add", ["x", "ab"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [a, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    simplified = simplify(model)
    assert [n.op_type for n in simplified.graph.node] == ["Add"]
    onnx.checker.check_model(simplified)
