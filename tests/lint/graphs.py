"""Small hand-built ONNX graphs for the lint's rules: a quantized conv block and its broken twins."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT


def tensor(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


class Builder:
    """A graph under construction: x [1,4,8,8] in, y out; ``dtype`` is its float type."""

    def __init__(self, dtype=F16, opset=19):
        self.dtype, self.opset = dtype, opset
        self.np = np.float16 if dtype == F16 else np.float32
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, stem):
        self.n += 1
        return f"{stem}{self.n}"

    def const(self, array, dtype=None):
        name = self.name("c")
        self.inits.append(tensor(name, np.asarray(array, dtype or self.np)))
        return name

    def node(self, op, inputs, **attrs):
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def qdq(self, x, scale=0.05, axis=None, zero=0, scale_dtype=None):
        s = self.const(scale, scale_dtype)
        z = self.const(np.full(np.shape(scale), zero, np.int8), np.int8)
        kw = {} if axis is None else {"axis": axis}
        return self.node("DequantizeLinear", [self.node("QuantizeLinear", [x, s, z], **kw), s, z], **kw)

    def conv(self, x, cout=4, cin=4, quantize_input=True, quantize_weight=True, weight_scale=None, axis=0):
        w = self.const(np.random.default_rng(self.n).standard_normal((cout, cin, 3, 3)) * 0.1)
        if quantize_weight:
            w = self.qdq(w, np.full(cout, 0.01) if weight_scale is None else weight_scale, axis=axis)
        if quantize_input:
            x = self.qdq(x)
        return self.node("Conv", [x, w, self.const(np.zeros(cout))], pads=[1, 1, 1, 1])

    def model(self, y, inputs=(("x", [1, 4, 8, 8]),), io_dtype=None):
        io = io_dtype or self.dtype
        graph = helper.make_graph(self.nodes, "g", [helper.make_tensor_value_info(n, io, s) for n, s in inputs],
                                  [helper.make_tensor_value_info(y, io, None)], self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])


def quantized_block(dtype=F16, opset=19, **conv):
    """x -> quantized conv -> relu -> quantized conv -> + quantized identity -> y: passes every rule."""
    b = Builder(dtype, opset)
    h = b.node("Relu", [b.conv("x", **conv)])
    y = b.node("Add", [b.conv(h), b.qdq("x")])
    return b.model(y)
