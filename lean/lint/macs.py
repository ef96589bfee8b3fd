"""Where the work runs: multiply-accumulates of each Conv/ConvTranspose/Gemm/MatMul, from the
graph's static shapes, by the precision TensorRT runs it in (INT8 when both operands come
through Q/DQ, else the type of its output)."""

from __future__ import annotations

import math

from lean.lint.graph import MAC_OPS, GraphView
from lean.typecheck import NAMES


def node_macs(g: GraphView, node) -> int:
    out = g.shapes.get(node.output[0]) or []
    weight = (g.shapes.get(node.input[1]) or []) if len(node.input) > 1 else []
    if not out or not weight or 0 in out:
        return 0
    if node.op_type == "Conv":  # weight [Cout, Cin/groups, k...]
        return math.prod(out) * math.prod(weight[1:])
    if node.op_type == "ConvTranspose":  # weight [Cin, Cout/groups, k...]
        data = g.shapes.get(node.input[0]) or []
        return math.prod(data) * math.prod(weight[1:]) if data else 0
    if node.op_type == "Gemm":  # K: B's first axis, its second with transB
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return math.prod(out) * weight[trans_b] if len(weight) == 2 else 0
    return math.prod(out) * (weight[-2] if len(weight) > 1 else weight[-1])  # MatMul: K of B


def mac_split(g: GraphView) -> dict[str, int]:
    split: dict[str, int] = {}
    for node in (n for n in g.nodes if n.op_type in MAC_OPS):
        kind = "INT8" if all(g.quantized_inputs(node)) else NAMES.get(g.types.get(node.output[0]), "other")
        split[kind] = split.get(kind, 0) + node_macs(g, node)
    return split


def describe(split: dict[str, int]) -> str:
    total = sum(split.values())
    if not total:
        return "no MACs"
    parts = sorted(split.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{100 * v / total:.1f}% in {k}" for k, v in parts) + f" of {_count(total)}"


def _count(macs: int) -> str:
    """MACs in the unit that fits: 15.1 GMAC, 11.2 MMAC, 3.5 kMAC, 12 MAC."""
    for unit, size in (("GMAC", 1e9), ("MMAC", 1e6), ("kMAC", 1e3)):
        if macs >= size:
            return f"{macs / size:.1f} {unit}"
    return f"{macs} MAC"
