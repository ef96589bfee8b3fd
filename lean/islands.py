"""FP32 islands: which nodes of a typed graph compute in FP32, and why.

A tensor whose measured max |x| (``lean.ranges``) is above the bound would overflow FP16, or sit
too close to it for inputs the data did not show: the node that makes it and every node that
reads it run in FP32, with Casts at the island's edges (``lean.widen``). A DequantizeLinear that
feeds an island node joins it (it then dequantizes straight to FP32, which TensorRT fuses into the
INT8 layer); a quantized layer in an island still runs INT8. Modules the user names with
``--keep-fp32`` join as well. Each island is one connected group of such nodes, reported with the
tensor that made it, its measured max and the bound.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field

from lean.errors import LeanError
from lean.names import MODULE
from lean.ranges import FP16_MAX, Ranges, tensor_key
from lean.widen import widen


@dataclass
class Island:
    nodes: list[str]
    tensor: str | None  # the largest tensor in it (None: kept by --keep-fp32 only)
    max: float | None
    bound: float | None
    kept: list[str] = field(default_factory=list)  # the --keep-fp32 globs that put nodes here

    def to_json(self) -> dict:
        return {"nodes": self.nodes, "tensor": self.tensor, "max": self.max, "bound": self.bound,
                "keep_fp32": self.kept}


def parse_globs(text: str | None) -> list[str]:
    """``--keep-fp32 'a.*,b'`` -> ['a.*', 'b']; module paths are relative to the camera branch."""
    return [g.strip() for g in (text or "").split(",") if g.strip()]


def kept_nodes(model, globs: list[str]) -> dict[str, str]:
    """Node name -> the glob that keeps it FP32: a node is kept when its module, or a module it lies
    in, matches. Only globs this graph can match are checked here (see ``check_globs``)."""
    out = {}
    for node in model.graph:
        path = node.metadata_props.get(MODULE, "")
        parts = path.split(".") if path else []
        scopes = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
        for glob in globs:
            if any(fnmatch.fnmatchcase(s, glob) for s in scopes):
                out[node.name] = glob
                break
    return out


def check_globs(globs: list[str], modules: set[str]) -> None:
    """Every ``--keep-fp32`` glob must match a module of the camera branch (``modules``: their paths)."""
    for glob in globs:
        if not any(fnmatch.fnmatchcase(m, glob) for m in modules):
            near = difflib.get_close_matches(glob, sorted(modules), n=3, cutoff=0.4)
            hint = f"; near: {', '.join(near)}" if near else ""
            raise LeanError(f"--keep-fp32 {glob} matches no module of the camera branch (paths are relative to it, "
                            f"e.g. backbone.layer3.2.conv2 or neck.*){hint}")


def choose(model, ranges: Ranges, bound: float, kept: dict[str, str]) -> tuple[set[str], dict[str, str]]:
    """Island nodes of an ``onnx_ir.Model`` and each node's reason."""
    over = {k for k, v in ranges.max.items() if v > bound}
    chosen: dict[str, str] = {}
    for node in model.graph:
        for i, v in enumerate(node.outputs):
            key = tensor_key(node.name, i)
            if key in over:
                chosen.setdefault(node.name, f"makes {key} (max |x| {ranges.max[key]:.4g} > {bound:g})")
                for use in v.uses():
                    chosen.setdefault(use.node.name, f"reads {key} (max |x| {ranges.max[key]:.4g} > {bound:g})")
    for name, glob in kept.items():
        chosen.setdefault(name, f"--keep-fp32 {glob}")
    for node in model.graph:  # a DequantizeLinear feeding an island node dequantizes to FP32
        if node.op_type == "DequantizeLinear" and node.name not in chosen:
            if any(u.node.name in chosen for v in node.outputs for u in v.uses()):
                chosen[node.name] = "dequantizes into an FP32 island"
    return set(chosen), chosen


def overflow_check(ranges: Ranges) -> None:
    """``--no-fp32-islands``: any tensor past FP16's largest value is a one-line error."""
    over = [(k, v) for k, v in ranges.max.items() if v > FP16_MAX]
    if over:
        key, value = over[0]
        module = ranges.modules.get(key) or "(graph)"
        raise LeanError(f"tensor {key} of module {module} reaches max |x| {value:.4g}, past FP16's {FP16_MAX:g}: it "
                        f"overflows in an all-FP16 graph ({len(over)} such tensors); drop --no-fp32-islands")


def make_islands(model, ranges: Ranges, bound: float, kept: dict[str, str], apply: bool = True,
                 source: dict | None = None) -> list[Island]:
    """Choose the islands of ``model``, widen them in place (``apply``, with the FP32 weights of
    ``source``), and describe each."""
    names, reasons = choose(model, ranges, bound, kept)
    if not names:
        return []
    if apply:
        widen(model, names, reasons, source=source)
    return _group(model, names, ranges, bound, kept)


def _group(model, names: set[str], ranges: Ranges, bound: float, kept: dict[str, str]) -> list[Island]:
    """Connected groups of island nodes (through the tensors they share), in graph order."""
    parent = {n: n for n in names}

    def find(n):
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    nodes = [n for n in model.graph if n.name in names]
    for node in nodes:
        for v in node.outputs:
            for use in v.uses():
                if use.node.name in names:
                    parent[find(use.node.name)] = find(node.name)
    groups: dict[str, list] = {}
    for node in nodes:
        groups.setdefault(find(node.name), []).append(node)
    islands = []
    for members in groups.values():
        keys = [tensor_key(n.name, i) for n in members for i in range(len(n.outputs))]
        measured = [(ranges.max[k], k) for k in keys if k in ranges.max and ranges.max[k] > bound]
        top = max(measured) if measured else None
        globs = sorted({kept[n.name] for n in members if n.name in kept})
        islands.append(Island([n.name for n in members], top[1] if top else None, top[0] if top else None,
                              bound if top else None, globs))
    return islands
