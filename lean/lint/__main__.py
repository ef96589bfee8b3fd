"""Lint ONNX files for TensorRT: typing, Q/DQ placement, operators and opset, the contract, MACs.

    python -m lean.lint qat/onnx_int8/camera.backbone.onnx qat/onnx_int8/camera.vtransform.onnx
    python -m lean.lint model.onnx --target 8 --json

Exit 1 when any rule gives an error, 0 otherwise (warnings included).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lean import cli
from lean.lint.check import lint_file
from lean.lint.rules import WHY
from lean.target import DEFAULT_TARGET, TARGETS


def parser():
    p = cli.new_parser(__doc__, "python -m lean.lint")
    p.add_argument("files", type=Path, nargs="+", metavar="FILE.onnx")
    p.add_argument("--target", choices=tuple(TARGETS), default=None,
                   help="the TensorRT to judge for (default: the one the file declares in its metadata, as our "
                        f"exports do, else {DEFAULT_TARGET}: TensorRT 10/11, strongly typed)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout instead of the tables")
    return p


def table(result) -> str:
    rows = [("rule", "verdict", "count", "first offenders / note")]
    for f in result.findings:
        detail = ", ".join(f.offenders[:3]) + (" ..." if f.count > 3 else "")
        rows.append((f.rule, f.verdict, str(f.count), "; ".join(x for x in (detail, f.note) if x)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join([*(c.ljust(w) for c, w in zip(r[:3], widths)), r[3]]) for r in rows]
    lines.insert(1, "  ".join(["-" * w for w in widths] + ["-" * 22]))
    explain = [f"  {f.rule}: {WHY[f.rule]}" for f in result.findings if f.verdict != "ok"]
    return "\n".join([result.summary(), *lines] + (["why:", *explain] if explain else []))


def main(args) -> int:
    results = [lint_file(path, args.target) for path in args.files]
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    else:
        print("\n\n".join(table(r) for r in results))
    return 1 if any(r.errors for r in results) else 0


def entry() -> None:
    """The installed command (pyproject.toml)."""
    cli.console(main, parser())


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
