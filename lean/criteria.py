"""When an output counts as computing what the reference computes: the tolerances of each
precision and the comparison, in numpy alone (the engine check runs where PyTorch is not)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


# By (precision, strongly typed). A classic graph carries FP32 tensors (the engine builder makes
# them FP16), so its float graph is held to FP32. A typed FP16 graph rounds every tensor to FP16
# (about 3 significant digits); in a typed INT8 graph those roundings flip more values across a
# quantization step than FP32 summation order does, and the flips spread (BENCHMARKS.md).
TOLERANCES = {
    ("fp16", False): Tolerance(rtol=1e-4),
    ("int8", False): Tolerance(steps=48.0, min_cosine=0.97),
    ("fp16", True): Tolerance(rtol=1e-2, min_cosine=0.9995),
    ("int8", True): Tolerance(steps=64.0, min_cosine=0.97),
}
# The end-to-end BEV map of a typed graph chain.
BEV_TOLERANCES = {("fp16", True): Tolerance(rtol=1e-2, min_cosine=0.999)}


def tolerance(precision: str, typed: bool, bev: bool = False) -> Tolerance:
    return (BEV_TOLERANCES.get((precision, typed)) if bev else None) or TOLERANCES[(precision, typed)]


def _array(x) -> np.ndarray:
    """Float64 numpy of a numpy array, a PyTorch tensor (any device) or a list."""
    if hasattr(x, "detach"):  # a torch.Tensor, without importing torch here
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def nonfinite(x) -> int:
    """How many elements of ``x`` are NaN or infinite."""
    return int((~np.isfinite(_array(x))).sum())


def compare(got, ref, tolerance: Tolerance) -> dict:
    """Error stats of one output and whether it passes ``tolerance``. NaN or Inf in either side
    fails first: every comparison against a threshold is false for NaN."""
    ref, got = _array(ref).ravel(), _array(got).ravel()
    if ref.shape != got.shape:
        return {"max_abs_err": None, "cosine": None, "tolerance": None, "ref_max_abs": None, "ok": False,
                "nonfinite": 0, "failed": f"{got.size} elements against the reference's {ref.size}"}
    bad_ref, bad_got = int((~np.isfinite(ref)).sum()), int((~np.isfinite(got)).sum())
    if bad_ref or bad_got:
        which = f"{bad_got} of {got.size} elements are NaN or Inf" if bad_got else \
            f"the reference holds {bad_ref} NaN or Inf elements of {ref.size}"
        return {"max_abs_err": None, "cosine": None, "tolerance": None, "ref_max_abs": None, "ok": False,
                "nonfinite": bad_got, "failed": which}
    err = float(np.abs(got - ref).max()) if ref.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    cos = _cosine(got, ref) if scale > 0 else 1.0
    tol = tolerance.bound(scale)
    failed = [f"max abs error {err:.3g} > tolerance {tol:.3g}"] if err > max(tol, 1e-6) else []
    if tolerance.min_cosine is not None and cos < tolerance.min_cosine:
        failed.append(f"cosine {cos:.6f} < {tolerance.min_cosine}")
    return {"max_abs_err": err, "cosine": cos, "tolerance": tol, "min_cosine": tolerance.min_cosine,
            "ref_max_abs": scale, "ok": not failed, "nonfinite": 0, "failed": "; ".join(failed)}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity, the product of the norms clamped at 1e-8 (PyTorch clamps each norm: the same
    figure for any output that is not all zeros)."""
    return float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-8))
