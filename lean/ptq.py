"""INT8 post-training quantization: float checkpoint -> calibrated PTQ checkpoint.

    python -m lean.ptq --ckpt model/resnet50/bevfusion-det.pth --out model/resnet50int8/bevfusion_ptq.pth
"""

from __future__ import annotations

import sys
from pathlib import Path

from lean import cli
from lean.config import DEMO_FLOAT_CKPT, DEMO_PTQ_CKPT
from lean.quant.modelopt import CALIBRATION_METHODS
from lean.quantize import PTQOptions, run_ptq


def parser():
    p = cli.new_parser(__doc__)
    p.add_argument("--ckpt", type=Path, default=DEMO_FLOAT_CKPT, help=f"float checkpoint (default {DEMO_FLOAT_CKPT})")
    p.add_argument("--out", type=Path, default=DEMO_PTQ_CKPT, help=f"PTQ checkpoint to write (default {DEMO_PTQ_CKPT})")
    cli.add_data(p, "an example-data folder, or a folder of them (one sample each)")
    p.add_argument("--method", choices=CALIBRATION_METHODS, default="mse", help="activation amax method (default mse)")
    p.add_argument("--batches", type=int, default=None, help="calibration batches (default: one per sample)")
    cli.add_device(p)
    cli.add_cameras(p)
    p.add_argument("--quantize-downsample", action="store_true", help="also quantize the vtransform downsample")
    return p


def main(args) -> None:
    run_ptq(PTQOptions(ckpt=args.ckpt, out=args.out, data=args.data, method=args.method, batches=args.batches,
                       device=args.device, cameras=args.cameras, quantize_downsample=args.quantize_downsample))


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
