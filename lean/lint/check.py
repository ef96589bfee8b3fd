"""Lint one ONNX graph for a TensorRT target: every rule's finding and the MAC split."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lean.errors import LeanError
from lean.lint.graph import GraphView
from lean.lint.macs import describe, mac_split
from lean.lint.rules import ERROR, RULES, WARNING, Finding
from lean.target import TARGETS


@dataclass
class LintResult:
    file: str
    target: str
    findings: list[Finding]
    macs: dict[str, int] = field(default_factory=dict)

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
        return (f"{self.file}: TensorRT {self.target}: {len(self.errors)} errors, {len(self.warnings)} warnings; "
                f"MACs {describe(self.macs)}")

    def to_json(self) -> dict:
        return {"file": self.file, "target": self.target, "verdict": self.verdict, "macs": self.macs,
                "macs_text": describe(self.macs), "findings": [f.to_json() for f in self.findings]}


def lint_model(proto, target: str, name: str = "graph") -> LintResult:
    if target not in TARGETS:
        raise LeanError(f"unknown --target {target!r}: choose one of {', '.join(TARGETS)}")
    g = GraphView(proto, name)
    return LintResult(name, target, [rule(g, target) for rule in RULES], mac_split(g))


def lint_file(path, target: str) -> LintResult:
    import onnx

    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise LeanError(f"{path} does not exist: pass an ONNX file") from None
    except Exception as e:  # noqa: BLE001 - onnx raises DecodeError, ValueError, ... on junk
        raise LeanError(f"{path} is not an ONNX model ({type(e).__name__}): pass an .onnx file") from None
    return lint_model(proto, target, path.name)
