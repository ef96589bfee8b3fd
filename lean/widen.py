"""FP16 graph -> FP32 over chosen nodes: the graph pass behind FP32 islands and the FP32 twin the
ranges are measured on.

Each chosen node computes in FP32: its FP16 weights and scales become FP32 (in place when only
chosen nodes read them, else as an FP32 copy named ``<key>_fp32``), its FP16 inputs from other
nodes come through one ``Cast`` to FP32 each, and its outputs go back to FP16 through one ``Cast``
for every reader outside (a graph output stays FP16 unless the whole graph is widened). A chosen
QuantizeLinear or DequantizeLinear thus reads an FP32 scale; its INT8 side is unchanged. Nodes and
Casts of an island carry ``lean.fp32`` (why) in their metadata, which the typing check and the
lint read as a declared island.

Written on onnx-ir by hand: onnxscript's and ModelOpt's converters go all-FP16 or keep FP32 by
op type or node name, but neither takes a node set with per-node reasons and keeps our names.
"""

from __future__ import annotations

import numpy as np

from lean.errors import LeanError
from lean.names import FP32_NOTE, unique


def _scope(name: str) -> str:
    return name.rsplit("/", 1)[0] if name.startswith("/") else ""


def widen(model, chosen, reasons: dict[str, str] | None = None, io: bool = False,
          source: dict[str, np.ndarray] | None = None) -> int:
    """Make the nodes ``chosen`` (names; None: every node) of an ``onnx_ir.Model`` compute in FP32,
    in place. ``io``: graph inputs and outputs become FP32 too (the twin). ``source``: the model's
    FP32 weights by initializer name, so an island computes with the values FP16 could not hold
    (others are widened from FP16). Returns the Casts added."""
    import onnx_ir as ir

    f16, f32 = ir.DataType.FLOAT16, ir.DataType.FLOAT
    graph = model.graph
    nodes = [n for n in graph if chosen is None or n.name in chosen]
    names = {n.name for n in nodes}
    taken = {n.name for n in graph}
    values = {v.name for n in graph for v in (*n.inputs, *n.outputs) if v is not None} | set(graph.initializers)
    reasons = reasons or {}
    casts = 0

    def fp32(v) -> ir.Value:
        v.type = ir.TensorType(f32)
        return v

    def value32(v) -> np.ndarray:
        wide = (source or {}).get(v.name)
        if wide is None or tuple(wide.shape) != tuple(v.const_value.shape):
            wide = v.const_value.numpy().astype(np.float32)
        if not np.isfinite(wide).all():
            raise LeanError(f"weight {v.name} holds NaN or Inf: the checkpoint is damaged")
        return wide

    def cast(source, to, scope, note: str, name: str):
        nonlocal casts
        out = ir.Value(name=unique(name, values), type=ir.TensorType(to), shape=source.shape)
        node = ir.node("Cast", [source], {"to": to}, outputs=[out], name=unique(f"{scope}/Cast", taken),
                       metadata_props={FP32_NOTE: note})
        casts += 1
        return node, out

    if io:
        for v in graph.inputs:
            if v.dtype == f16:
                fp32(v)
    inward: dict[str, ir.Value] = {}  # FP16 value -> its FP32 Cast or copy
    for node in nodes:
        for i, v in enumerate(node.inputs):
            if v is None or v.dtype != f16 or (v.producer() is not None and v.producer().name in names):
                continue
            if v.is_graph_input() and io:
                continue
            if v.is_initializer() and v.const_value is not None:
                if all(u.node.name in names for u in v.uses()) and not v.is_graph_output():
                    v.const_value = ir.tensor(value32(v), name=v.name)
                    fp32(v)
                    continue
                if v.name not in inward:
                    copy = ir.Value(name=unique(f"{v.name}_fp32", values), type=ir.TensorType(f32), shape=v.shape,
                                    const_value=ir.tensor(value32(v)))
                    copy.const_value.name = copy.name
                    graph.register_initializer(copy)
                    inward[v.name] = copy
            elif v.name not in inward:
                new, out = cast(v, f32, _scope(node.name), "into an FP32 island", f"{v.name}_fp32")
                producer = v.producer()
                graph.insert_after(producer, new) if producer is not None else graph.insert_before(node, new)
                inward[v.name] = out
            node.replace_input_with(i, inward[v.name])
    for node in nodes:
        node.metadata_props[FP32_NOTE] = reasons.get(node.name, "FP32")
        _widen_attributes(node, ir)
        for v in node.outputs:
            if v.dtype != f16:
                continue
            fp32(v)
            outside = [u for u in v.uses() if u.node.name not in names]
            output = v.is_graph_output() and not io
            if not outside and not output:
                continue
            new, out = cast(v, f16, _scope(node.name), "out of an FP32 island", f"{v.name}_fp16")
            graph.insert_after(node, new)
            for use in outside:
                use.node.replace_input_with(use.idx, out)
            if output:  # the binding keeps its name and FP16 type
                k = list(graph.outputs).index(v)
                name = v.name
                v.name = unique(f"{name}_fp32", values)
                out.name = name
                graph.outputs[k] = out
    return casts


def _widen_attributes(node, ir) -> None:
    """Attributes that fix an output type: Cast's ``to``, Constant's and ConstantOfShape's value."""
    f16, f32 = ir.DataType.FLOAT16, ir.DataType.FLOAT
    to = node.attributes.get("to")
    if node.op_type == "Cast" and to is not None and to.value == f16:
        node.attributes["to"] = ir.AttrInt64("to", f32)
    value = node.attributes.get("value")
    if node.op_type in ("Constant", "ConstantOfShape") and value is not None and value.value.dtype == f16:
        node.attributes["value"] = ir.AttrTensor("value", ir.tensor(value.value.numpy().astype(np.float32)))
