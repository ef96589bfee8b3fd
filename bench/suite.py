"""The benchmark suite: export, floor, calibration, ONNX Runtime latency and BEV pooling, in one run.

Writes bench/results/<machine>.json and that machine's table in BENCHMARKS.md. Each measurement
runs in its own process (``bench.measure``), so each peak RSS is its own.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lean.config import DEFAULT_DATA, DEMO_FLOAT_CKPT, DEMO_PTQ_CKPT
from lean.io import write_text

ROOT = Path(__file__).resolve().parents[1]
EXPORT_RUNS = 3  # the INT8 export is timed this many times; the median run is reported
TARGETS = {"export_wall_s": 20.0, "export_peak_rss_mb": 1600.0, "export_vs_floor": 0.8, "gpu_calibration_overhead": 0.25}


def run_child(args: list[str]) -> tuple[str, float, float]:
    """Run one child process as a user would; its stdout, wall time and its own peak RSS (MB).

    The wall time covers everything the user waits for: interpreter start, imports, the work and
    the teardown. ``os.wait4`` gives this child's own ``ru_maxrss``.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise SystemExit(f"{' '.join(args[1:4])} ... failed:\n{err.read()[-3000:]}")
        return out.read(), wall, usage.ru_maxrss / 1024


def measure(*args) -> dict:
    """One ``bench.measure`` measurement in its own process, with that process's wall time."""
    stdout, wall, _ = run_child([sys.executable, "-m", "bench.measure", *map(str, args)])
    return {"result": json.loads(stdout.strip().splitlines()[-1]), "process_wall_s": wall}


def export(ckpt, out: Path, data, precision: str, device: str, tensorrt: str = "10") -> dict:
    """The real CLI, ``python export_camera.py ...``; stages and errors from the report it writes."""
    args = [sys.executable, "export_camera.py", "--ckpt", str(ckpt), "--out", str(out), "--data", str(data),
            "--device", device, "--tensorrt", tensorrt] + (["--fp16"] if precision == "fp16" else [])
    _, wall, rss = run_child(args)
    report = json.loads((Path(out) / "report.json").read_text())
    stages = dict(report["stages_seconds"])
    stages["start/imports/exit"] = wall - sum(stages.values())
    return {"precision": precision, "tensorrt": tensorrt, "device": device, "wall_s": wall, "stages_s": stages,
            "peak_rss_mb": rss,
            "max_error": {f: max((o["max_abs_err"] for o in g["outputs"].values()), default=0.0)
                          for f, g in report["files"].items()}}


def export_vs_floor(res: dict) -> float:
    """Whole INT8 export process against the whole floor process (imports, load, build, the bare work)."""
    fl = res["floor"]
    return res["export_int8"]["wall_s"] / fl["process_wall_s"]


def machine_name(device: str) -> str:
    if device == "cuda":
        import torch

        return "cuda-" + torch.cuda.get_device_name().replace(" ", "-").lower()
    return f"cpu-{os.cpu_count()}core-{platform.machine()}"


def table(res: dict) -> str:
    e8, e16, fl = res["export_int8"], res["export_fp16"], res["floor"]
    cal = res["calibration"]
    rows = [
        "| measurement | figure | target |",
        "|---|---|---|",
        f"| INT8 export wall (TensorRT 10/11 typed, from PTQ checkpoint), median of {len(e8['runs_wall_s'])} | {e8['wall_s']:.1f} s "
        f"(runs: {', '.join(f'{w:.1f}' for w in e8['runs_wall_s'])}) | < {TARGETS['export_wall_s']:.0f} s |",
        f"| INT8 export peak RSS (highest run) | {max(e8['runs_peak_rss_mb']):.0f} MB | < {TARGETS['export_peak_rss_mb']:.0f} MB |",
        f"| floor (bare typed torch.export-based export of the backbone + ORT run + forward) | {fl['floor_s']:.1f} s "
        f"of work; whole process {fl['process_wall_s']:.1f} s, peak {fl['peak_rss_mb']:.0f} MB | |",
        f"| INT8 export / floor (whole process each) | {res['export_vs_floor']:.2f}x | < {TARGETS['export_vs_floor']} |",
        f"| FP16 export wall (typed) | {e16['wall_s']:.1f} s, peak {e16['peak_rss_mb']:.0f} MB | |",
    ]
    if "export_int8_trt8" in res:
        c8 = res["export_int8_trt8"]
        rows.append(f"| INT8 export wall, TensorRT 8 classic | {c8['wall_s']:.1f} s, peak {c8['peak_rss_mb']:.0f} MB | |")
    for key, method in (("calibration", "mse, histogram"), ("calibration_max", "max")):
        if key in res:
            c = res[key]
            first = f"; first batch {c['first_batch_s']:.2f} s incl. setup"
            if "overhead_vs_graphed" in c:
                first += (f"; {c['overhead_vs_graphed'] * 100:+.0f}% against the plain forward as a CUDA graph "
                          f"({c['graphed_plain_forward_s'] * 1000:.1f} ms)")
            rows.append(f"| calibration ({method}), per batch of 6 images | {c['samples_per_s']:.2f} samples/s, "
                        f"overhead {c['overhead'] * 100:.0f}% over a plain forward ({c['plain_forward_s'] * 1000:.1f} ms){first} "
                        f"| {'GPU < {:.0%}'.format(TARGETS['gpu_calibration_overhead']) if key == 'calibration' else ''} |")
    for name, lat in res["latency"].items():
        fid = lat["vs_float_pytorch"]["camera_feature"]
        rows.append(f"| ORT CPU latency, {name} backbone graph | {lat['median_s'] * 1000:.0f} ms (median of {lat['runs']}) | "
                    f"cos {fid['cosine']:.4f}, max err {fid['max_abs_err']:.3g} vs float |")
    if "bev_pool" in res:
        rows.append(f"| BEV pooling, full size | {res['bev_pool']['seconds']:.2f} s, peak {res['bev_pool']['peak_rss_mb']:.0f} MB | a few s |")
    by_stage = [("INT8 export (TensorRT 10/11 typed)", e8)]
    if "export_int8_trt8" in res:
        by_stage.append(("INT8 export (TensorRT 8 classic)", res["export_int8_trt8"]))
    text = "\n".join(rows) + "\n"
    for label, run in by_stage:
        text += f"\n{label} by stage: " + " / ".join(f"{k} {v:.1f}s" for k, v in run["stages_s"].items()) + "\n"
    return text


def update_markdown(name: str, device_text: str, text: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    doc = path.read_text() if path.exists() else "# Benchmarks\n\nReproduce with `make bench` (CPU) or `.venv/bin/python -m bench --device cuda`.\n"
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{start}\n## {name}\n\n{device_text}\n\n{text}{end}"
    if start in doc:
        doc = doc[: doc.index(start)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    write_text(path, doc)


@dataclass
class BenchOptions:
    ckpt: Path = DEMO_PTQ_CKPT
    float_ckpt: Path = DEMO_FLOAT_CKPT
    data: Path = DEFAULT_DATA
    device: str = "cpu"


def render(results: Path) -> None:
    """Re-render one results file's table into BENCHMARKS.md (and its derived figures into the file)."""
    res = json.loads(Path(results).read_text())
    res["export_vs_floor"] = export_vs_floor(res)
    write_text(Path(results), json.dumps(res, indent=2) + "\n")
    doc = (ROOT / "BENCHMARKS.md").read_text()
    start = doc.index(f"<!-- {res['machine']} -->")
    device_text = doc[start:].split("\n")[3]
    update_markdown(res["machine"], device_text, table(res))


def run_bench(opts: BenchOptions) -> str:
    """Every measurement on ``opts.device``; writes the results file and the table, returns the table."""
    name = machine_name(opts.device)
    res = {"machine": name, "device": opts.device}
    with tempfile.TemporaryDirectory() as tmp:
        out8, out16 = Path(tmp) / "int8", Path(tmp) / "fp16"
        runs = []
        for i in range(EXPORT_RUNS):
            print(f"export INT8 ({i + 1}/{EXPORT_RUNS}) ...", file=sys.stderr)
            runs.append(export(opts.ckpt, out8, opts.data, "int8", opts.device))
        res["export_int8"] = dict(sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2])  # the median run
        res["export_int8"]["runs_wall_s"] = [r["wall_s"] for r in runs]
        res["export_int8"]["runs_peak_rss_mb"] = [r["peak_rss_mb"] for r in runs]
        print("export FP16 ...", file=sys.stderr)
        res["export_fp16"] = export(opts.ckpt, out16, opts.data, "fp16", opts.device)
        print("export INT8 for TensorRT 8 ...", file=sys.stderr)
        res["export_int8_trt8"] = export(opts.ckpt, Path(tmp) / "int8-trt8", opts.data, "int8", opts.device, "8")
        print("floor ...", file=sys.stderr)
        floor = measure("floor", opts.ckpt, opts.data, opts.device)
        res["floor"] = {**floor["result"], "process_wall_s": floor["process_wall_s"]}
        res["export_vs_floor"] = export_vs_floor(res)
        print("calibration ...", file=sys.stderr)
        # A CPU forward takes seconds: fewer batches there.
        batches = 8 if opts.device == "cuda" else 2
        for key, method in (("calibration", "mse"), ("calibration_max", "max")):
            res[key] = measure("calibration", opts.float_ckpt, opts.data, opts.device, method, batches)["result"]
        print("ONNX Runtime latency ...", file=sys.stderr)
        res["latency"] = measure("latency", json.dumps({"FP16 typed": str(out16), "INT8 Q/DQ typed": str(out8),
                                            "INT8 Q/DQ classic": str(Path(tmp) / "int8-trt8")}),
                                 opts.data, opts.ckpt)["result"]
    if opts.device == "cpu":
        from bench.bev_pool import run as bev_pool

        res["bev_pool"] = bev_pool()
    import torch

    device_text = (f"Device: {torch.cuda.get_device_name()}" if opts.device == "cuda"
                   else f"Device: CPU, {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    device_text += f"; torch {torch.__version__}, Python {platform.python_version()}."
    write_text(ROOT / "bench" / "results" / f"{name}.json", json.dumps(res, indent=2) + "\n")
    text = table(res)
    update_markdown(name, device_text, text)
    return text
