"""Range measurement: max |x| of every tensor of a graph on data, computed in FP32.

The graph is measured as its FP32 twin (``lean.widen`` over every node, so a tensor that would
overflow in FP16 is seen at its real size) in ONNX Runtime, with ``Abs -> ReduceMax`` and
``ReduceSum`` added for every float tensor: ONNX Runtime frees each tensor as usual, so the
measurement costs one forward plus two reductions per tensor, not the memory of every tensor.
(ReduceMax skips NaN; the sum of |x| is NaN or Inf exactly when an element is, or when the
tensor is within a factor of its size of FP32's largest value, which is flagged all the same.) Tensors are keyed by the node that makes them, named by
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
# lean.ptq measures on at most this many of its calibration samples, spread over them: a sample
# costs a whole FP32 ONNX Runtime run on the CPU (about 1.3 s full size on the H200 machine's CPU),
# and the bound leaves 8x headroom where a tensor's max over 8 samples was at most 1.29x its max on
# one (BENCHMARKS.md).
RECORD_SAMPLES = 32


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


# Ops whose output's max |x| is at most their float inputs': their range is carried over from the
# inputs, not measured (a DequantizeLinear's from its QuantizeLinear's input). About half the tensors
# of an INT8 graph, and the reductions cost as much as the forward.
CARRIED = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather", "Split", "Concat",
           "Identity", "MaxPool", "Relu", "Expand", "Tile", "DequantizeLinear"}


class Meter:
    """``measure`` one sample at a time: a session over ``proto`` (which it consumes) with the
    reductions added."""

    def __init__(self, proto):
        from onnx import TensorProto, helper, numpy_helper

        floats = _float_outputs(proto)
        g = proto.graph
        producer = {o: (n, i) for n in g.node for i, o in enumerate(n.output) if o}
        consts = {i.name: i for i in g.initializer}
        self.keys, self.modules, self.carried = [], {}, []
        measured, outputs, extra = [], [], []  # extra: the graph's nodes, each followed by its reductions

        def reduce(tensor: str, elem: int) -> None:
            # One |x|, two reductions: its max, and its sum, which is NaN or Inf exactly when some
            # element is (ReduceMax alone skips a NaN); summed in FP32, where an FP16 sum would overflow.
            n = len(measured)
            extra.append(helper.make_node("Abs", [tensor], [f"lean_abs_{n}"]))
            wide = f"lean_abs_{n}"
            if elem != TensorProto.FLOAT:
                wide = f"lean_abs32_{n}"
                extra.append(helper.make_node("Cast", [f"lean_abs_{n}"], [wide], to=TensorProto.FLOAT))
            extra.extend([helper.make_node("ReduceMax", [wide], [f"lean_max_{n}"], keepdims=0),
                          helper.make_node("ReduceSum", [wide], [f"lean_sum_{n}"], keepdims=0)])
            outputs.extend([helper.make_tensor_value_info(f"lean_max_{n}", TensorProto.FLOAT, []),
                            helper.make_tensor_value_info(f"lean_sum_{n}", TensorProto.FLOAT, [])])
            measured.append(tensor)

        for v in g.input:
            if v.type.tensor_type.elem_type in FLOATS:
                reduce(v.name, v.type.tensor_type.elem_type)
        for node in g.node:
            extra.append(node)
            meta = {p.key: p.value for p in node.metadata_props}
            sources = self._sources(node, producer)
            for i, out in enumerate(node.output):
                if out not in floats:
                    continue
                key = tensor_key(node.name, i)
                self.keys.append(key)
                self.modules[key] = meta.get(MODULE, "")
                if sources is None:
                    reduce(out, floats[out])
                    continue
                const = max((float(np.abs(numpy_helper.to_array(consts[t]).astype(np.float64)).max(initial=0))
                             for t in sources if t in consts), default=0.0)
                self.carried.append((out, [t for t in sources if t not in consts], const))
        self.measured = measured
        # Each reduction right after its tensor's producer, run in that order (``in_node_order``):
        # the tensor is freed at once instead of living to the end of the run.
        # ``proto`` is consumed: its nodes and outputs are replaced (no copy of the weights).
        del g.node[:]
        g.node.extend(extra)
        del g.output[:]
        g.output.extend(outputs)
        self.session = ort_session(proto.SerializeToString(), in_node_order=True)
        self.key_of = {o: tensor_key(n.name, i) for o, (n, i) in producer.items()}
        self.max: dict[str, float] = {}
        self.bad: set[str] = set()
        self.samples = 0

    @staticmethod
    def _sources(node, producer) -> list[str] | None:
        """The tensors a CARRIED node's range comes from (None: measure it)."""
        if node.op_type not in CARRIED:
            return None
        if node.op_type == "DequantizeLinear":
            q = producer.get(node.input[0])
            return [q[0].input[0]] if q is not None and q[0].op_type == "QuantizeLinear" else None
        data = [t for t in node.input[:1] if t] if node.op_type != "Concat" else [t for t in node.input if t]
        return data or None

    def add(self, feed: dict[str, np.ndarray]) -> None:
        got = self.session.run(None, feed)
        value: dict[str, tuple[float, bool]] = {}  # tensor -> (max |x| on this sample, non-finite)
        for j, tensor in enumerate(self.measured):
            m, total = float(got[2 * j]), float(got[2 * j + 1])
            value[tensor] = (m if math.isfinite(m) else math.inf, not (math.isfinite(m) and math.isfinite(total)))
        for out, sources, const in self.carried:  # in graph order: every source is known by now
            ins = [value.get(t, (0.0, False)) for t in sources]
            value[out] = (max([const, *(m for m, _ in ins)]), any(b for _, b in ins))
        for tensor, (m, bad) in value.items():
            key = self.key_of.get(tensor)
            if key is None:  # a graph input
                continue
            if bad:
                self.bad.add(key)
            self.max[key] = max(self.max.get(key, 0.0), m)
        self.samples += 1

    def ranges(self) -> Ranges:
        return Ranges(dict(self.max), self.modules, [k for k in self.keys if k in self.bad], self.samples)


def _float_outputs(proto) -> dict[str, int]:
    """Node outputs of ``proto`` with a float type, and that type: from the types the exporter
    recorded (``value_info``), with shape inference only when some are missing."""
    g = proto.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    if any(o and o not in types for n in g.node for o in n.output):
        types = value_types(proto)
    return {o: types[o] for n in g.node for o in n.output if types.get(o) in FLOATS}


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
