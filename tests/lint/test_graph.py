import numpy as np

from lean.lint.graph import GraphView

from lint.graphs import F16, Builder, quantized_block


def test_view_of_a_quantized_block():
    g = GraphView(quantized_block())
    convs = [n for n in g.nodes if n.op_type == "Conv"]
    assert all(g.quantized_inputs(n) == [True, True] for n in convs)
    assert g.is_constant(convs[0].input[1]) and not g.is_constant(convs[0].input[0])
    assert g.shapes[convs[0].output[0]] == [1, 4, 8, 8] and g.types[convs[0].output[0]] == F16
    assert g.opset == 19 and g.inputs == ["x"]
    dq = g.dq(convs[0].input[0])
    assert g.reaches(dq.output[0], ("Conv",)) and not g.reaches(g.outputs[0], ("Conv",))
    assert isinstance(g.constants[dq.input[1]], np.ndarray)


def test_reaches_through_pass_through_ops():
    b = Builder()
    pooled = b.node("MaxPool", [b.qdq("x")], kernel_shape=[2, 2], strides=[2, 2])
    y = b.conv(pooled, quantize_input=False)
    g = GraphView(b.model(y))
    dq = next(n for n in g.nodes if n.op_type == "DequantizeLinear" and not g.is_constant(n.input[0]))
    assert g.reaches(dq.output[0], ("Conv",))
