"""The simplify stage: onnxscript's optimizer on the exported graph (constant folding, common
subexpressions, dead nodes), the same pass ``torch.onnx.export(optimize=True)`` runs.

onnxsim after it changed nothing on any of our graphs (BENCHMARKS.md), so it is no longer run.
"""

from __future__ import annotations


def simplify(model) -> tuple[int, int]:
    """Optimize an ``onnx_ir.Model`` in place; returns its node count before and after."""
    import onnxscript.optimizer

    before = node_count(model)
    onnxscript.optimizer.optimize_ir(model)
    return before, node_count(model)


def node_count(model) -> int:
    return len(model.graph)
