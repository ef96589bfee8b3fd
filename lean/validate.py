"""Proof that the graphs compute what PyTorch computes.

Per graph: ``onnx.checker`` (full) and ONNX Runtime against the PyTorch outputs. End to end, as
the runtime runs the chain: images -> camera.backbone.onnx -> BEV pooling (``lean.bev``) ->
camera.vtransform.onnx, against the same chain in PyTorch.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from lean.bev import pool_to_bev
from lean.criteria import TOLERANCES, Tolerance, compare, nonfinite, tolerance
from lean.errors import LeanError
from lean.names import branch_path, scope_map
from lean.plot import plot_bev
from lean.ranges import measure
from lean.runtime import feeds, ort_session

__all__ = ["TOLERANCES", "Tolerance", "check_bev", "check_reference", "compare", "feeds", "nonfinite",
           "ort_session", "tolerance", "validate"]


def validate(path: Path, inputs: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], tolerance: Tolerance,
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
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds(session, inputs))))
    stats = {}
    for out, ref in reference.items():
        ref = ref.detach().cpu()
        if tuple(got[out].shape) != tuple(ref.shape):
            raise LeanError(f"{name}: output {out} has shape {got[out].shape}, PyTorch gives {tuple(ref.shape)}")
        stats[out] = {"shape": list(ref.shape), **compare(got[out], ref, tolerance)}
    bad = [n for n, s in stats.items() if not s["ok"]]
    if bad:
        s = stats[bad[0]]
        where = f" (first made by {_first_nonfinite(path, session, inputs)})" if s["nonfinite"] else ""
        raise LeanError(f"{name} does not compute what PyTorch computes: {bad[0]} {s['failed']}{where}; "
                        "nothing was written")
    return stats, got


def _first_nonfinite(path: Path, session, inputs: dict[str, torch.Tensor]) -> str:
    """The first node of the file (in graph order) whose output holds NaN or Inf on ``inputs``."""
    import onnx

    ranges = measure(onnx.load(str(path)), [feeds(session, inputs)])
    if not ranges.nonfinite:
        return "no node: the outputs alone"
    key = ranges.nonfinite[0]
    return f"{key}, module {ranges.modules.get(key) or '(graph)'}, max |x| {ranges.max.get(key, 0):.4g}"


@torch.no_grad()
def check_reference(out: dict[str, torch.Tensor], module: torch.nn.Module, inputs: dict[str, torch.Tensor],
                    name: str, branch: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``out``, PyTorch's FP32 outputs of ``module``, if finite; else a one-line error naming the
    first module whose output held NaN or Inf (found by running ``module`` again with hooks)."""
    bad = {k: nonfinite(v) for k, v in out.items()}
    if not any(bad.values()):
        return out
    first = []

    def hook(mod, args, result):
        if not first and isinstance(result, torch.Tensor) and nonfinite(result):
            first.append((paths[mod], nonfinite(result), result.numel()))

    paths = {m: n for n, m in module.named_modules()}
    # A hook runs as its module returns: the first to see NaN is the innermost module that made it.
    handles = [m.register_forward_hook(hook) for m in paths]
    try:
        module(*inputs.values())
    finally:
        for h in handles:
            h.remove()
    output, count = next((k, v) for k, v in bad.items() if v)
    where = "in no single module"
    if first:
        path, n, total = first[0]
        where = f"first in module {branch_path(path, scope_map(module, branch)) or '(top level)'} ({n} of {total} values)"
    raise LeanError(f"the checkpoint's FP32 forward makes NaN or Inf on the data ({output} of {name}: {count} "
                    f"elements), {where}: the weights are broken or not for this model")


@torch.no_grad()
def onnx_chain(feature, weights, vtransform_path: Path, geometry, sample, fp16_input: bool = False) -> torch.Tensor:
    """ONNX Runtime's backbone outputs -> our BEV pooling -> camera.vtransform.onnx.
    ``fp16_input``: the pooled map rounded to FP16, as an engine binding FP16 gets it."""
    bev_in = pool_to_bev(feature, weights, sample, geometry)
    if fp16_input:
        bev_in = bev_in.half().float()
    session = ort_session(vtransform_path)
    (out,) = session.run(["feat_out"], feeds(session, {"feat_in": bev_in}))
    return torch.from_numpy(out.astype(np.float32))


def check_bev(feature, weights, vtransform_path, geometry, sample, reference, tolerance: Tolerance, cfg,
              plot_dir=None, fp16_input: bool = False) -> dict:
    """Final camera BEV map of the ONNX chain against PyTorch's (``reference``); raise if off.

    ``geometry``: the model or anything holding its pooling buffers (``lean.bev.Geometry``).
    """
    t = time.perf_counter()
    ref = reference.detach().cpu()
    got = onnx_chain(feature, weights, Path(vtransform_path), geometry, sample, fp16_input)
    stats = {"shape": list(ref.shape), **compare(got, ref, tolerance)}
    stats["seconds"] = time.perf_counter() - t
    if not stats["ok"]:
        raise LeanError(f"end-to-end BEV map of the ONNX chain differs from PyTorch: {stats['failed']}; "
                        "nothing was written")
    if plot_dir is not None:  # only for a chain that validated: a failed export replaces no earlier PNG
        stats["plots"] = plot_bev(Path(plot_dir), ref, got, sample, cfg)
    return stats
