"""An ONNX graph as the lint rules read it: producers, consumers, constants, types and shapes."""

from __future__ import annotations

from functools import cached_property

import numpy as np
from onnx import numpy_helper

from lean.typecheck import value_types

QDQ = ("QuantizeLinear", "DequantizeLinear")
MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Ops between a weight and its Q/DQ or layer that change nothing TensorRT cares about.
WRAPPERS = ("Transpose", "Identity", "Cast")
# Ops a quantized tensor passes through unchanged in value (TensorRT moves scales across them).
PASS_THROUGH = ("MaxPool", "Resize", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Pad",
                "Identity", "Gather", "Split")


class GraphView:
    def __init__(self, proto, name: str = "graph"):
        self.proto, self.name = proto, name
        self.graph = proto.graph
        self.nodes = list(self.graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.inputs = [v.name for v in self.graph.input]
        self.outputs = [v.name for v in self.graph.output]
        # Our files declare their bindings' type (``--io fp32`` puts a Cast on each binding).
        self.io = next((p.value for p in proto.metadata_props if p.key == "io"), None)

    @cached_property
    def constants(self) -> dict[str, np.ndarray]:
        out = {i.name: numpy_helper.to_array(i) for i in self.graph.initializer}
        for n in self.nodes:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        return out

    @cached_property
    def inferred(self):
        import onnx

        return onnx.shape_inference.infer_shapes(self.proto)  # not strict: any file, ours or not

    @cached_property
    def types(self) -> dict[str, int]:
        return value_types(self.inferred, infer=False)

    @cached_property
    def shapes(self) -> dict[str, list[int]]:
        graph = self.inferred.graph
        out = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
               for v in (*graph.input, *graph.output, *graph.value_info)}
        out.update({k: list(v.shape) for k, v in self.constants.items()})
        return out

    @cached_property
    def opset(self) -> int:
        return next((o.version for o in self.proto.opset_import if o.domain in ("", "ai.onnx")), 0)

    def label(self, node) -> str:
        return node.name or f"{node.op_type}->{node.output[0]}"

    def dq(self, tensor: str):
        """The DequantizeLinear producing ``tensor`` (through a Transpose, Identity or Cast), or None."""
        node = self.producer.get(tensor)
        while node is not None and node.op_type in WRAPPERS:
            node = self.producer.get(node.input[0])
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    def is_constant(self, tensor: str, depth: int = 8) -> bool:
        """Made from constants only (an initializer, or a Q/DQ, Transpose, Identity or Cast of one)."""
        if tensor in self.constants:
            return True
        node = self.producer.get(tensor)
        return (depth > 0 and node is not None and node.op_type in (*QDQ, *WRAPPERS)
                and self.is_constant(node.input[0], depth - 1))

    def quantized_inputs(self, node) -> list[bool]:
        """Which of a MAC op's two operands come through a DequantizeLinear."""
        return [self.dq(t) is not None for t in node.input[:2]]

    def reaches(self, tensor: str, ops: tuple[str, ...], depth: int = 8) -> bool:
        """Does ``tensor`` feed one of ``ops``, directly or through pass-through ops?"""
        for c in self.consumers.get(tensor, []):
            if c.op_type in ops:
                return True
            if depth and c.op_type in PASS_THROUGH and any(self.reaches(o, ops, depth - 1) for o in c.output):
                return True
        return False
