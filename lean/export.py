"""Export the camera branch to the two ONNX files the CUDA-BEVFusion runtime binds by name.

The orchestration of the stages, each in its own module:
checkpoint (``lean.checkpoint``) -> model (``lean.build``) -> trace (``lean.trace``) ->
simplify (``lean.simplify``) -> validate (``lean.validate``) -> report (``lean.report``).
Every file is first written to a temporary name; all of them (both graphs and report.json) are
renamed into place only after both graphs and the end-to-end check validated.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lean.bev import pool_to_bev
from lean.build import build_model, resolve_config, resolve_device, versions
from lean.checkpoint import read_checkpoint
from lean.config import DEFAULT_DATA
from lean.data import load_inputs
from lean.io import atomic_path, ensure_writable
from lean.models import BackboneGraph, VTransformGraph
from lean.report import ExportReport, GraphResult, Stages, qdq_pairs
from lean.simplify import simplify
from lean.trace import annotate, exact_float32, trace
from lean.validate import check_bev, validate

BACKBONE_FILE = "camera.backbone.onnx"
VTRANSFORM_FILE = "camera.vtransform.onnx"
REPORT_FILE = "report.json"


@dataclass
class ExportOptions:
    ckpt: Path
    out_dir: Path | None = None  # default qat/onnx_int8 or qat/onnx_fp16, as the seed
    fp16: bool = False
    opset: int = 13
    device: str = "auto"
    simplify: bool = True
    data: Path = DEFAULT_DATA
    backbone: str | None = None
    image_size: tuple[int, int] | None = None
    cameras: int | None = None
    xbound: tuple[float, float, float] | None = None
    ybound: tuple[float, float, float] | None = None
    rebuild_frustum: bool = False
    check_bev: bool | None = None  # None: on
    plot: bool = False

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "int8"

    def output_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir else Path("qat") / f"onnx_{self.precision}"


@dataclass(frozen=True)
class GraphSpec:
    """One file of the contract: which part of the model it holds and its output names."""

    file: str
    part: Callable[[nn.Module], nn.Module]
    outputs: tuple[str, ...]


BACKBONE = GraphSpec(BACKBONE_FILE, BackboneGraph, ("camera_feature", "camera_depth_weights"))
VTRANSFORM = GraphSpec(VTRANSFORM_FILE, VTransformGraph, ("feat_out",))


@dataclass
class ExportedGraph:
    result: GraphResult
    path: Path  # the validated file under its temporary name
    reference: dict[str, torch.Tensor]  # PyTorch's outputs
    onnx_outputs: dict[str, np.ndarray]  # ONNX Runtime's outputs


class _GraphWriter:
    """Trace -> simplify -> write (temporary name) -> validate, for each graph of one export."""

    def __init__(self, opts: ExportOptions, out_dir: Path, props: dict, stages: Stages, pending: ExitStack):
        self.opts, self.out_dir, self.props, self.stages, self.pending = opts, out_dir, props, stages, pending

    def __call__(self, spec: GraphSpec, model: nn.Module, inputs: dict[str, torch.Tensor]) -> ExportedGraph:
        import onnx

        name, stages = spec.file, self.stages
        t0 = time.perf_counter()
        with stages("export", f"tracing {name} (opset {self.opts.opset}); the tracing forward is the PyTorch reference"):
            proto, reference = trace(spec.part(model), inputs, list(spec.outputs), self.opts.opset)
        if self.opts.simplify:
            with stages("simplify", f"simplifying {name} with onnxsim"):
                proto = simplify(proto)
        annotate(proto, self.props)
        tmp = self.pending.enter_context(atomic_path(self.out_dir / name))
        with stages("write", f"writing {name}"):
            onnx.save(proto, str(tmp))
        with stages("validate", f"validating {name} (onnx.checker + ONNX Runtime vs PyTorch)"):
            outputs, onnx_outputs = validate(tmp, inputs, reference, self.opts.precision, name)
        result = GraphResult(name, size=tmp.stat().st_size, nodes=len(proto.graph.node), qdq_pairs=qdq_pairs(proto),
                             seconds=time.perf_counter() - t0, outputs=outputs)
        return ExportedGraph(result, tmp, reference, onnx_outputs)


def export_camera(opts: ExportOptions) -> ExportReport:
    with exact_float32():
        return _export_camera(opts)


def _export_camera(opts: ExportOptions) -> ExportReport:
    stages = Stages()
    device = resolve_device(opts.device)
    out_dir = opts.output_dir()
    precision = opts.precision

    ensure_writable(out_dir)
    with stages("load", f"reading checkpoint {opts.ckpt}"):
        ckpt = read_checkpoint(opts.ckpt)
        cfg = resolve_config(ckpt, opts.backbone, opts.image_size, opts.cameras, opts.rebuild_frustum,
                             opts.xbound, opts.ybound)
    with stages("build", f"building the {cfg.backbone} {precision.upper()} model on {device}"):
        # Channels-last: oneDNN and cuDNN convs run faster on NHWC; the graph is the same.
        model = build_model(ckpt, cfg, precision, opts.rebuild_frustum).to(device, memory_format=torch.channels_last)
    with stages("data", f"reading example data {opts.data}"):
        sample, img, depth = load_inputs(opts.data, cfg)
        img, depth = img.to(device), depth.to(device)

    calibration = ckpt.meta.get("calibration", {}) if ckpt.kind == "ptq" and precision == "int8" else None
    props = {"precision": precision, "backbone": cfg.backbone, "image_size": "x".join(map(str, cfg.image_size)),
             "cameras": cfg.cameras, "source_format": ckpt.source,
             "calibration": json.dumps(calibration) if calibration is not None else "none",
             "checkpoint_sha256": ckpt.sha256}
    with ExitStack() as pending:
        export_graph = _GraphWriter(opts, out_dir, props, stages, pending)
        backbone = export_graph(BACKBONE, model, {"img": img, "depth": depth})
        with stages("pool", "pooling PyTorch's camera features to BEV (the vtransform's input)"):
            ref = backbone.reference
            bev_in = pool_to_bev(ref["camera_feature"], ref["camera_depth_weights"], sample, model).to(device)
        vtransform = export_graph(VTRANSFORM, model, {"feat_in": bev_in})
        facts = {
            "out_dir": str(out_dir), "opset": opts.opset, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
            "config": cfg.to_dict(),
            "checkpoint": {"path": str(opts.ckpt), "sha256": ckpt.sha256, "source_format": ckpt.source,
                           "kind": ckpt.kind, "meta": ckpt.meta},
            "versions": versions(),
        }
        report = ExportReport(out_dir, precision, [backbone.result, vtransform.result], stages.times, facts)
        if opts.check_bev is not False:
            with stages("check_bev", "end-to-end BEV check: ONNX backbone -> BEV pool -> ONNX vtransform"):
                report.facts["bev_check"] = check_bev(
                    backbone.onnx_outputs["camera_feature"], backbone.onnx_outputs["camera_depth_weights"],
                    vtransform.path, model, sample, vtransform.reference["feat_out"], precision,
                    out_dir if opts.plot else None,
                )
        report_tmp = pending.enter_context(atomic_path(out_dir / REPORT_FILE))
        report_tmp.write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n")
        # Everything validated: leaving the block renames the report and both files into place.
    return report
