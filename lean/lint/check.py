"""Lint one ONNX graph for a TensorRT target: every rule's finding and the MAC split."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lean.errors import LeanError, first_line
from lean.lint.graph import GraphView
from lean.lint.macs import describe, mac_split
from lean.lint.rules import ERROR, RULES, WARNING, Finding
from lean.target import DEFAULT_TARGET, TARGETS


@dataclass
class LintResult:
    file: str
    target: str
    findings: list[Finding]
    macs: dict[str, int] = field(default_factory=dict)
    target_from: str = "given"  # or "the file's metadata", or "default"

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.verdict == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.verdict == WARNING]

    @property
    def verdict(self) -> str:
        return ERROR if self.errors else WARNING if self.warnings else "ok"

    def summary(self) -> str:
        source = "" if self.target_from == "given" else f" ({self.target_from})"
        return (f"{self.file}: TensorRT {self.target}{source}: {len(self.errors)} errors, {len(self.warnings)} warnings; "
                f"MACs {describe(self.macs)}")

    def to_json(self) -> dict:
        return {"file": self.file, "target": self.target, "verdict": self.verdict, "macs": self.macs,
                "macs_text": describe(self.macs), "findings": [f.to_json() for f in self.findings]}


def lint_model(proto, target: str, name: str = "graph") -> LintResult:
    return lint_view(GraphView(proto, name), target)


def lint_view(g: GraphView, target: str) -> LintResult:
    """The lint of a graph already viewed (its shape inference shared with the caller)."""
    if target not in TARGETS:
        raise LeanError(f"unknown --target {target!r}: choose one of {', '.join(TARGETS)}")
    return LintResult(g.name, target, [rule(g, target) for rule in RULES], mac_split(g))


def declared(proto) -> dict[str, str]:
    """What a file says of itself in its metadata (ours: ``tensorrt``, ``io``, ...)."""
    return {p.key: p.value for p in proto.metadata_props}


def lint_file(path, target: str | None = None) -> LintResult:
    """Lint ``path`` for ``target``; None: the TensorRT the file declares, else the default."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise LeanError(f"{path} does not exist: pass an ONNX file")
    try:
        proto = onnx.load(str(path))  # external data, if any, from beside the file
        onnx.checker.check_model(proto)
    except Exception as e:  # noqa: BLE001 - onnx raises DecodeError, ValidationError, ... on junk
        raise LeanError(f"{path} is not a valid ONNX model ({type(e).__name__}: {first_line(e)})") from None
    meta = declared(proto)
    source = "given"
    if target is None:
        own = meta.get("tensorrt")
        target, source = (own, "the file's metadata") if own in TARGETS else (DEFAULT_TARGET, "default")
    try:
        result = lint_model(proto, target, path.name)
        result.target_from = source
        return result
    except LeanError:
        raise
    except Exception as e:  # noqa: BLE001 - a graph the checker let through but no rule can read
        raise LeanError(f"{path}: cannot lint this graph ({type(e).__name__}: {first_line(e)})") from None
