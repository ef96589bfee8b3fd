"""One measurement per process, so each peak RSS is its own: ``python -m bench.measure WHAT ARGS``.

The export itself is measured as users run it, through ``export_camera.py`` (bench/suite.py).

Prints one JSON object on the last line of stdout. Each measurement imports what it uses inside
its function: a process then holds only that measurement's modules (its peak RSS is its own), and
the floor times its own imports.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

from bench.bev_pool import peak_rss_mb  # noqa: E402


def floor(ckpt: str, data: str, device: str, tensorrt: str = "10") -> dict:
    """The least the same job can cost: one bare torch.onnx.export(dynamo=True, optimize=True) of the
    backbone, one ORT run of it and one PyTorch forward (the reference) of the same INT8 model on the
    same inputs, in one process; typed (FP16) for TensorRT 10/11, FP32 for 8."""
    t0 = time.perf_counter()
    import onnx
    import torch

    from lean.build import build_model, resolve_config
    from lean.checkpoint import read_checkpoint
    from lean.data import backbone_inputs, load_inputs
    from lean.models import BackboneGraph
    from lean.trace import qdq_translation_table
    from lean.validate import feeds, ort_session

    t_import = time.perf_counter() - t0
    typed = tensorrt != "8"
    ckpt_ = read_checkpoint(ckpt)
    cfg = resolve_config(ckpt_)
    _, img, depth = load_inputs(data, cfg)
    model = build_model(ckpt_, cfg, "int8").to(device)
    inputs = {k: v.to(device) for k, v in backbone_inputs(img, depth).items()}
    t_load = time.perf_counter() - t0 - t_import
    times = {}
    torch.set_grad_enabled(False)  # the bare calls, but without autograd keeping activations
    t = time.perf_counter()
    model(*inputs.values())
    times["forward"] = time.perf_counter() - t
    if typed:
        model.half()
        inputs = {k: v.half() for k, v in inputs.items()}
    opset = 19 if typed else 18
    t = time.perf_counter()
    program = torch.onnx.export(BackboneGraph(model), tuple(inputs.values()), dynamo=True, opset_version=opset,
                                input_names=list(inputs), output_names=["camera_feature", "camera_depth_weights"],
                                custom_translation_table=qdq_translation_table(opset),
                                external_data=False)
    times["torch.onnx.export"] = time.perf_counter() - t
    path = Path(ckpt).with_suffix(".floor.onnx")
    onnx.save(program.model_proto, str(path))
    t = time.perf_counter()
    session = ort_session(path)
    session.run(None, feeds(session, inputs))
    times["ort"] = time.perf_counter() - t
    path.unlink()
    return {"device": device, "tensorrt": tensorrt, "import_s": t_import, "load_build_s": t_load, "work_s": times,
            "floor_s": sum(times.values()), "peak_rss_mb": peak_rss_mb()}


def calibration(ckpt: str, data: str, device: str, method: str = "mse", batches: int = 8) -> dict:
    """PTQ calibration cost per batch against a plain float forward on the same data and device.

    Steady state, timed inside one calibration of 2 + ``batches`` batches: the clock starts at the
    end of batch 2 and stops at the end of the last, each after a device synchronize, so the
    first batch, the CUDA graph capture and the amax searches (reported apart) stay out, and
    nothing still queued on the GPU is left out. The plain forward is timed the same way.
    (Until session 5 the figure was the difference of two whole calibrations of 1 + N and 1
    batches, over N: the noise of the one-off work, divided by N, gave impossible figures such as
    calibration faster than the forward it wraps.)
    """
    import copy
    import gc

    import torch

    from lean.build import build_folded, resolve_config
    from lean.checkpoint import read_checkpoint
    from lean.data import backbone_inputs, load_inputs
    from lean.quant.modelopt import calibrate, insert_quantizers

    batches, skip = int(batches), 2
    ck = read_checkpoint(ckpt)
    cfg = resolve_config(ck)
    _, img, depth = load_inputs(data, cfg)
    img, depth = img.to(device), None if depth is None else depth.to(device)
    inputs = tuple(backbone_inputs(img, depth).values())
    model = build_folded(cfg, ck.state_dict).to(device)

    def sync():
        _sync(device)

    def timed(forward) -> float:
        for _ in range(skip):
            forward()
        sync()
        t = time.perf_counter()
        for _ in range(batches):
            forward()
        sync()
        return (time.perf_counter() - t) / batches

    with torch.no_grad():
        plain = timed(lambda: model(*inputs))
        # For reference: the plain forward as a CUDA graph too (calibration replays one on CUDA).
        graphed = timed(_graphed(lambda: model(*inputs))) if device == "cuda" else None

    def run() -> dict:
        quantized = insert_quantizers(copy.deepcopy(model), method)
        marks = {}

        def progress(k):
            if k in (1, skip, skip + batches):
                sync()
                marks[k] = time.perf_counter()

        gc.collect()
        sync()
        t = time.perf_counter()
        calibrate(quantized, [(img, depth)] * (skip + batches), method, progress=progress)
        sync()
        end = time.perf_counter()
        return {"first_batch_s": marks[1] - t, "per_batch_s": (marks[skip + batches] - marks[skip]) / batches,
                "amax_s": end - marks[skip + batches]}

    run()  # warm-up: the first calibration in a process also pays one-off CUDA/cuDNN setup
    runs = [run() for _ in range(2)]
    best = min(runs, key=lambda r: r["per_batch_s"])
    per_batch = best["per_batch_s"]
    out = {"device": device, "method": method, "batches": batches, "plain_forward_s": plain,
           "first_batch_s": best["first_batch_s"], "amax_s": best["amax_s"],
           "calibration_s_per_batch": per_batch, "runs_s_per_batch": [r["per_batch_s"] for r in runs],
           "samples_per_s": 1.0 / per_batch, "overhead": per_batch / plain - 1.0}
    if graphed is not None:
        out.update(graphed_plain_forward_s=graphed, overhead_vs_graphed=per_batch / graphed - 1.0)
    return out


def throughput(ckpt: str, tree: str, device: str, samples: int = 100, method: str = "mse", workers: str = "") -> dict:
    """End-to-end PTQ from files on disk, as ``python -m lean.ptq --nuscenes`` runs it: JPEG decode,
    resize and crop, sweeps and depth image in the loader's workers; copy, normalization and
    calibration on ``device``. Also the loader alone (its samples/s with nothing consuming) and
    the seconds the calibration waited for data. Steady state after 2 samples, as ``calibration``."""
    import gc

    import torch

    from lean.build import build_folded, resolve_config
    from lean.checkpoint import read_checkpoint
    from lean.loader import Stream, nuscenes_set
    from lean.nuscenes import plan_samples
    from lean.quant.modelopt import calibrate, insert_quantizers

    samples, skip = int(samples), 2
    n_workers = int(workers) if workers else None
    t0 = time.perf_counter()
    plans = plan_samples(tree, "v1.0-test", "test", samples)
    plan_s = time.perf_counter() - t0
    ck = read_checkpoint(ckpt)
    cfg = resolve_config(ck)
    frames = nuscenes_set(Path(tree), plans, cfg)

    def sync():
        _sync(device)

    # The loader alone: every frame read, copied and normalized on the device, nothing else.
    stream = Stream(frames, samples, torch.device(device), n_workers)
    marks = []
    for i, frame in enumerate(stream):
        frame.inputs()
        if i + 1 in (skip, samples):
            sync()
            marks.append(time.perf_counter())
    loader_per_sample = (marks[1] - marks[0]) / (samples - skip)

    model = insert_quantizers(build_folded(cfg, ck.state_dict).to(device), method)
    stream = Stream(frames, samples, torch.device(device), n_workers)
    marks = {}

    def batches():
        for frame in stream:
            img, depth = frame.inputs()
            yield img, depth, frame

    def progress(k):
        if k in (skip, samples):
            sync()
            marks[k] = (time.perf_counter(), stream.waited)

    gc.collect()
    t = time.perf_counter()
    calibrate(model, batches(), method, progress=progress)
    sync()
    total = time.perf_counter() - t
    (t_a, w_a), (t_b, w_b) = marks[skip], marks[samples]
    per_sample = (t_b - t_a) / (samples - skip)
    return {"device": device, "method": method, "samples": samples, "workers": stream.workers,
            "plan_s": plan_s, "loader_samples_per_s": 1.0 / loader_per_sample,
            "end_to_end_samples_per_s": 1.0 / per_sample, "whole_run_s": total,
            "waited_for_data_share": (w_b - w_a) / (t_b - t_a), "peak_rss_mb": peak_rss_mb()}


def ranges(ckpt: str, tree: str, device: str, samples: int = 8) -> dict:
    """The FP32 range measurement of the export's backbone graph (``lean.ranges``) over samples of a
    nuScenes tree: what it costs against a plain ONNX Runtime run of the same graph, how far each
    tensor's max over all samples is from its max on one sample (the headroom the bound must
    leave), and the largest tensor (the demo's islands)."""
    import numpy as np
    import torch

    from lean.build import build_model, resolve_config
    from lean.checkpoint import read_checkpoint
    from lean.data import backbone_inputs
    from lean.loader import Stream, nuscenes_set
    from lean.models import BackboneGraph
    from lean.nuscenes import plan_samples
    from lean.ranges import BOUND, Meter, graph_proto
    from lean.runtime import ort_session

    samples = int(samples)
    ck = read_checkpoint(ckpt)
    cfg = resolve_config(ck)
    model = build_model(ck, cfg, "int8" if ck.kind == "ptq" else "fp16").to(device)
    frames = nuscenes_set(Path(tree), plan_samples(tree, "v1.0-test", "test", samples), cfg)
    feeds = [{k: v.float().cpu().numpy() for k, v in backbone_inputs(*f.inputs()).items()}
             for f in Stream(frames, samples, torch.device(device), 0)]
    graph = BackboneGraph(model)
    t = time.perf_counter()
    proto = graph_proto(graph, model, {k: torch.from_numpy(v).to(device) for k, v in feeds[0].items()},
                        ["camera_feature", "camera_depth_weights"])
    trace_s = time.perf_counter() - t
    plain = ort_session(proto.SerializeToString())
    t = time.perf_counter()
    for f in feeds:
        plain.run(None, f)
    plain_s = (time.perf_counter() - t) / samples
    t = time.perf_counter()
    meter = Meter(proto)
    setup_s = time.perf_counter() - t
    first = None
    t = time.perf_counter()
    for f in feeds:
        meter.add(f)
        first = first or dict(meter.max)
    measure_s = (time.perf_counter() - t) / samples
    spread = np.array([meter.max[k] / first[k] for k in meter.max if first[k] > 1.0])
    top = max(meter.max, key=meter.max.get)
    return {"samples": samples, "tensors": len(meter.max), "trace_s": trace_s, "ort_run_s": plain_s,
            "measure_setup_s": setup_s, "measure_run_s": measure_s, "largest": top, "largest_max": meter.max[top],
            "above_bound": sum(v > BOUND for v in meter.max.values()),
            "spread_max": float(spread.max()), "spread_p99": float(np.percentile(spread, 99)),
            "spread_median": float(np.median(spread)), "peak_rss_mb": peak_rss_mb()}


def _sync(device: str) -> None:
    """Wait for the device's queued work, so a clock read after it counts all of it."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _graphed(forward):
    """``forward`` captured as a CUDA graph; returns its replay."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    return graph.replay


def latency(onnx_dir: str, data: str, ckpt: str, runs: int = 5) -> dict:
    """ONNX Runtime CPU latency of each graph and its fidelity against the float PyTorch model."""
    import torch

    from lean.build import build_model, resolve_config
    from lean.checkpoint import read_checkpoint
    from lean.data import backbone_inputs, load_inputs
    from lean.validate import TOLERANCES, compare, feeds, ort_session

    ck = read_checkpoint(ckpt)
    cfg = resolve_config(ck)
    _, img, depth = load_inputs(data, cfg)
    inputs = backbone_inputs(img, depth)
    with torch.no_grad():
        ref = build_model(ck, cfg, "fp16")(*inputs.values())  # the float model of the same folded weights
    out = {}
    import onnxruntime as ort

    for name, folder in json.loads(onnx_dir).items():
        path = Path(folder) / "camera.backbone.onnx"
        exact = ort_session(path)
        got = exact.run(None, feeds(exact, inputs))  # fidelity: the graph's own semantics
        # Latency: ORT's defaults, as a CPU user would run it (int8 kernels for Q/DQ).
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = feeds(session, inputs)
        session.run(None, feed)  # warm-up
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - t)
        fidelity = {k: {m: v for m, v in compare(g.astype("float32"), r, TOLERANCES[("fp16", False)]).items()
                        if m in ("max_abs_err", "cosine")}
                    for k, g, r in zip(("camera_feature", "camera_depth_weights"), got, ref)}
        out[name] = {"median_s": statistics.median(times), "runs": runs, "vs_float_pytorch": fidelity}
    return out


if __name__ == "__main__":
    what, *args = sys.argv[1:]
    print(json.dumps({"floor": floor, "calibration": calibration, "latency": latency,
                      "throughput": throughput, "ranges": ranges}[what](*args)))
