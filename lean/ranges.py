"""Range measurement: max |x| of every tensor of a graph on data, computed in FP32.

The graph is measured as its FP32 twin (``lean.widen`` over every node, so a tensor that would
overflow in FP16 is seen at its real size) in ONNX Runtime, with an ``Abs -> ReduceMax`` and an
``IsNaN`` flag added for every float tensor: ONNX Runtime frees each tensor as usual, so the
measurement costs one forward plus one reduction per tensor, not the memory of every tensor.
(ReduceMax skips NaN, hence the flag.) Tensors are keyed by the node that makes them, named by
``lean.names``, so ranges measured by ``lean.ptq`` on its calibration samples and by the export
on ``--data`` meet on the same keys.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from lean.widen import widen

FP16_MAX = 65504.0
# Tensors whose measured max |x| is above BOUND run in FP32 islands in typed graphs: 8x headroom
# below FP16's largest value for inputs the data did not show (README, "Names and FP32 islands").
BOUND = 8192.0
RECORD_FLOOR = BOUND / 32  # lean.ptq records the tensors above this (the rest cannot matter)


def tensor_key(node_name: str, index: int) -> str:
    """A tensor's key: the node that makes it, with ``:index`` for a node's second output on."""
    return node_name if index == 0 else f"{node_name}:{index}"


@dataclass
class Ranges:
    """max |x| per tensor key over every sample seen; ``nonfinite``: keys that held NaN or Inf, in
    graph order (the first is where it started)."""

    max: dict[str, float] = field(default_factory=dict)
    modules: dict[str, str] = field(default_factory=dict)  # key -> module path of its node
    nonfinite: list[str] = field(default_factory=list)
    samples: int = 0

    def merge(self, other: dict[str, float]) -> None:
        """Take the larger of these and ``other``'s ranges (a checkpoint's record)."""
        for k, v in other.items():
            if k in self.max and math.isfinite(v):
                self.max[k] = max(self.max[k], float(v))

    def above(self, floor: float) -> dict[str, float]:
        return {k: v for k, v in self.max.items() if v > floor}


def twin(model, source: dict[str, np.ndarray] | None = None):
    """The FP32 twin of an ``onnx_ir.Model`` (a copy, as a ModelProto): every node FP32, I/O too,
    with the FP32 weights of ``source`` where it has them (``lean.widen``)."""
    import onnx_ir as ir

    copy = ir.from_proto(ir.to_proto(model))
    widen(copy, None, io=True, source=source)
    return ir.to_proto(copy)


def measure(proto, feeds: Iterable[dict[str, np.ndarray]]) -> Ranges:
    """Max |x| of every float tensor made by a node of ``proto`` (an FP32 graph) over ``feeds``."""
    import onnx
    from onnx import TensorProto, helper

    from lean.validate import ort_session

    graph = proto.graph
    floats = _float_outputs(proto)
    keys, outputs, extra = [], [], []
    modules = {}
    for node in graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        for i, out in enumerate(node.output):
            if out not in floats:
                continue
            key = tensor_key(node.name, i)
            keys.append(key)
            modules[key] = meta.get("lean.module", "")
            n = len(keys)
            extra += [helper.make_node("Abs", [out], [f"lean_abs_{n}"]),
                      helper.make_node("ReduceMax", [f"lean_abs_{n}"], [f"lean_max_{n}"], keepdims=0),
                      helper.make_node("IsNaN", [out], [f"lean_isnan_{n}"]),
                      helper.make_node("Cast", [f"lean_isnan_{n}"], [f"lean_nanf_{n}"], to=TensorProto.FLOAT),
                      helper.make_node("ReduceMax", [f"lean_nanf_{n}"], [f"lean_nan_{n}"], keepdims=0)]
            outputs += [helper.make_tensor_value_info(f"lean_max_{n}", floats[out], []),
                        helper.make_tensor_value_info(f"lean_nan_{n}", TensorProto.FLOAT, [])]
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.node.extend(extra)
    del probe.graph.output[:]
    probe.graph.output.extend(outputs)
    session = ort_session(probe.SerializeToString())
    ranges = Ranges(modules=modules)
    bad = set()
    for feed in feeds:
        got = session.run(None, feed)
        for j, key in enumerate(keys):
            m, nan = float(got[2 * j]), float(got[2 * j + 1])
            if nan > 0 or not math.isfinite(m):
                bad.add(key)
            ranges.max[key] = max(ranges.max.get(key, 0.0), m if math.isfinite(m) else math.inf)
        ranges.samples += 1
    ranges.nonfinite = [k for k in keys if k in bad]
    return ranges


def _float_outputs(proto) -> dict[str, int]:
    """Node outputs of ``proto`` with a float type, and that type."""
    from lean.typecheck import FLOATS, value_types

    types = value_types(proto)
    return {o: types[o] for n in proto.graph.node for o in n.output if types.get(o) in FLOATS}
