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


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants now (MB; shared pages count in each)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total / 2**20


def ptq_memory(ckpt, tree: Path, samples: int, device: str, method: str) -> dict:
    """The real CLI on ``samples`` nuScenes samples: wall time, the largest process's peak RSS
    (the calibration process or one loader worker) and the whole process tree's RSS, sampled."""
    import threading

    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "lean.ptq", "--ckpt", str(ckpt), "--out", str(Path(tmp) / "ptq.pth"),
                "--nuscenes", str(tree), "--version", "v1.0-test", "--samples", str(samples),
                "--method", method, "--device", device]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        peak_tree = [0.0]
        with tempfile.TemporaryFile("w+") as err:
            t = time.perf_counter()
            proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
            done = threading.Event()

            def sample():
                while not done.wait(0.2):
                    peak_tree[0] = max(peak_tree[0], tree_rss_mb(proc.pid))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            _, status, usage = os.wait4(proc.pid, 0)
            done.set()
            sampler.join()
            wall = time.perf_counter() - t
            if os.waitstatus_to_exitcode(status):
                err.seek(0)
                raise SystemExit(f"lean.ptq failed:\n{err.read()[-3000:]}")
    return {"samples": samples, "wall_s": wall, "largest_process_peak_rss_mb": usage.ru_maxrss / 1024,
            "process_tree_peak_rss_mb": peak_tree[0]}


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
    """The results of the parts measured so far (a part never run on this machine has no row)."""
    rows = ["| measurement | figure | target |", "|---|---|---|"]
    if "export_int8" in res:
        rows += _export_rows(res)
    rows += _other_rows(res)
    text = "\n".join(rows) + "\n"
    by_stage = [("INT8 export (TensorRT 10/11 typed)", res.get("export_int8")),
                ("INT8 export (TensorRT 8 classic)", res.get("export_int8_trt8"))]
    for label, run in by_stage:
        if run:
            text += f"\n{label} by stage: " + " / ".join(f"{k} {v:.1f}s" for k, v in run["stages_s"].items()) + "\n"
    return text


def _export_rows(res: dict) -> list[str]:
    e8, e16, fl = res["export_int8"], res["export_fp16"], res["floor"]
    return [
        f"| INT8 export wall (TensorRT 10/11 typed, from PTQ checkpoint), median of {len(e8['runs_wall_s'])} | {e8['wall_s']:.1f} s "
        f"(runs: {', '.join(f'{w:.1f}' for w in e8['runs_wall_s'])}) | < {TARGETS['export_wall_s']:.0f} s |",
        f"| INT8 export peak RSS (highest run) | {max(e8['runs_peak_rss_mb']):.0f} MB | < {TARGETS['export_peak_rss_mb']:.0f} MB |",
        f"| floor (bare typed torch.export-based export of the backbone + ORT run + forward) | {fl['floor_s']:.1f} s "
        f"of work; whole process {fl['process_wall_s']:.1f} s, peak {fl['peak_rss_mb']:.0f} MB | |",
        f"| INT8 export / floor (whole process each) | {res['export_vs_floor']:.2f}x | < {TARGETS['export_vs_floor']} |",
        f"| FP16 export wall (typed) | {e16['wall_s']:.1f} s, peak {e16['peak_rss_mb']:.0f} MB | |",
    ] + ([f"| INT8 export wall, TensorRT 8 classic | {res['export_int8_trt8']['wall_s']:.1f} s, "
          f"peak {res['export_int8_trt8']['peak_rss_mb']:.0f} MB | |"] if "export_int8_trt8" in res else [])


def _other_rows(res: dict) -> list[str]:
    rows = []
    for key, method in (("calibration", "mse, histogram"), ("calibration_max", "max")):
        if key in res:
            c = res[key]
            first = f"; first batch {c['first_batch_s']:.2f} s incl. setup"
            if "amax_s" in c:
                first += f", amax searches {c['amax_s']:.2f} s"
            if "overhead_vs_graphed" in c:
                first += (f"; {c['overhead_vs_graphed'] * 100:+.0f}% against the plain forward as a CUDA graph "
                          f"({c['graphed_plain_forward_s'] * 1000:.1f} ms)")
            rows.append(f"| calibration ({method}), per batch of 6 images | {c['samples_per_s']:.2f} samples/s, "
                        f"overhead {c['overhead'] * 100:.0f}% over a plain forward ({c['plain_forward_s'] * 1000:.1f} ms){first} "
                        f"| {'GPU < {:.0%}'.format(TARGETS['gpu_calibration_overhead']) if key == 'calibration' else ''} |")
    if "ptq_throughput" in res:
        t = res["ptq_throughput"]
        rows.append(f"| PTQ end to end from a nuScenes tree on disk ({t['method']}, {t['samples']} samples, "
                    f"{t['workers']} loader processes) | {t['end_to_end_samples_per_s']:.1f} samples/s; the loader alone "
                    f"{t['loader_samples_per_s']:.1f} samples/s; calibration waited for data "
                    f"{t['waited_for_data_share'] * 100:.0f}% of the time; whole run {t['whole_run_s']:.1f} s "
                    f"| {'GPU >= 100 samples/s' if res['device'] == 'cuda' else ''} |")
    if "ptq_memory" in res:
        runs = res["ptq_memory"]
        rows.append("| `lean.ptq --nuscenes` memory by sample count (largest process peak / process tree peak) | "
                    + "; ".join(f"{m['samples']}: {m['largest_process_peak_rss_mb']:.0f} / "
                                f"{m['process_tree_peak_rss_mb']:.0f} MB in {m['wall_s']:.0f} s" for m in runs)
                    + " | flat |")
    if "ranges" in res:
        r = res["ranges"]
        rows.append(f"| FP32 range measurement of the backbone graph ({r['samples']} samples, {r['tensors']} tensors) | "
                    f"{r['measure_run_s']:.2f} s a sample against {r['ort_run_s']:.2f} s for a plain ORT run "
                    f"(+{r['measure_setup_s']:.1f} s set-up, trace {r['trace_s']:.1f} s); largest tensor "
                    f"{r['largest_max']:.4g} ({r['above_bound']} above the bound); max over all samples / max on the "
                    f"first: median {r['spread_median']:.2f}, p99 {r['spread_p99']:.2f}, largest {r['spread_max']:.2f} | |")
    for name, lat in res.get("latency", {}).items():
        fid = lat["vs_float_pytorch"]["camera_feature"]
        rows.append(f"| ORT CPU latency, {name} backbone graph | {lat['median_s'] * 1000:.0f} ms (median of {lat['runs']}) | "
                    f"cos {fid['cosine']:.4f}, max err {fid['max_abs_err']:.3g} vs float |")
    if "bev_pool" in res:
        rows.append(f"| BEV pooling, full size | {res['bev_pool']['seconds']:.2f} s, peak {res['bev_pool']['peak_rss_mb']:.0f} MB | a few s |")
    return rows


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
    parts: tuple[str, ...] = ()  # empty: all of PARTS


def render(results: Path) -> None:
    """Re-render one results file's table into BENCHMARKS.md (and its derived figures into the file)."""
    res = json.loads(Path(results).read_text())
    if "export_int8" in res:
        res["export_vs_floor"] = export_vs_floor(res)
    write_text(Path(results), json.dumps(res, indent=2) + "\n")
    doc = (ROOT / "BENCHMARKS.md").read_text() if (ROOT / "BENCHMARKS.md").exists() else ""
    start = doc.find(f"<!-- {res['machine']} -->")
    device_text = doc[start:].split("\n")[3] if start >= 0 else f"Device: {res['machine']}."
    update_markdown(res["machine"], device_text, table(res))


# Samples of the end-to-end PTQ run and of the memory runs: a CPU calibrates a sample in seconds.
THROUGHPUT_SAMPLES = {"cuda": 300, "cpu": 8}
MEMORY_SAMPLES = {"cuda": (50, 100, 200, 300), "cpu": (4, 8, 16)}


def nuscenes_bench(opts: BenchOptions, tmp: Path) -> dict:
    """A synthetic nuScenes tree (``lean.scene``; 30 samples a scene, 9 sweeps between key frames) on
    disk, then end-to-end PTQ throughput from it and the memory of PTQ runs of growing size."""
    from lean.scene import make_nuscenes_tree

    largest = max(THROUGHPUT_SAMPLES[opts.device], *MEMORY_SAMPLES[opts.device])
    tree = make_nuscenes_tree(tmp / "nuscenes", opts.data, scenes=-(-largest // 30), samples_per_scene=30,
                              version="v1.0-test")
    out = {"ptq_throughput": measure("throughput", opts.float_ckpt, tree, opts.device,
                                     THROUGHPUT_SAMPLES[opts.device])["result"]}
    # max on the CPU: the memory is the point there, and mse calibration takes twice as long.
    method = "mse" if opts.device == "cuda" else "max"
    out["ptq_memory"] = [ptq_memory(opts.float_ckpt, tree, n, opts.device, method) for n in MEMORY_SAMPLES[opts.device]]
    return out


PARTS = ("export", "calibration", "nuscenes", "latency", "ranges")
RANGE_SAMPLES = 8


def run_bench(opts: BenchOptions) -> str:
    """The measurements of ``opts.parts`` on ``opts.device``; the others are kept from the machine's
    results file. Writes the results file and the table, returns the table."""
    name = machine_name(opts.device)
    path = ROOT / "bench" / "results" / f"{name}.json"
    parts = opts.parts or PARTS
    res = json.loads(path.read_text()) if path.exists() and set(parts) != set(PARTS) else {}
    res.update(machine=name, device=opts.device)
    with tempfile.TemporaryDirectory() as tmp:
        out8, out16 = Path(tmp) / "int8", Path(tmp) / "fp16"
        if "export" in parts or "latency" in parts:
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
        if "calibration" in parts:
            print("calibration ...", file=sys.stderr)
            # A CPU forward takes seconds: fewer batches there.
            batches = 40 if opts.device == "cuda" else 2
            for key, method in (("calibration", "mse"), ("calibration_max", "max")):
                res[key] = measure("calibration", opts.float_ckpt, opts.data, opts.device, method, batches)["result"]
        if "nuscenes" in parts:
            print("PTQ from a nuScenes tree on disk ...", file=sys.stderr)
            res.update(nuscenes_bench(opts, Path(tmp)))
        if "ranges" in parts:
            print("FP32 range measurement ...", file=sys.stderr)
            from lean.scene import make_nuscenes_tree

            tree = make_nuscenes_tree(Path(tmp) / "ranges", opts.data, scenes=1, samples_per_scene=RANGE_SAMPLES,
                                      version="v1.0-test")
            res["ranges"] = measure("ranges", opts.ckpt, tree, opts.device, RANGE_SAMPLES)["result"]
        if "latency" in parts:
            print("ONNX Runtime latency ...", file=sys.stderr)
            res["latency"] = measure("latency", json.dumps({"FP16 typed": str(out16), "INT8 Q/DQ typed": str(out8),
                                                "INT8 Q/DQ classic": str(Path(tmp) / "int8-trt8")}),
                                     opts.data, opts.ckpt)["result"]
    if opts.device == "cpu" and "export" in parts:
        from bench.bev_pool import run as bev_pool

        res["bev_pool"] = bev_pool()
    import torch

    device_text = (f"Device: {torch.cuda.get_device_name()}" if opts.device == "cuda"
                   else f"Device: CPU, {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    device_text += f"; torch {torch.__version__}, Python {platform.python_version()}."
    write_text(path, json.dumps(res, indent=2) + "\n")
    text = table(res)
    update_markdown(name, device_text, text)
    return text
