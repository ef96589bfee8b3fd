"""The typing check of every export: does the file carry the precision its target builds from?

A strongly typed target (TensorRT 10/11) builds each tensor in the type the file gives it, so
every float tensor must be FP16 (inputs and outputs too, unless ``--io fp32``), every Q/DQ scale
FP16 and the opset at least 19. A classic target (TensorRT 8) reads FP32 tensors and opset-13..17
Q/DQ with FP32 scales. A violation fails the export like a numeric mismatch.
"""

from __future__ import annotations

from onnx import TensorProto

from lean.errors import LeanError
from lean.target import Target
from lean.names import FP32_NOTE

FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
NAMES = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.DOUBLE: "FP64",
         TensorProto.BFLOAT16: "BF16"}


def value_types(proto, infer: bool = True) -> dict[str, int]:
    """Element type of every value of the graph (inputs, initializers, node outputs), by name;
    ``infer=False`` for a proto that already went through shape inference."""
    import onnx

    graph = (onnx.shape_inference.infer_shapes(proto, strict_mode=True) if infer else proto).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    types.update({i.name: i.data_type for i in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            types[node.output[0]] = node.attribute[0].t.data_type
    return types


def check_typing(proto, target: Target, io: str = "fp16", name: str = "graph", types: dict | None = None) -> dict:
    """Typing facts of ``proto``; raises a LeanError naming the first offenders if it does not fit ``target``.

    ``types``: ``value_types`` of the proto when the caller already inferred them.
    """
    types = value_types(proto) if types is None else types
    graph = proto.graph
    want = TensorProto.FLOAT16 if target.typed else TensorProto.FLOAT
    want_io = TensorProto.FLOAT if not target.typed or io == "fp32" else TensorProto.FLOAT16
    io_names = [v.name for v in (*graph.input, *graph.output)]
    # Declared FP32 islands (lean.islands) compute in FP32 on purpose, with FP32 weights and scales.
    island = {n.name for n in declared_islands(proto)} if target.typed else set()
    island_only = _read_only_by(graph, island)
    problems = [f"{n} is {NAMES.get(types.get(n), types.get(n))}" for n in io_names if types.get(n) != want_io]
    wrong_nodes = [node.name or node.op_type for node in graph.node if node.name not in island
                   and any(types.get(o) in FLOATS and types.get(o) != want and o not in io_names for o in node.output)]
    problems += [f"node {n} computes in another float type" for n in wrong_nodes]
    wrong_inits = [i.name for i in graph.initializer if i.data_type in FLOATS and i.data_type != want
                   and i.name not in island_only]
    problems += [f"initializer {n} is not {NAMES[want]}" for n in wrong_inits]
    scales = [n.input[1] for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
              and n.name not in island]
    problems += [f"Q/DQ scale {s} is {NAMES.get(types.get(s), types.get(s))}" for s in scales if types.get(s) != want]
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset < target.opsets[0] or opset > target.opsets[1]:
        problems.append(f"opset {opset} is outside {target.opsets[0]}..{target.opsets[1]}")
    if problems:
        raise LeanError(
            f"{name} is not typed for TensorRT {target.name} ({len(problems)} problems, first: {'; '.join(problems[:3])}); "
            "nothing was written"
        )
    computed = sum(1 for node in graph.node if any(types.get(o) in FLOATS for o in node.output))
    return {"opset": opset, "io": NAMES[want_io], "tensors": NAMES[want], "float_nodes": computed,
            "qdq_scales": NAMES[want] if scales else None, "fp32_nodes": len(island)}


def declared_islands(proto) -> list:
    """Nodes the file declares FP32 on purpose (``lean.fp32`` in their metadata), Casts included."""
    return [n for n in proto.graph.node if any(p.key == FP32_NOTE for p in n.metadata_props)]


def _read_only_by(graph, names: set[str]) -> set[str]:
    """Values every reader of which is one of the nodes ``names``."""
    readers: dict[str, set] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, set()).add(n.name)
    return {v for v, r in readers.items() if r and r <= names}
