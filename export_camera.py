#!/usr/bin/env python3
"""Export BEVFusion's camera branch to camera.backbone.onnx and camera.vtransform.onnx.

    python export_camera.py --ckpt model/resnet50int8/bevfusion_ptq.pth          # INT8 (Q/DQ)
    python export_camera.py --ckpt model/resnet50int8/bevfusion_ptq.pth --fp16   # FP16
"""

from __future__ import annotations

import sys
from pathlib import Path

from lean import cli
from lean.config import DEMO_PTQ_CKPT
from lean.errors import LeanError
from lean.export import REPORT_FILE, ExportOptions, export_camera
from lean.report import summary_table


def parser():
    p = cli.new_parser(__doc__)
    p.add_argument("--ckpt", type=Path, default=DEMO_PTQ_CKPT,
                   help="PTQ checkpoint (INT8), or any checkpoint with --fp16 (default: the demo PTQ one)")
    p.add_argument("--fp16", action="store_true", help="export the float graph for an FP16 engine (no Q/DQ)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default qat/onnx_int8 or qat/onnx_fp16)")
    p.add_argument("--opset", type=int, default=13, help="ONNX opset, 13 or newer (default 13)")
    cli.add_device(p)
    p.add_argument("--no-simplify", dest="simplify", action="store_false", help="skip onnxsim")
    cli.add_data(p, "example-data folder for validation")
    cli.add_rig(p)
    check = p.add_argument_group("end-to-end check")
    check.add_argument("--check-bev", dest="check_bev", action="store_true", default=None,
                       help="compare the whole chain (ONNX + BEV pooling) with PyTorch (default: on)")
    check.add_argument("--no-check-bev", dest="check_bev", action="store_false")
    check.add_argument("--plot", action="store_true", help="write PNGs of the BEV maps and their difference")
    return p


def main(args) -> None:
    if args.opset < 13:
        raise LeanError(f"--opset {args.opset} is too old: per-channel Q/DQ needs opset 13 or newer")
    opts = ExportOptions(ckpt=args.ckpt, out_dir=args.out, fp16=args.fp16, opset=args.opset, device=args.device,
                         simplify=args.simplify, data=args.data, check_bev=args.check_bev, plot=args.plot,
                         **cli.rig_options(args))
    report = export_camera(opts)
    print(summary_table(report))
    print(f"report: {report.out_dir / REPORT_FILE}")


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
