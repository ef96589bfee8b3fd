"""ONNX proto -> simplified proto (onnxsim: constant folding, shape inference, dead-node removal)."""

from __future__ import annotations

from lean.errors import LeanError


def simplify(model):
    import onnxsim

    simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise LeanError("onnxsim's own check failed on the simplified graph: re-run with --no-simplify and report it")
    return simplified
