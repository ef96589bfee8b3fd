"""The lint's rules. Each reads a ``GraphView`` for a target and returns the offenders (node or
tensor names) and a verdict; ``WHY`` says in one line what TensorRT does when a rule is broken."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto

from lean.contract import SPECS, shape_problems
from lean.lint.graph import MAC_OPS, PASS_THROUGH, QDQ, GraphView
from lean.lint.operators import OPSETS, known, unsupported
from lean.typecheck import FLOATS, NAMES, declared_islands

OK, WARNING, ERROR = "ok", "warning", "error"
NORMAL_MIN = {TensorProto.FLOAT16: 2.0**-14, TensorProto.FLOAT: float(np.finfo(np.float32).tiny)}


@dataclass
class Finding:
    rule: str
    verdict: str = OK
    offenders: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def count(self) -> int:
        return len(self.offenders)

    def to_json(self) -> dict:
        return {"rule": self.rule, "verdict": self.verdict, "count": self.count, "offenders": self.offenders[:10],
                "note": self.note, "why": WHY[self.rule]}


WHY = {
    "opset": "the parser refuses a model whose opset it does not know",
    "operators": "the parser fails on an operator it has no importer for",
    "typing.io": "a typed engine binds its inputs and outputs in the file's types",
    "typing.compute": "TensorRT 10/11 build every tensor in the file's type (an FP32 graph is an FP32 engine); "
                      "TensorRT 8 takes precision from builder flags",
    "typing.casts": "a Cast FP16 -> FP32 -> FP16 that feeds nothing else costs two kernels and changes nothing",
    "qdq.coverage": "a conv or matmul runs in INT8 only when both its data and weight come through Q/DQ; "
                    "with one of them it runs in float",
    "qdq.zero_point": "TensorRT quantizes symmetrically: a zero point other than INT8 0 is refused",
    "qdq.weights": "weights must be quantized per output channel (axis 0, ConvTranspose 1), one scale a channel",
    "qdq.activations": "activations must be quantized per tensor (one scale)",
    "qdq.scales": "a zero, negative, infinite or subnormal scale makes the layer's INT8 values meaningless",
    "qdq.residual": "conv + add fuse into one INT8 kernel when exactly the add's other input is quantized",
    "qdq.concat": "a concat stays INT8 only when all its inputs share one scale; otherwise TensorRT requantizes",
    "qdq.dead": "a Q/DQ pair that feeds nothing quantizable only adds a requantization",
    "qdq.passthrough": "different scales on the two sides of a pass-through op force a requantize",
    "contract": "CUDA-BEVFusion's runtime binds these files' tensors by name, shape and type",
}


def opset(g: GraphView, target: str) -> Finding:
    lo, hi = OPSETS[target]
    bad = not lo <= g.opset <= hi
    note = f"opset {g.opset}; TensorRT {target} takes {lo}..{hi}"
    if g.opset < 19 and any(n.op_type in QDQ and g.types.get(n.input[1]) == TensorProto.FLOAT16 for n in g.nodes):
        return Finding("opset", ERROR, [f"opset {g.opset}"], note + "; Q/DQ with FP16 scales need opset 19")
    return Finding("opset", ERROR if bad else OK, [f"opset {g.opset}"] if bad else [], note)


def operators(g: GraphView, target: str) -> Finding:
    onnx_ops = [n for n in g.nodes if n.domain in ("", "ai.onnx")]
    refused = sorted({n.op_type for n in onnx_ops if n.op_type in unsupported(target)})
    if refused:
        return Finding("operators", ERROR, refused, "not supported by the parser")
    unknown = sorted({n.op_type for n in onnx_ops if n.op_type not in known(target)})
    plugins = sorted({f"{n.domain}::{n.op_type}" for n in g.nodes if n.domain not in ("", "ai.onnx")})
    note = "; ".join(x for x in ("not in the parser's table" if unknown else "",
                                 "other domains need a TensorRT plugin" if plugins else "") if x)
    return Finding("operators", WARNING if unknown or plugins else OK, unknown + plugins, note)


def _float(g: GraphView, tensor: str) -> int | None:
    t = g.types.get(tensor)
    return t if t in FLOATS else None


def typing_io(g: GraphView, target: str) -> Finding:
    fp32_io = target == "8" or g.io == "fp32"  # a typed file that declares FP32 bindings has their Casts
    want = TensorProto.FLOAT if fp32_io else TensorProto.FLOAT16
    off = [f"{n}: {NAMES.get(_float(g, n), '?')}" for n in (*g.inputs, *g.outputs)
           if _float(g, n) is not None and _float(g, n) != want]
    note = f"bindings should be {NAMES[want]}" + ("" if fp32_io else " (FP32 bindings need a Cast in the file)")
    if g.io == "fp32" and target != "8":
        note = "FP32 bindings, as the file declares (io=fp32)"
    return Finding("typing.io", WARNING if off else OK, off, note)


def typing_compute(g: GraphView, target: str) -> Finding:
    io = set(g.inputs) | set(g.outputs)
    computed = [(n, _float(g, o)) for n in g.nodes for o in n.output if _float(g, o) is not None and o not in io]
    if target == "8":
        off = [g.label(n) for n, t in computed if t != TensorProto.FLOAT]
        return Finding("typing.compute", WARNING if off else OK, off, "FP16 tensors in a classic graph" if off else "")
    declared = {n.name for n in declared_islands(g.proto)}
    fp32 = [n for n, t in computed if t == TensorProto.FLOAT and n.op_type not in ("Cast", "Constant")]
    fp16 = [n for n, t in computed if t == TensorProto.FLOAT16]
    undeclared = [g.label(n) for n in fp32 if n.name not in declared]
    # TensorRT 11 builds strongly typed networks only; 10 still builds a weakly typed one with --fp16
    # (deprecated since 10.12), so there FP32 compute is a warning.
    verdict = ERROR if target == "11" else WARNING
    weak = "" if target == "11" else "; TensorRT 10 can still build it weakly typed with --fp16 (deprecated since 10.12)"
    if undeclared and not fp16:
        what = ("every layer outside Q/DQ runs in FP32 (the quantized convs still run INT8)" if _has_qdq(g)
                else "an FP32 graph: a strongly typed build makes an FP32 engine of it")
        return Finding("typing.compute", verdict, undeclared, what + weak)
    island = len(fp32) - len(undeclared)
    note = f"{island} nodes in FP32 islands the file declares (lean.fp32)" if island else ""
    if undeclared:
        return Finding("typing.compute", verdict, undeclared,
                       "FP32 compute the file does not declare" + (f"; {note}" if note else "") + weak)
    return Finding("typing.compute", OK, [], note)


def typing_casts(g: GraphView, target: str) -> Finding:
    off = []
    for n in g.nodes:
        if n.op_type == "Cast" and g.types.get(n.output[0]) == TensorProto.FLOAT and \
                g.types.get(n.input[0]) == TensorProto.FLOAT16:
            back = g.consumers.get(n.output[0], [])
            if back and all(c.op_type == "Cast" and g.types.get(c.output[0]) == TensorProto.FLOAT16 for c in back):
                off.append(g.label(n))
    return Finding("typing.casts", WARNING if off else OK, off)


def _has_qdq(g: GraphView) -> bool:
    return any(n.op_type in QDQ for n in g.nodes)


def qdq_coverage(g: GraphView, target: str) -> Finding:
    if not _has_qdq(g):
        return Finding("qdq.coverage", OK, [], "no Q/DQ: a float graph")
    data_only, weight_only, float_ = [], [], []
    for n in (n for n in g.nodes if n.op_type in MAC_OPS):
        q = g.quantized_inputs(n)
        if not all(q):
            (data_only if q[0] else weight_only if q[1] else float_).append(g.label(n))
    if data_only:
        return Finding("qdq.coverage", ERROR, data_only, "data quantized, weight float: the layer runs in float")
    off = weight_only + float_
    note = "; ".join(x for x in (f"{len(weight_only)} weight-only" if weight_only else "",
                                 f"{len(float_)} float (on purpose?)" if float_ else "") if x)
    return Finding("qdq.coverage", WARNING if off else OK, off, note)


def qdq_zero_point(g: GraphView, target: str) -> Finding:
    errors, absent = [], []
    for n in (n for n in g.nodes if n.op_type in QDQ):
        if len(n.input) < 3 or not n.input[2]:
            absent.append(g.label(n))
            continue
        zp = g.constants.get(n.input[2])
        if zp is None or zp.dtype == np.uint8 or np.asarray(zp, np.float64).any():
            errors.append(g.label(n))
    if errors:
        return Finding("qdq.zero_point", ERROR, errors, "must be a constant 0 (INT8 or FP8)")
    return Finding("qdq.zero_point", WARNING if absent else OK, absent,
                   "no zero point: ONNX then means UINT8" if absent else "")


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def qdq_weights(g: GraphView, target: str) -> Finding:
    errors, per_tensor = [], []
    for n in (n for n in g.nodes if n.op_type in ("Conv", "ConvTranspose")):
        dq = g.dq(n.input[1])
        if dq is None:
            continue
        scale, weight = g.constants.get(dq.input[1]), g.shapes.get(n.input[1])
        want = 1 if n.op_type == "ConvTranspose" else 0
        if scale is None or not weight:
            errors.append(g.label(n))
        elif scale.size == 1:
            per_tensor.append(g.label(n))
        elif _axis(dq) % len(weight) != want or scale.size != weight[want]:
            errors.append(g.label(n))
    if errors:
        return Finding("qdq.weights", ERROR, errors, "scale not per output channel")
    return Finding("qdq.weights", WARNING if per_tensor else OK, per_tensor, "per-tensor weights" if per_tensor else "")


def qdq_activations(g: GraphView, target: str) -> Finding:
    off = [g.label(n) for n in g.nodes if n.op_type in QDQ and not g.is_constant(n.input[0])
           and (g.constants.get(n.input[1]) is None or g.constants[n.input[1]].size != 1)]
    return Finding("qdq.activations", ERROR if off else OK, off)


def qdq_scales(g: GraphView, target: str) -> Finding:
    off = []
    for n in (n for n in g.nodes if n.op_type in QDQ):
        s = g.constants.get(n.input[1])
        kind = g.types.get(n.input[1])
        low = NORMAL_MIN.get(kind, 0.0)
        s64 = None if s is None else s.astype(np.float64)
        if s64 is None or not np.all(np.isfinite(s64)) or not np.all(s64 > 0) or not np.all(s64 >= low):
            off.append(g.label(n))
    return Finding("qdq.scales", ERROR if off else OK, off, "must be finite, positive and normal in their type")


def qdq_residual(g: GraphView, target: str) -> Finding:
    off, fused = [], 0
    for n in (n for n in g.nodes if n.op_type == "Add"):
        conv = [g.producer.get(i) for i in n.input]
        if not any(c is not None and c.op_type == "Conv" and all(g.quantized_inputs(c)) for c in conv) \
                or any(g.is_constant(i) for i in n.input):  # a bias add, not a residual
            continue
        quantized = sum(g.dq(i) is not None for i in n.input)
        if quantized == 1:
            fused += 1
        else:
            off.append(g.label(n))
    return Finding("qdq.residual", WARNING if off else OK, off, f"{fused} fusable" if fused else "")


def _scale(g: GraphView, dq) -> float | None:
    s = g.constants.get(dq.input[1])
    return float(s.reshape(-1)[0]) if s is not None and s.size == 1 else None


def qdq_concat(g: GraphView, target: str) -> Finding:
    off = []
    for n in (n for n in g.nodes if n.op_type == "Concat"):
        dqs = [g.dq(i) for i in n.input]
        scales = {_scale(g, d) for d in dqs} if dqs and all(dqs) else set()
        if None not in scales and len(scales) > 1:
            off.append(g.label(n))
    return Finding("qdq.concat", WARNING if off else OK, off)


def qdq_dead(g: GraphView, target: str) -> Finding:
    quantizable = (*MAC_OPS, "Add", "Concat", "QuantizeLinear", "AveragePool", "GlobalAveragePool")
    off = [g.label(n) for n in g.nodes if n.op_type == "DequantizeLinear" and not g.is_constant(n.input[0])
           and not g.reaches(n.output[0], quantizable)]
    return Finding("qdq.dead", WARNING if off else OK, off)


def qdq_passthrough(g: GraphView, target: str) -> Finding:
    off = []
    for n in (n for n in g.nodes if n.op_type in PASS_THROUGH):
        dq = g.dq(n.input[0]) if n.input else None
        if dq is None:
            continue
        before = _scale(g, dq)
        after = {_scale(g, c) for c in g.consumers.get(n.output[0], []) if c.op_type == "QuantizeLinear"}
        if before is not None and None not in after and after - {before}:
            off.append(g.label(n))
    return Finding("qdq.passthrough", WARNING if off else OK, off)


def contract(g: GraphView, target: str) -> Finding:
    if g.name not in SPECS:
        return Finding("contract", OK, [], "not one of the contract's files")
    problems = shape_problems(g.name, {n: g.shapes.get(n, []) for n in (*g.inputs, *g.outputs)})
    return Finding("contract", ERROR if problems else OK, problems)


RULES = (opset, operators, typing_io, typing_compute, typing_casts, qdq_coverage, qdq_zero_point, qdq_weights,
         qdq_activations, qdq_scales, qdq_residual, qdq_concat, qdq_dead, qdq_passthrough, contract)
