"""INT8 post-training quantization: float checkpoint -> calibrated PTQ checkpoint.

    python -m lean.ptq --ckpt model/resnet50/bevfusion-det.pth --out model/resnet50int8/bevfusion_ptq.pth
    python -m lean.ptq --ckpt my.pth --out my_ptq.pth --nuscenes /data/nuscenes --split val --samples 300
"""

from __future__ import annotations

import sys
from pathlib import Path

from lean import cli
from lean.config import DEFAULT_DATA, DEMO_FLOAT_CKPT, DEMO_PTQ_CKPT
from lean.errors import LeanError
from lean.nuscenes import DEFAULT_SAMPLES, SPLITS, VERSIONS
from lean.quant.modelopt import CALIBRATION_METHODS
from lean.quantize import PTQOptions, run_ptq


def parser():
    p = cli.new_parser(__doc__, "python -m lean.ptq")
    p.add_argument("--ckpt", type=Path, default=DEMO_FLOAT_CKPT, help=f"float checkpoint (default {DEMO_FLOAT_CKPT})")
    p.add_argument("--out", type=Path, default=DEMO_PTQ_CKPT, help=f"PTQ checkpoint to write (default {DEMO_PTQ_CKPT})")
    cli.add_data(p, "an example-data folder, or a folder of them (one sample each)")
    p.set_defaults(data=None)  # to tell a --data given with --nuscenes
    ns = p.add_argument_group("nuScenes (instead of --data)")
    ns.add_argument("--nuscenes", type=Path, metavar="DATAROOT", help="calibrate on a nuScenes dataroot")
    ns.add_argument("--version", choices=VERSIONS, default="v1.0-trainval", help="table version (default v1.0-trainval)")
    ns.add_argument("--split", choices=sorted({s for v in SPLITS.values() for s in v}),
                    help="scene split (default: val, test or mini_val, by version)")
    ns.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                    help=f"samples, spread over the split's scenes (default {DEFAULT_SAMPLES})")
    ns.add_argument("--seed", type=int, default=0, help="which samples (default 0)")
    p.add_argument("--method", choices=CALIBRATION_METHODS, default="mse", help="activation amax method (default mse)")
    p.add_argument("--batches", type=int, default=None, help="calibration batches (default: one per sample)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes reading the data (default: one per CPU less one, at most 16)")
    cli.add_device(p)
    cli.add_cameras(p)
    p.add_argument("--quantize-downsample", action="store_true", help="also quantize the vtransform downsample")
    return p


def main(args) -> None:
    if args.data is not None and args.nuscenes is not None:
        raise LeanError("pass --data or --nuscenes, not both")
    run_ptq(PTQOptions(ckpt=args.ckpt, out=args.out, data=args.data or DEFAULT_DATA, nuscenes=args.nuscenes, version=args.version,
                       split=args.split, samples=args.samples, seed=args.seed, method=args.method,
                       batches=args.batches, workers=args.workers, device=args.device, cameras=args.cameras,
                       quantize_downsample=args.quantize_downsample))


def entry() -> None:
    """The installed command (pyproject.toml)."""
    cli.console(main, parser())


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
