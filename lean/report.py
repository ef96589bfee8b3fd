"""What an export did, typed: per-graph results, stage times, the report.json body and the
summary table printed at the end."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lean.errors import LeanError
from lean.lint.macs import describe
from lean.log import logger


@dataclass
class GraphResult:
    file: str
    size: int = 0
    nodes: int = 0
    qdq_pairs: int = 0
    seconds: float = 0.0
    outputs: dict = field(default_factory=dict)  # name -> {shape, max_abs_err, cosine, tolerance, ...}
    typing: dict = field(default_factory=dict)  # lean.typecheck's facts
    lint: dict = field(default_factory=dict)  # lean.lint's findings and MAC split
    simplify: dict = field(default_factory=dict)  # nodes before and after
    build_command: str = ""
    fp32_islands: list = field(default_factory=list)  # lean.islands.Island.to_json() of this file
    engine_check: dict = field(default_factory=dict)  # lean.engine_check's files and commands

    @property
    def max_error(self) -> float:
        return max((o["max_abs_err"] for o in self.outputs.values()), default=0.0)

    @property
    def min_cosine(self) -> float:
        return min((o["cosine"] for o in self.outputs.values()), default=1.0)

    def error_text(self) -> str:
        """The max error nearest its bound, with that bound: ``0.132 <= 0.41``."""
        return _with_bound(self.outputs.values())

    def cosine_text(self) -> str:
        return _cosine_with_bound(self.outputs.values())


@dataclass
class ExportReport:
    out_dir: Path
    precision: str
    graphs: list[GraphResult]
    stages: dict[str, float]
    facts: dict

    def to_json(self) -> dict:
        return {
            **self.facts,
            "precision": self.precision,
            "files": {g.file: {k: v for k, v in vars(g).items() if k != "file"} for g in self.graphs},
            "stages_seconds": self.stages,
        }


def report_text(report: ExportReport) -> str:
    """report.json's text; a NaN or Inf figure is an error, never written as a pass (JSON has no NaN)."""
    try:
        return json.dumps(report.to_json(), indent=2, default=str, allow_nan=False) + "\n"
    except ValueError:
        raise LeanError("a figure of the report is NaN or infinite; nothing was written") from None


class Stages:
    """Wall time per named stage, with a progress line as each starts."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.count = 0

    @contextmanager
    def __call__(self, name: str, what: str):
        self.count += 1
        logger.info("[%d] %s ...", self.count, what)
        t = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t


def qdq_pairs(model) -> int:
    """Quantize -> Dequantize pairs of an ONNX proto, plus DequantizeLinear nodes of constant (weight) data."""
    nodes = model.graph.node
    producers = {o: n for n in nodes for o in n.output}
    dq = [n for n in nodes if n.op_type == "DequantizeLinear"]
    paired = sum(1 for n in dq if n.input[0] in producers and producers[n.input[0]].op_type == "QuantizeLinear")
    return paired + sum(1 for n in dq if n.input[0] not in producers)


def _with_bound(outputs) -> str:
    stats = [o for o in outputs if o.get("max_abs_err") is not None]
    if not stats:
        return ""
    o = max(stats, key=lambda o: o["max_abs_err"] / o["tolerance"] if o.get("tolerance") else 0.0)
    return f"{o['max_abs_err']:.3g}" + (f" <= {o['tolerance']:.3g}" if o.get("tolerance") else "")


def _cosine_with_bound(outputs) -> str:
    stats = [o for o in outputs if o.get("cosine") is not None]
    if not stats:
        return ""
    o = min(stats, key=lambda o: o["cosine"])
    return f"{o['cosine']:.6f}" + (f" >= {o['min_cosine']}" if o.get("min_cosine") else "")


def summary_table(report: ExportReport) -> str:
    rows = [("file", "size", "nodes", "Q/DQ", "time", "max error (bound)", "cosine (bound)")]
    for g in report.graphs:
        rows.append((str(report.out_dir / g.file), _size(g.size), str(g.nodes), str(g.qdq_pairs),
                     f"{g.seconds:.1f}s", g.error_text(), g.cosine_text()))
    bev = report.facts.get("bev_check")
    if bev:
        rows.append(("BEV map (ONNX chain vs PyTorch)", "", "", "", f"{bev['seconds']:.1f}s",
                     _with_bound([bev]), _cosine_with_bound([bev])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    linted = [g for g in report.graphs if g.lint]
    if linted:
        lines.append("")
        for g in linted:
            counts = [sum(f["verdict"] == v for f in g.lint["findings"]) for v in ("error", "warning")]
            lines.append(f"lint {g.file}: {counts[0]} errors, {counts[1]} warnings; MACs {g.lint['macs_text']}")
        total = {}
        for g in linted:
            for k, v in g.lint["macs"].items():
                total[k] = total.get(k, 0) + v
        lines.append(f"both files: MACs {describe(total)}")
    target = report.facts.get("target") or {}
    islands = target.get("fp32_islands") or []
    if target.get("fp32_bound") is not None or islands:
        lines += ["", f"FP32 islands: {len(islands)}" + (f" (tensors above max |x| {target['fp32_bound']:g} measured in "
                                                          "FP32 on the data" if target.get("fp32_bound") else " (")
                  + (f"; kept by --keep-fp32 {','.join(target['keep_fp32'])})" if target.get("keep_fp32") else ")")]
        for i in islands:
            why = f"{i['tensor']} max |x| {i['max']:.4g}" if i["tensor"] else f"--keep-fp32 {','.join(i['keep_fp32'])}"
            lines.append(f"  {i['file']}: {len(i['nodes'])} nodes from {i['nodes'][0]}: {why}")
    ckpt = report.facts.get("checkpoint")
    if ckpt:
        lines += ["", f"checkpoint {ckpt['path']}: {ckpt['source_format']} format, {ckpt.get('variant', '?')}"]
    if target:
        lines += ["", f"TensorRT {target['tensorrt']} ({target['runtimes']}): {target['typing']}, I/O {target['io'].upper()}, "
                  f"opset {report.facts.get('opset')}. Build the engines with:"]
        lines += [f"  {g.build_command}" for g in report.graphs]
        checked = [g for g in report.graphs if g.engine_check]
        if checked:
            lines += ["", "Then check each engine against what this export validated (Polygraphy, pip install polygraphy):"]
            lines += [f"  {g.engine_check['command']}" for g in checked]
            lines += ["and by the export's own criteria (cosine, steps, NaN/Inf; numpy and Polygraphy only):"]
            lines += [f"  {g.engine_check['check_command']}" for g in checked]
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
