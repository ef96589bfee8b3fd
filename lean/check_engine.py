"""Check a built engine's outputs by the export's own criteria, one line a verdict per output:
NaN/Inf count, cosine, and the max error in INT8 steps of the output's range. The same verdict the
printed ``polygraphy run`` command gives, in the export's terms, from saved outputs: for a
Polygraphy without ``--compare cosine_similarity`` (older releases), for outputs saved by a run
with other settings (Polygraphy's default elementwise tolerances say little about an INT8 engine,
whose rounding flips spread), or for a log that keeps the figures.

    polygraphy run qat/onnx_int8/camera.backbone.plan --model-type engine --trt \\
        --load-inputs qat/onnx_int8/camera.backbone.inputs.json \\
        --save-outputs qat/onnx_int8/camera.backbone.engine-outputs.json
    python -m lean.check_engine qat/onnx_int8/camera.backbone.engine-outputs.json \\
        qat/onnx_int8/camera.backbone.outputs.json

The criteria are the export's for the precision the engine computes in (a classic graph's engine
computes in FP16 too: its typed twin's bounds), read from report.json beside the reference
outputs (or --precision). One line a verdict per output; exit 1 when
any output fails. Needs numpy and Polygraphy only: no PyTorch, no TensorRT.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lean import cli
from lean.engine_check import CheckOptions, check_engine


def parser():
    p = cli.new_parser(__doc__, "python -m lean.check_engine")
    p.add_argument("engine_outputs", type=Path, metavar="ENGINE_OUTPUTS.json",
                   help="what polygraphy run --save-outputs wrote for the engine")
    p.add_argument("reference", type=Path, metavar="REFERENCE.json",
                   help="the export's <graph>.outputs.json (ONNX Runtime's outputs of the validated file)")
    p.add_argument("--precision", choices=("fp16", "int8"), default=None,
                   help="the export's precision (default: from report.json beside REFERENCE.json)")
    return p


def main(args) -> int:
    verdicts, source = check_engine(CheckOptions(args.engine_outputs, args.reference, args.precision))
    print(f"{args.engine_outputs} against {args.reference}, criteria from {source}:")
    for v in verdicts:
        print("  " + v.line())
    failed = [v for v in verdicts if not v.ok]
    print(f"{len(verdicts) - len(failed)} of {len(verdicts)} outputs pass" + (": the engine does not compute what the "
                                                                               "export validated" if failed else ""))
    return 1 if failed else 0


def entry() -> None:
    """The installed command (pyproject.toml)."""
    cli.console(main, parser())


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
