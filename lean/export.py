"""Export the camera branch to the two ONNX files the CUDA-BEVFusion runtime binds by name.

The orchestration of the stages, each in its own module:
checkpoint (``lean.checkpoint``) -> model (``lean.build``) -> PyTorch reference and trace
(``lean.trace``) -> simplify (``lean.simplify``) -> typing check (``lean.typecheck``) and
validate (``lean.validate``) -> report (``lean.report``). The target (``lean.target``) decides
the graph: strongly typed FP16/INT8 for TensorRT 10/11, classic FP32 + Q/DQ for TensorRT 8.
Every file is first written into a staging folder beside the output folder, which replaces it as
a whole (``lean.io.output_folder``) only after both graphs and the end-to-end check validated.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lean.bev import Geometry, pool_to_bev
from lean.build import build_model, resolve_config, resolve_device, versions
from lean.checkpoint import read_checkpoint
from lean.config import DEFAULT_DATA
from lean.contract import BACKBONE, BACKBONE_FILE, VTRANSFORM, VTRANSFORM_FILE, GraphSpec, backbone_spec
from lean.criteria import tolerance
from lean.data import backbone_inputs, load_inputs, sample_folders
from lean.engine_check import (check_command, check_file_names, criteria, engine_tolerance, polygraphy_command,
                               write_check_files)
from lean.errors import LeanError
from lean.io import output_folder
from lean.islands import check_globs, kept_nodes, make_islands, overflow_check, parse_globs
from lean.lint.check import lint_view
from lean.lint.graph import GraphView
from lean.log import logger
from lean.models import BackboneGraph, VTransformGraph
from lean.names import name_nodes, scope_map
from lean.plot import PLOT_FILES
from lean.quant.qdq import clamp_scales_to_fp16
from lean.ranges import BOUND, FP16_MAX, measure, twin
from lean.report import ExportReport, GraphResult, Stages, qdq_pairs, report_text
from lean.simplify import node_count, simplify
from lean.target import DEFAULT_TARGET, Target, get_target
from lean.trace import CastIO, annotate, exact_float32, reference, to_proto, trace
from lean.typecheck import check_typing
from lean.validate import check_bev, check_reference, validate

REPORT_FILE = "report.json"
CHECK_FILES = (*check_file_names(BACKBONE_FILE), *check_file_names(VTRANSFORM_FILE))  # lean.engine_check
OUTPUT_FILES = (BACKBONE_FILE, VTRANSFORM_FILE, REPORT_FILE, *PLOT_FILES, *CHECK_FILES)  # the set that changes as a whole
PARTS = {BACKBONE_FILE: BackboneGraph, VTRANSFORM_FILE: VTransformGraph}  # which part of the model each file holds
__all__ = ["BACKBONE_FILE", "REPORT_FILE", "VTRANSFORM_FILE", "ExportOptions", "export_camera"]


@dataclass
class ExportOptions:
    ckpt: Path
    out_dir: Path | None = None  # default qat/onnx_int8 or qat/onnx_fp16, as the seed
    fp16: bool = False
    tensorrt: str = DEFAULT_TARGET  # "10"/"11": strongly typed graphs; "8": classic
    opset: int | None = None  # None: the target's
    io: str | None = None  # typed targets: the type of the graphs' inputs and outputs ("fp16", the default, or "fp32")
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
    keep_fp32: str | None = None  # GLOB[,GLOB]: modules kept FP32 in typed graphs
    fp32_islands: bool = True  # False: all-FP16 typed graphs, an overflow is an error
    engine_check_files: bool = True  # Polygraphy inputs and reference outputs beside each file

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "int8"

    def output_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir else Path("qat") / f"onnx_{self.precision}"


@dataclass
class ExportedGraph:
    result: GraphResult
    path: Path  # the validated file under its temporary name
    onnx_outputs: dict[str, np.ndarray]  # ONNX Runtime's outputs


class _GraphWriter:
    """Trace -> simplify -> names -> ranges and islands -> typing check -> write (temporary name) ->
    validate, for each graph of one export."""

    def __init__(self, opts: ExportOptions, target: Target, opset: int, out_dir: Path, props: dict, stages: Stages,
                 staging: Path, branch: nn.Module, recorded: dict, weights: dict):
        self.opts, self.target, self.opset, self.out_dir = opts, target, opset, out_dir
        self.props, self.stages, self.staging, self.branch = props, stages, staging, branch
        self.recorded = recorded  # ranges the checkpoint recorded, per file
        self.weights = weights  # FP32 weights and scales by name, for the twin and the islands
        self.tolerance = tolerance(opts.precision, target.typed)
        self.globs = parse_globs(opts.keep_fp32)

    def __call__(self, spec: GraphSpec, module: nn.Module, inputs: dict[str, torch.Tensor],
                 ref: dict[str, torch.Tensor], samples: list[dict[str, torch.Tensor]]) -> ExportedGraph:
        """``samples``: the graph's FP32 inputs of every data sample, for the range measurement."""
        import onnx

        name, stages = spec.file, self.stages
        t0 = time.perf_counter()
        with stages("export", f"exporting {name} (torch.export, opset {self.opset})"):
            model = trace(module, inputs, list(spec.outputs), self.opset)
        if self.opts.simplify:
            with stages("simplify", f"simplifying {name} (onnxscript optimizer)"):
                nodes = simplify(model)
        else:
            nodes = (node_count(model),) * 2
        name_nodes(model, scope_map(module, self.branch))
        with stages("ranges", f"measuring the ranges of {name} in FP32 on {len(samples)} samples"):
            islands, layer_fp32 = self._islands(model, name, samples)
        proto = to_proto(model, self.opset)
        del model  # the file's weights are in the proto now: one copy less at the peak (validation)
        with stages("lint", f"linting {name} for TensorRT {self.target.name} (typing, Q/DQ, operators, contract)"):
            view = GraphView(proto, name)  # one shape inference for both checks
            typing = check_typing(proto, self.target, self.opts.io or "fp16", name, view.types)
            lint = lint_view(view, self.target.name)
            del view  # it holds an inferred copy of the graph and its weights
            if lint.errors:
                first = lint.errors[0]
                raise LeanError(f"{name} fails the lint for TensorRT {self.target.name}: {len(lint.errors)} errors, first "
                                f"{first.rule} ({', '.join(first.offenders[:3])}); nothing was written")
        annotate(proto, self.props)
        tmp = self.staging / name
        with stages("write", f"writing {name}"):
            onnx.save(proto, str(tmp))
        result = GraphResult(name, size=tmp.stat().st_size, nodes=len(proto.graph.node), qdq_pairs=qdq_pairs(proto),
                             typing=typing, lint=lint.to_json(), simplify={"nodes_before": nodes[0], "nodes_after": nodes[1]},
                             build_command=self.target.build_command(self.out_dir / name, len(inputs), len(spec.outputs),
                                                                     "int8" if qdq_pairs(proto) else "fp16", layer_fp32),
                             fp32_islands=[{"file": name, **i.to_json()} for i in islands])
        del proto  # ONNX Runtime reads the file
        with stages("validate", f"validating {name} (onnx.checker + ONNX Runtime vs PyTorch)"):
            result.outputs, onnx_outputs = validate(tmp, inputs, ref, self.tolerance, name)
        if self.opts.engine_check_files:
            with stages("engine_check", f"writing {name}'s inputs and outputs for Polygraphy"):
                result.engine_check = self._check_files(name, inputs, onnx_outputs)
        result.seconds = time.perf_counter() - t0
        return ExportedGraph(result, tmp, onnx_outputs)

    def _check_files(self, name: str, inputs: dict[str, torch.Tensor], outputs: dict[str, np.ndarray]) -> dict:
        """The files and commands that check the engine built from ``name`` on the user's machine."""
        # The engine binds FP16 unless a typed graph was asked for FP32 I/O (classic: fp16:chw flags).
        dtype = np.float32 if self.target.typed and self.opts.io == "fp32" else np.float16
        files = write_check_files(self.staging, name, {k: v.detach().cpu().numpy() for k, v in inputs.items()},
                                  outputs, dtype)
        per_output = criteria(engine_tolerance(self.opts.precision), {k: v.astype(dtype) for k, v in outputs.items()})
        path = self.out_dir / name
        return {"files": files, "bytes": sum((self.staging / f).stat().st_size for f in files),
                "binding": np.dtype(dtype).name, "criteria": per_output,
                "command": polygraphy_command(path, per_output), "check_command": check_command(path),
                "onnxrt_command": polygraphy_command(path, per_output, runner="onnxrt")}

    def _islands(self, model, name: str, samples: list[dict[str, torch.Tensor]]):
        """Measure ``model``'s ranges, then widen a typed graph's islands in place; returns the
        islands and, for a classic graph, the layers its build command keeps FP32."""
        ranges = measure(twin(model, self.weights), ({k: v.detach().cpu().float().numpy() for k, v in s.items()} for s in samples))
        if ranges.nonfinite:
            key = ranges.nonfinite[0]
            raise LeanError(f"the checkpoint's FP32 forward makes NaN or Inf on the data: first at {key} (module "
                            f"{ranges.modules.get(key) or '(graph)'}) of {name}; check the weights and the --data")
        ranges.merge(self.recorded.get(name, {}))
        kept = kept_nodes(model, self.globs)
        if not self.opts.fp32_islands:
            overflow_check(ranges)
            return [], []
        if not self.target.typed:  # the builder decides precision: the islands become build flags
            islands = make_islands(model, ranges, BOUND, kept, apply=False)
            # Q/DQ and the layers they quantize keep the precision their Q/DQ give them.
            quantized = {n.name for n in model.graph if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                         or any(v is not None and v.producer() is not None
                                and v.producer().op_type == "DequantizeLinear" for v in n.inputs)}
            return islands, [n for i in islands for n in i.nodes if n not in quantized]
        return make_islands(model, ranges, BOUND, kept, source=self.weights), []


def export_camera(opts: ExportOptions) -> ExportReport:
    with exact_float32():
        return _export_camera(opts)


def _export_camera(opts: ExportOptions) -> ExportReport:
    stages = Stages()
    target = get_target(opts.tensorrt)
    opset = opts.opset if opts.opset is not None else target.opset
    target.check_opset(opset)
    if opts.io not in (None, "fp16", "fp32"):
        raise LeanError(f"unknown --io {opts.io!r}: choose fp16 or fp32")
    if opts.io is not None and not target.typed:
        logger.warning("--io %s is for typed graphs and is ignored: a --tensorrt 8 graph has FP32 inputs and outputs, "
                       "and its build command binds them as fp16:chw", opts.io)
    if parse_globs(opts.keep_fp32) and not opts.fp32_islands:
        raise LeanError("--keep-fp32 and --no-fp32-islands contradict each other: pass one of them")
    device = resolve_device(opts.device)
    out_dir = opts.output_dir()

    # Every file goes to a staging folder that replaces out_dir as a whole only at the end; taking
    # it first also fails at once when out_dir cannot be written or another run is writing it.
    with output_folder(out_dir, OUTPUT_FILES) as staging:
        return _export_into(opts, stages, target, opset, device, out_dir, staging)


def _export_into(opts: ExportOptions, stages: Stages, target: Target, opset: int, device: torch.device, out_dir: Path,
                 staging: Path) -> ExportReport:
    precision = opts.precision
    with stages("load", f"reading checkpoint {opts.ckpt}"):
        ckpt = read_checkpoint(opts.ckpt)
        cfg = resolve_config(ckpt, opts.backbone, opts.image_size, opts.cameras, opts.rebuild_frustum,
                             opts.xbound, opts.ybound)
    with stages("build", f"building the {cfg.variant} {precision.upper()} model on {device}"):
        # Channels-last: oneDNN and cuDNN convs run faster on NHWC; the graph is the same.
        model = build_model(ckpt, cfg, precision, opts.rebuild_frustum).to(device, memory_format=torch.channels_last)
        clamped = 0
        if target.typed and precision == "int8":
            # The reference computes in FP32 with the FP16 weights and scales the typed graph stores.
            clamped = clamp_scales_to_fp16(model)
            fp16_rounded(model)
    check_globs(parse_globs(opts.keep_fp32), {name for name, _ in model.named_modules() if name})
    # A typed graph with FP16 I/O takes its inputs as FP16: the reference and the validation see the
    # values it gets. A classic graph is validated in FP32 against FP32 bounds; rounding both sides'
    # pooled BEV maps to FP16 apart brought the full-size FP16 BEV check to 95% of its bound. Its
    # engine check files still hold the inputs in FP16 as its engine binds them (far below the
    # engine's FP16 bounds).
    fp16_inputs = target.typed and opts.io != "fp32"

    def as_bound(t: torch.Tensor) -> torch.Tensor:
        return t.half().float() if fp16_inputs else t

    with stages("data", f"reading example data {opts.data}"):
        folders = sample_folders(opts.data)
        data = [load_inputs(f, cfg) for f in folders]
        sample = data[0][0]  # validation runs on the first sample, the range measurement on all
        feeds = [{k: as_bound(v.to(device)) for k, v in backbone_inputs(img, depth).items()} for _, img, depth in data]
        inputs = feeds[0]
    with stages("reference", "PyTorch reference forward (FP32) of both graphs"):
        refs = [check_reference(reference(BackboneGraph(model), f, list(BACKBONE.outputs)), BackboneGraph(model), f,
                                BACKBONE_FILE, model) for f in feeds]
        ref_backbone = refs[0]
        # The vtransform's input is what the runtime feeds it: the pooled backbone output.
        bev_ins = [{"feat_in": as_bound(pool_to_bev(r["camera_feature"], r["camera_depth_weights"], s, model).to(device))}
                   for r, (s, _, _) in zip(refs, data)]
        del refs
        bev_in = bev_ins[0]["feat_in"]
        ref_vtransform = check_reference(reference(VTransformGraph(model), bev_ins[0], list(VTRANSFORM.outputs)),
                                         VTransformGraph(model), bev_ins[0], VTRANSFORM_FILE, model)

    io_dtype = torch.float16 if target.typed and opts.io != "fp32" else torch.float32
    geometry = Geometry.of(model)
    weights = {k: v.detach().float().cpu().numpy() for k, v in (*model.named_parameters(), *model.named_buffers())}
    if target.typed:
        model.half()  # every weight, bias and Q/DQ scale FP16: the exporter writes the types it sees

    def part(spec: GraphSpec) -> nn.Module:
        module = PARTS[spec.file](model)
        return CastIO(module) if target.typed and opts.io == "fp32" else module

    calibration = ckpt.meta.get("calibration", {}) if ckpt.kind == "ptq" and precision == "int8" else None
    props = {"precision": precision, "backbone": cfg.backbone, "variant": cfg.variant, "image_size": "x".join(map(str, cfg.image_size)),
             "cameras": cfg.cameras, "source_format": ckpt.source,
             "calibration": json.dumps(calibration) if calibration is not None else "none",
             "checkpoint_sha256": ckpt.sha256, "tensorrt": target.name, "typing": target.typing,
             "io": "fp32" if io_dtype == torch.float32 else "fp16"}
    recorded = ckpt.meta.get("ranges", {}) if isinstance(ckpt.meta.get("ranges"), dict) else {}
    export_graph = _GraphWriter(opts, target, opset, out_dir, props, stages, staging, model,
                                {k: v for k, v in recorded.items() if isinstance(v, dict)}, weights)
    spec = backbone_spec(cfg.uses_depth)
    backbone = export_graph(spec, part(spec), {k: v.to(io_dtype) for k, v in inputs.items()}, ref_backbone, feeds)
    vtransform = export_graph(VTRANSFORM, part(VTRANSFORM), {"feat_in": bev_in.to(io_dtype)}, ref_vtransform, bev_ins)
    islands = backbone.result.fp32_islands + vtransform.result.fp32_islands
    target_facts = {"tensorrt": target.name, "runtimes": target.runtimes, "typing": target.typing, "io": props["io"],
                    "fp16_scales_clamped": clamped if target.typed else None, "fp32_islands": islands,
                    "fp32_bound": BOUND if opts.fp32_islands else None, "keep_fp32": parse_globs(opts.keep_fp32)}
    report = ExportReport(out_dir, precision, [backbone.result, vtransform.result], stages.times,
                          _facts(opts, opset, device, cfg, ckpt, target_facts))
    if opts.check_bev is not False:
        with stages("check_bev", "end-to-end BEV check: ONNX backbone -> BEV pool -> ONNX vtransform"):
            report.facts["bev_check"] = check_bev(
                backbone.onnx_outputs["camera_feature"], backbone.onnx_outputs["camera_depth_weights"],
                vtransform.path, geometry, sample, ref_vtransform["feat_out"],
                tolerance(precision, target.typed, bev=True), cfg, staging if opts.plot else None, fp16_inputs,
            )
    (staging / REPORT_FILE).write_text(report_text(report))
    # Everything validated: leaving output_folder swaps the staging folder into place.
    return report


@torch.no_grad()
def fp16_rounded(model: nn.Module) -> None:
    """Every weight and scale rounded to FP16 as the typed graph stores it (in place, still FP32);
    a value FP16 cannot hold stays as it is: it goes to an FP32 island with its FP32 value."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            t.copy_(torch.where(t.abs() <= FP16_MAX, t.half().float(), t))


def _facts(opts: ExportOptions, opset: int, device: torch.device, cfg, ckpt, target: dict) -> dict:
    """What report.json says besides the per-graph results."""
    return {
        "out_dir": str(opts.output_dir()), "opset": opset, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "target": target,
        "config": cfg.to_dict(),
        "checkpoint": {"path": str(opts.ckpt), "sha256": ckpt.sha256, "source_format": ckpt.source,
                       "variant": cfg.variant, "kind": ckpt.kind, "meta": ckpt.meta},
        "versions": versions(),
    }
