"""Checking a built TensorRT engine where TensorRT is: the files each export writes beside each
ONNX file (the inputs it validated with and ONNX Runtime's outputs of that file, in Polygraphy's
JSON formats), the ``polygraphy run`` command that compares the engine with them, and the check of
an engine's saved outputs by the export's own criteria (``python -m lean.check_engine``).

numpy and Polygraphy only, no PyTorch: the check runs on a Jetson image. Polygraphy imports
TensorRT only when a TensorRT runner runs; its JSON and result classes work without it.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lean.criteria import Tolerance, compare, tolerance
from lean.errors import LeanError

INPUTS, OUTPUTS, ENGINE_OUTPUTS = ".inputs.json", ".outputs.json", ".engine-outputs.json"
RUNNER = "lean-export onnxruntime"  # the runner name our reference outputs carry
REPORT_FILE = "report.json"


def check_file_names(onnx_name: str) -> tuple[str, str]:
    """The inputs and reference-outputs files of ``camera.backbone.onnx``: ``camera.backbone.inputs.json``, ..."""
    stem = onnx_name.removesuffix(".onnx")
    return stem + INPUTS, stem + OUTPUTS


def _quiet():
    """Polygraphy's logger only for errors: our tools print their own lines."""
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR


def write_check_files(folder: Path, onnx_name: str, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray],
                      dtype) -> list[str]:
    """Write the feed list (``--load-inputs``) and a ``RunResults`` (``--load-outputs``) of one
    graph into ``folder``, every array in ``dtype``, the type the engine binds its inputs and
    outputs as. Returns the file names."""
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.json import save_json

    _quiet()
    names = check_file_names(onnx_name)
    feed = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in inputs.items()}
    out = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in outputs.items()}
    for k, v in (*feed.items(), *out.items()):  # a classic graph computes in FP32: its FP16 binding may not hold it
        if not np.isfinite(v).all():
            raise LeanError(f"{onnx_name}: {k} holds values beyond {np.dtype(dtype).name} (max |x| "
                            f"{float(np.abs(np.asarray(inputs.get(k, outputs.get(k)), np.float64)).max()):.4g}), the "
                            "type the engine binds it as: the engine would return inf. Bind it as FP32 (typed graphs: --io fp32; "
                            "classic: fp32 in trtexec's --inputIOFormats/--outputIOFormats, and "
                            "--no-engine-check-files); nothing was written")
    save_json([feed], str(folder / names[0]), description="inputs")
    save_json(RunResults([(RUNNER, [IterationResult(out, runner_name=RUNNER)])]), str(folder / names[1]),
              description="reference outputs")
    return list(names)


def engine_tolerance(precision: str) -> Tolerance:
    """The export's tolerance for a graph computing in ``precision``. Every engine computes in
    FP16 (and INT8): a classic graph's FP32 validation bound is not the engine's, the typed
    graph's of the same precision is."""
    return tolerance(precision, typed=True)


def criteria(tol: Tolerance, outputs: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per output: the absolute error bound and min cosine ``tol`` gives on these reference outputs."""
    out = {}
    for name, ref in outputs.items():
        scale = float(np.abs(np.asarray(ref, dtype=np.float64)).max()) if np.size(ref) else 0.0
        out[name] = {"atol": max(tol.bound(scale), 1e-6), "min_cosine": tol.min_cosine}
    return out


def _bound(x: float) -> str:
    """``x`` as printed in a command, never below ``x``: Polygraphy must not fail what the export passes."""
    text = f"{x:.6g}"
    return text if float(text) >= x else f"{x * (1 + 1e-5):.6g}"


def polygraphy_command(onnx_path: Path, per_output: dict[str, dict], runner: str = "trt") -> str:
    """``polygraphy run`` comparing the engine built beside ``onnx_path`` (``runner="trt"``) or the
    ONNX file itself in ONNX Runtime (``"onnxrt"``, unoptimized: the reference semantics) with the
    reference outputs, by the export's criteria: max abs error per output, cosine where the
    precision has a bound, NaN/Inf (``--validate``). It saves what it ran for ``lean.check_engine``."""
    stem = str(onnx_path).removesuffix(".onnx")
    inputs, outputs = check_file_names(Path(onnx_path).name)
    folder = Path(onnx_path).parent
    q = shlex.quote
    model = f"{q(stem + '.plan')} --model-type engine --trt" if runner == "trt" else \
        f"{q(str(onnx_path))} --onnxrt --graph-optimization-level ORT_DISABLE_ALL"
    cosine = {k: c["min_cosine"] for k, c in per_output.items() if c["min_cosine"] is not None}
    saved = stem + (ENGINE_OUTPUTS if runner == "trt" else ".onnxrt-outputs.json")
    cmd = (f"polygraphy run {model} --load-inputs {q(str(folder / inputs))} --load-outputs {q(str(folder / outputs))} "
           f"--save-outputs {q(saved)} --validate "
           f"--compare simple{' cosine_similarity' if cosine else ''} --check-error-stat max --rtol 0 --atol "
           + " ".join(f"{k}:{_bound(c['atol'])}" for k, c in per_output.items()))
    if cosine:
        cmd += " --cosine-similarity-threshold " + " ".join(f"{k}:{v:g}" for k, v in cosine.items())
    return cmd


def check_command(onnx_path: Path) -> str:
    stem = str(onnx_path).removesuffix(".onnx")
    return f"python -m lean.check_engine {shlex.quote(stem + ENGINE_OUTPUTS)} {shlex.quote(stem + OUTPUTS)}"


# -- python -m lean.check_engine ---------------------------------------------------------------


@dataclass
class CheckOptions:
    engine_outputs: Path  # Polygraphy's --save-outputs of the engine
    reference: Path  # the export's <graph>.outputs.json
    precision: str | None = None  # None: from report.json beside the reference


@dataclass
class Verdict:
    runner: str
    iteration: int
    output: str
    stats: dict

    @property
    def ok(self) -> bool:
        return bool(self.stats["ok"])

    def line(self) -> str:
        s = self.stats
        head = f"{'ok  ' if self.ok else 'FAIL'} {self.output} ({self.runner}, iteration {self.iteration})"
        if s["max_abs_err"] is None:
            return f"{head}: {s['failed']}"
        steps = s["max_abs_err"] / (s["ref_max_abs"] / 127.0) if s["ref_max_abs"] else 0.0
        cos = f"cosine {s['cosine']:.6f}" + (f" (bound {s['min_cosine']})" if s.get("min_cosine") else "")
        figures = (f"{cos}, max abs error {s['max_abs_err']:.4g} (bound {s['tolerance']:.4g}; {steps:.1f} steps of "
                   f"max |ref|/127), NaN/Inf 0")
        return f"{head}: {figures}" + (f"; {s['failed']}" if s["failed"] else "")


def _results(path: Path, what: str):
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    path = Path(path)
    if not path.is_file():
        raise LeanError(f"{path}: no such file; give the {what}")
    _quiet()
    try:
        results = load_json(str(path))  # arrays decode with allow_pickle=False: no code runs
    except Exception as e:  # json's, base64's or numpy's own errors on a damaged file
        raise LeanError(f"{path} is not a Polygraphy RunResults JSON ({type(e).__name__}); give the {what}") from None
    if not isinstance(results, RunResults):
        raise LeanError(f"{path} is not a Polygraphy RunResults JSON (it holds a {type(results).__name__}); "
                        f"give the {what}")
    if not len(results) or not results[0][1]:
        raise LeanError(f"{path} holds no results; give the {what}")
    return results


def criteria_of(opts: CheckOptions) -> tuple[Tolerance, str]:
    """The export's tolerance for the reference's precision, and where it came from."""
    if opts.precision:
        return engine_tolerance(opts.precision), f"--precision {opts.precision}"
    report = Path(opts.reference).parent / REPORT_FILE
    hint = "keep report.json beside it, or pass --precision fp16|int8"
    try:
        facts = json.loads(report.read_text())
    except FileNotFoundError:
        raise LeanError(f"no {report} to say which precision {Path(opts.reference).name} is for: {hint}") from None
    except (OSError, ValueError) as e:
        raise LeanError(f"{report} cannot be read ({e}): {hint}") from None
    precision = facts.get("precision") if isinstance(facts, dict) else None
    if precision not in ("fp16", "int8"):
        raise LeanError(f"{report} names no precision: {hint}")
    return engine_tolerance(precision), f"{report} ({precision})"


def check_engine(opts: CheckOptions) -> tuple[list[Verdict], str]:
    """Every output of every runner and iteration of the engine's results against the reference,
    by the export's criteria. Returns the verdicts and where the criteria came from."""
    tol, source = criteria_of(opts)
    reference = _results(opts.reference, "reference outputs the export wrote (<graph>.outputs.json)")
    engine = _results(opts.engine_outputs, "outputs Polygraphy saved of the engine (--save-outputs)")
    refs = reference[0][1]
    verdicts = []
    for runner, iterations in engine:
        if len(iterations) != len(refs):
            raise LeanError(f"{opts.engine_outputs}: {runner} ran {len(iterations)} iterations, the reference holds "
                            f"{len(refs)}; run polygraphy with the export's --load-inputs file")
        for i, (got, ref) in enumerate(zip(iterations, refs)):
            for name, want in ref.items():
                if name not in got:
                    stats = {"ok": False, "max_abs_err": None, "failed": f"not among the engine's outputs ({', '.join(got.keys())})"}
                elif tuple(got[name].shape) != tuple(want.shape):
                    stats = {"ok": False, "max_abs_err": None,
                             "failed": f"shape {tuple(got[name].shape)}, the reference has {tuple(want.shape)}"}
                else:
                    stats = compare(got[name], want, tol)
                verdicts.append(Verdict(runner, i, name, stats))
    return verdicts, source
