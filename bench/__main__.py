"""``make bench``: export, floor, calibration, ONNX Runtime latency and BEV pooling, in one run.

    python -m bench                  # CPU
    python -m bench --device cuda    # on a GPU machine, after `make model`

Writes bench/results/<machine>.json and that machine's table in BENCHMARKS.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench.suite import PARTS, BenchOptions, render, run_bench
from lean import cli
from lean.errors import LeanError
from lean.config import DEMO_FLOAT_CKPT, DEMO_PTQ_CKPT


def parser():
    p = cli.new_parser(__doc__, "python -m bench")
    p.add_argument("--ckpt", type=Path, default=DEMO_PTQ_CKPT, help=f"PTQ checkpoint to export (default {DEMO_PTQ_CKPT})")
    p.add_argument("--float-ckpt", type=Path, default=DEMO_FLOAT_CKPT,
                   help=f"float checkpoint to calibrate (default {DEMO_FLOAT_CKPT})")
    cli.add_data(p, "example-data folder")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to measure (default cpu)")
    p.add_argument("--only", default="", help=f"comma-separated parts to measure ({', '.join(PARTS)}); "
                   "the others are kept from the results file (default: all)")
    p.add_argument("--render", type=Path, metavar="JSON", help="only re-render a results file's table into BENCHMARKS.md")
    return p


def main(args) -> None:
    if args.render:
        render(args.render)
        return
    parts = tuple(p for p in args.only.split(",") if p)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise LeanError(f"--only: unknown part {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    print(run_bench(BenchOptions(ckpt=args.ckpt, float_ckpt=args.float_ckpt, data=args.data, device=args.device,
                                 parts=parts)))


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
