#!/usr/bin/env python3
"""Export BEVFusion's camera branch to camera.backbone.onnx and camera.vtransform.onnx.

    python export_camera.py --ckpt model/resnet50int8/bevfusion_ptq.pth          # INT8 (Q/DQ)
    python export_camera.py --ckpt model/resnet50int8/bevfusion_ptq.pth --fp16   # FP16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lean.cli import add_common, log, run

DEFAULT_CKPT = Path("model/resnet50int8/bevfusion_ptq.pth")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT,
                   help="PTQ checkpoint (INT8), or any checkpoint with --fp16 (default: the demo PTQ one)")
    p.add_argument("--fp16", action="store_true", help="export the float graph for an FP16 engine (no Q/DQ)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default qat/onnx_int8 or qat/onnx_fp16)")
    p.add_argument("--opset", type=int, default=13, help="ONNX opset, 13 or newer (default 13)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run (default auto)")
    p.add_argument("--no-simplify", dest="simplify", action="store_false", help="skip onnxsim")
    p.add_argument("--data", type=Path, default=Path("example-data"), help="example-data folder for validation")
    rig = p.add_argument_group("rig (default: from the checkpoint)")
    rig.add_argument("--backbone", choices=("resnet50", "swint"), default=None)
    rig.add_argument("--image-size", default=None, help="HxW network input, e.g. 256x704")
    rig.add_argument("--cameras", type=int, default=None, help="cameras per sample (default 6)")
    rig.add_argument("--xbound", default=None, help="BEV x range LOW,HIGH,STEP in metres (default -54,54,0.3)")
    rig.add_argument("--ybound", default=None, help="BEV y range LOW,HIGH,STEP in metres (default -54,54,0.3)")
    rig.add_argument("--rebuild-frustum", action="store_true",
                     help="derive the frustum and BEV grid buffers for --image-size/--xbound/--ybound")
    check = p.add_argument_group("end-to-end check")
    check.add_argument("--check-bev", dest="check_bev", action="store_true", default=None,
                       help="compare the whole chain (ONNX + BEV pooling) with PyTorch (default: on)")
    check.add_argument("--no-check-bev", dest="check_bev", action="store_false")
    check.add_argument("--plot", action="store_true", help="write PNGs of the BEV maps and their difference")
    add_common(p)
    return p


def main(args) -> None:
    from lean.config import parse_bound, parse_image_size
    from lean.errors import LeanError

    if args.opset < 13:
        raise LeanError(f"--opset {args.opset} is too old: per-channel Q/DQ needs opset 13 or newer")
    from lean.export import ExportOptions, export_camera, summary_table

    opts = ExportOptions(
        ckpt=args.ckpt, out_dir=args.out, fp16=args.fp16, opset=args.opset, device=args.device,
        simplify=args.simplify, data=args.data, backbone=args.backbone,
        image_size=parse_image_size(args.image_size) if args.image_size else None, cameras=args.cameras,
        xbound=parse_bound(args.xbound, "xbound") if args.xbound else None,
        ybound=parse_bound(args.ybound, "ybound") if args.ybound else None,
        rebuild_frustum=args.rebuild_frustum, check_bev=args.check_bev, plot=args.plot, log=log,
    )
    report = export_camera(opts)
    print(summary_table(report))
    print(f"report: {report.out_dir / 'report.json'}")


if __name__ == "__main__":
    sys.exit(run(main, parser=parser()))
