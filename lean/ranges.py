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

from lean.bev import pool_to_bev
from lean.contract import BACKBONE_FILE, VTRANSFORM, VTRANSFORM_FILE, backbone_spec
from lean.errors import LeanError
from lean.models import BackboneGraph, VTransformGraph
from lean.names import MODULE, name_nodes, scope_map
from lean.runtime import ort_session
from lean.simplify import simplify
from lean.trace import reference, trace
from lean.typecheck import FLOATS, value_types
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
            if k in self.max and isinstance(v, (int, float)) and math.isfinite(v):
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
    """Max |x| of every float tensor made by a node of ``proto`` over ``feeds``."""
    meter = Meter(proto)
    for feed in feeds:
        meter.add(feed)
    return meter.ranges()


class Meter:
    """``measure`` one sample at a time: a session over ``proto`` with the reductions added."""

    def __init__(self, proto):
        import onnx
        from onnx import TensorProto, helper

        floats = _float_outputs(proto)
        self.keys, outputs, extra = [], [], []
        self.modules = {}
        for node in proto.graph.node:
            meta = {p.key: p.value for p in node.metadata_props}
            for i, out in enumerate(node.output):
                if out not in floats:
                    continue
                key = tensor_key(node.name, i)
                self.keys.append(key)
                self.modules[key] = meta.get(MODULE, "")
                n = len(self.keys)
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
        self.session = ort_session(probe.SerializeToString())
        self.max: dict[str, float] = {}
        self.bad: set[str] = set()
        self.samples = 0

    def add(self, feed: dict[str, np.ndarray]) -> None:
        got = self.session.run(None, feed)
        for j, key in enumerate(self.keys):
            m, nan = float(got[2 * j]), float(got[2 * j + 1])
            if nan > 0 or not math.isfinite(m):
                self.bad.add(key)
            self.max[key] = max(self.max.get(key, 0.0), m if math.isfinite(m) else math.inf)
        self.samples += 1

    def ranges(self) -> Ranges:
        return Ranges(dict(self.max), self.modules, [k for k in self.keys if k in self.bad], self.samples)


def _float_outputs(proto) -> dict[str, int]:
    """Node outputs of ``proto`` with a float type, and that type."""
    types = value_types(proto)
    return {o: types[o] for n in proto.graph.node for o in n.output if types.get(o) in FLOATS}


def graph_proto(wrapper, branch, inputs: dict, outputs: list[str], opset: int = 19):
    """``wrapper`` traced, optimized and named as the export does, as an FP32 ModelProto."""
    model = trace(wrapper, inputs, outputs, opset)
    simplify(model)
    name_nodes(model, scope_map(wrapper, branch))
    return twin(model)


def record(model, samples: Iterable, floor: float = RECORD_FLOOR, progress=None) -> dict:
    """``lean.ptq``'s record: ranges of both graphs of the export's FP32 ``model`` over ``samples``
    (each ``(backbone inputs by name, the sample's rig)``), the tensors above ``floor`` per file."""
    backbone, vtransform = BackboneGraph(model), VTransformGraph(model)
    spec = backbone_spec(model.cfg.uses_depth)
    meters = {}
    for inputs, rig in samples:
        out = reference(backbone, inputs, list(spec.outputs))
        bev = {"feat_in": pool_to_bev(out["camera_feature"], out["camera_depth_weights"], rig, model)}
        if not meters:
            meters = {BACKBONE_FILE: Meter(graph_proto(backbone, model, inputs, list(spec.outputs))),
                      VTRANSFORM_FILE: Meter(graph_proto(vtransform, model, bev, list(VTRANSFORM.outputs)))}
        for file, feed in ((BACKBONE_FILE, inputs), (VTRANSFORM_FILE, bev)):
            meters[file].add({k: v.detach().float().cpu().numpy() for k, v in feed.items()})
        if progress:
            progress()
    facts = {"bound": BOUND, "floor": floor}
    for file, meter in meters.items():
        ranges = meter.ranges()
        if ranges.nonfinite:
            key = ranges.nonfinite[0]
            raise LeanError(f"the calibrated model makes NaN or Inf at {key} (module {ranges.modules[key] or '(graph)'})"
                            f" of {file}: check the checkpoint and the calibration data")
        facts["samples"] = ranges.samples
        facts[file] = ranges.above(floor)
    return facts
