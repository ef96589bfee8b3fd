"""Proof that the graphs compute what PyTorch computes.

Per graph: ``onnx.checker`` (full) and ONNX Runtime against the PyTorch outputs. End to end, as
the runtime runs the chain: images -> camera.backbone.onnx -> BEV pooling (``lean.bev``) ->
camera.vtransform.onnx, against the same chain in PyTorch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lean.bev import pool_to_bev
from lean.errors import LeanError
from lean.plot import plot_bev


@dataclass(frozen=True)
class Tolerance:
    """When an ONNX output counts as computing what PyTorch computes.

    ``rtol``: max abs error / max |reference| (float graphs). ``steps`` and ``min_cosine``: INT8
    graphs, where one float rounding difference before a quantizer flips a value by one step
    and the flip spreads through every later layer, so the max error is heavy-tailed and machine
    dependent (BENCHMARKS.md has the figures). Cosine is the main test there; the step bound, in
    steps of the output's own INT8 range (max |ref| / 127), only catches a gross local error.
    """

    rtol: float | None = None
    steps: float | None = None
    min_cosine: float | None = None

    def bound(self, ref_max_abs: float) -> float:
        return self.rtol * ref_max_abs if self.rtol is not None else self.steps * ref_max_abs / 127.0


# The --fp16 graph carries FP32 tensors (the engine builder makes it FP16), so it is held to FP32.
TOLERANCES = {"fp16": Tolerance(rtol=1e-4), "int8": Tolerance(steps=48.0, min_cosine=0.97)}


def compare(got, ref, precision: str) -> dict:
    """Error stats of one output and whether it passes this precision's tolerance."""
    tolerance = TOLERANCES[precision]
    ref = torch.as_tensor(ref).double().flatten()
    got = torch.as_tensor(got).double().flatten()
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=0).item() if scale > 0 else 1.0
    tol = tolerance.bound(scale)
    ok = err <= max(tol, 1e-6) and (tolerance.min_cosine is None or cos >= tolerance.min_cosine)
    return {"max_abs_err": err, "cosine": cos, "tolerance": tol, "ref_max_abs": scale, "ok": ok}


def ort_session(path: Path):
    """An ONNX Runtime CPU session that computes what the graph says.

    Basic optimizations only: ORT's extended level fuses Q/DQ pairs into its own int8 kernels
    (QLinearConv), whose x86 s8s8 path saturates intermediate sums (errors of half the output
    range were seen on ResNet50's downsample convs). TensorRT accumulates exactly in int32, so
    the unfused Q -> DQ -> float conv semantics are the right reference.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def validate(path: Path, inputs: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], precision: str,
             name: str | None = None) -> tuple[dict, dict]:
    """onnx.checker (full) and ONNX Runtime against the PyTorch outputs; raises on failure.

    Returns the error stats per output and ONNX Runtime's outputs.
    """
    import onnx

    name = name or path.name
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise LeanError(f"onnx.checker rejected {name}: {str(e).splitlines()[0]}") from None
    session = ort_session(path)
    feeds = {k: v.detach().cpu().numpy() for k, v in inputs.items()}
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    stats = {}
    for out, ref in reference.items():
        ref = ref.detach().cpu()
        if tuple(got[out].shape) != tuple(ref.shape):
            raise LeanError(f"{name}: output {out} has shape {got[out].shape}, PyTorch gives {tuple(ref.shape)}")
        stats[out] = {"shape": list(ref.shape), **compare(got[out], ref, precision)}
    bad = [n for n, s in stats.items() if not s["ok"]]
    if bad:
        s = stats[bad[0]]
        raise LeanError(
            f"{name} does not compute what PyTorch computes: {bad[0]} max abs error {s['max_abs_err']:.3g} "
            f"> tolerance {s['tolerance']:.3g} (cosine {s['cosine']:.6f}); nothing was written"
        )
    return stats, got


@torch.no_grad()
def onnx_chain(feature, weights, vtransform_path: Path, model, sample) -> torch.Tensor:
    """ONNX Runtime's backbone outputs -> our BEV pooling -> camera.vtransform.onnx."""
    bev_in = pool_to_bev(feature, weights, sample, model.vtransform)
    (out,) = ort_session(vtransform_path).run(["feat_out"], {"feat_in": bev_in.cpu().numpy()})
    return torch.from_numpy(out)


def check_bev(feature, weights, vtransform_path, model, sample, reference, precision: str, plot_dir=None) -> dict:
    """Final camera BEV map of the ONNX chain against PyTorch's (``reference``); raise if off."""
    t = time.perf_counter()
    ref = reference.detach().cpu()
    got = onnx_chain(feature, weights, Path(vtransform_path), model, sample)
    stats = {"shape": list(ref.shape), **compare(got, ref, precision)}
    stats["seconds"] = time.perf_counter() - t
    if plot_dir is not None:
        stats["plots"] = plot_bev(Path(plot_dir), ref, got, sample, model.cfg)
    if not stats["ok"]:
        raise LeanError(
            f"end-to-end BEV map of the ONNX chain differs from PyTorch: max abs error {stats['max_abs_err']:.3g} > "
            f"tolerance {stats['tolerance']:.3g} (cosine {stats['cosine']:.6f}); nothing was written"
        )
    return stats
