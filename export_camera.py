#!/usr/bin/env python3
"""Export BEVFusion's camera branch to camera.backbone.onnx and camera.vtransform.onnx.

    python export_camera.py --ckpt model/resnet50int8/bevfusion_ptq.pth          # INT8 (Q/DQ)
    python export_camera.py --ckpt model/resnet50int8/bevfusion_ptq.pth --fp16   # FP16
    python export_camera.py --tensorrt 8 ...    # classic graphs for TensorRT 8.5/8.6 (JetPack 5/6.0)
"""

from __future__ import annotations

import sys
from pathlib import Path

from lean import cli
from lean.config import DEMO_PTQ_CKPT
from lean.export import REPORT_FILE, ExportOptions, export_camera
from lean.report import summary_table
from lean.target import DEFAULT_TARGET, TARGETS


def parser():
    p = cli.new_parser(__doc__, "python export_camera.py")
    p.add_argument("--ckpt", type=Path, default=DEMO_PTQ_CKPT,
                   help="PTQ checkpoint (INT8), or any checkpoint with --fp16 (default: the demo PTQ one)")
    p.add_argument("--fp16", action="store_true", help="export the float graph for an FP16 engine (no Q/DQ)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default qat/onnx_int8 or qat/onnx_fp16)")
    p.add_argument("--tensorrt", choices=tuple(TARGETS), default=DEFAULT_TARGET,
                   help="TensorRT the graphs are for: 10 or 11 build strongly typed graphs (FP16 tensors and I/O, "
                        "INT8 as Q/DQ with FP16 scales); 8 (JetPack 5/6.0) builds classic FP32 graphs with "
                        f"--fp16/--int8 flags (default {DEFAULT_TARGET}, whose build command also works on 11)")
    p.add_argument("--io", choices=("fp16", "fp32"), default=None,
                   help="type of the inputs and outputs of a typed graph (default fp16, as CUDA-BEVFusion binds them)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the target's, 19 typed, 13 classic)")
    cli.add_device(p)
    p.add_argument("--no-simplify", dest="simplify", action="store_false", help="skip the onnxscript optimizer (constant folding, dead nodes)")
    cli.add_data(p, "example-data folder, or a folder of them: validation on the first, ranges on all")
    fp32 = p.add_argument_group("FP32 islands (typed graphs; --tensorrt 8: build flags)")
    fp32.add_argument("--keep-fp32", metavar="GLOB[,GLOB]", default=None,
                      help="keep these modules FP32, by path in the camera branch: backbone.layer3.2.conv2, "
                           "backbone.stages.2.*, neck.*")
    fp32.add_argument("--no-fp32-islands", dest="fp32_islands", action="store_false",
                      help="all-FP16 typed graphs: a tensor past FP16's range is then an error")
    cli.add_rig(p)
    check = p.add_argument_group("end-to-end check")
    check.add_argument("--check-bev", dest="check_bev", action="store_true", default=None,
                       help="compare the whole chain (ONNX + BEV pooling) with PyTorch (default: on)")
    check.add_argument("--no-check-bev", dest="check_bev", action="store_false")
    check.add_argument("--plot", action="store_true", help="write PNGs of the BEV maps and their difference")
    check.add_argument("--no-engine-check-files", dest="engine_check_files", action="store_false",
                       help="leave out the Polygraphy inputs and reference outputs written beside each file "
                            "(<graph>.inputs.json, <graph>.outputs.json) that check the built engine")
    return p


def main(args) -> None:
    opts = ExportOptions(ckpt=args.ckpt, out_dir=args.out, fp16=args.fp16, tensorrt=args.tensorrt, io=args.io,
                         opset=args.opset, device=args.device,
                         simplify=args.simplify, data=args.data, check_bev=args.check_bev, plot=args.plot,
                         keep_fp32=args.keep_fp32, fp32_islands=args.fp32_islands,
                         engine_check_files=args.engine_check_files,
                         **cli.rig_options(args))
    report = export_camera(opts)
    # Paths come from the user: shown escaped, as in error lines.
    print("\n".join(cli.one_line(line) for line in summary_table(report).splitlines()))
    print(f"report: {cli.one_line(report.out_dir / REPORT_FILE)}")


def entry() -> None:
    """The installed command (pyproject.toml)."""
    cli.console(main, parser())


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
