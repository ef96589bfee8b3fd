"""INT8 post-training quantization: float checkpoint -> calibrated PTQ checkpoint.

    python -m lean.ptq --ckpt model/resnet50/bevfusion-det.pth --out model/resnet50int8/bevfusion_ptq.pth
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

from lean.cli import add_common, log, run


def calibration_folders(data: Path) -> list[Path]:
    """``data`` is one example-data folder, or a folder of them (one sample each)."""
    from lean.errors import LeanError

    if not data.is_dir():
        raise LeanError(f"calibration data {data} is not a folder: pass an example-data folder or a folder of them")
    if (data / "points.tensor").exists():
        return [data]
    found = sorted(p for p in data.iterdir() if (p / "points.tensor").exists())
    if not found:
        raise LeanError(f"{data} holds no samples: expected points.tensor in it or in its subfolders")
    return found


def run_ptq(ckpt_path: Path, out: Path, data: Path, method: str = "mse", batches: int | None = None,
            device: str = "auto", quantize_downsample: bool = False, progress: bool = True, log=log,
            cameras: int | None = None) -> dict:
    from lean import __version__
    from lean.checkpoint import load_weights, read_checkpoint, save_checkpoint
    from lean.data import load_example
    from lean.errors import LeanError
    from lean.export import resolve_config, resolve_device, versions
    from lean.geometry import depth_image
    from lean.models import build_camera
    from lean.quantize import calibrate, fold_bn, insert_quantizers, quant_config

    quant_config(method)  # reject a bad method before any work
    dev = resolve_device(device)
    folders = calibration_folders(Path(data))
    batches = batches or len(folders)
    if batches < 1:
        raise LeanError(f"--batches must be at least 1, got {batches}")
    log(f"reading {ckpt_path}")
    ckpt = read_checkpoint(ckpt_path)
    if ckpt.kind != "float":
        raise LeanError(f"{ckpt_path} is already quantized ({ckpt.source}): PTQ starts from a float checkpoint")
    cfg = resolve_config(ckpt, cameras=cameras)
    model = build_camera(cfg)
    load_weights(model, ckpt.state_dict, f"checkpoint {ckpt_path}")
    model = insert_quantizers(fold_bn(model), method, quantize_downsample).to(dev)

    def samples():
        # Each sample is read when needed, so hundreds of calibration folders never sit in memory.
        for folder in itertools.islice(itertools.cycle(folders), batches):
            s = load_example(folder, image_size=cfg.image_size, cameras=cfg.cameras)
            depth = depth_image(s.points, s.lidar2image, s.img_aug_matrix, cfg.image_size)
            yield s.img.to(dev), depth.to(dev), s

    bar = _progress(batches, f"calibrating ({method})", progress)
    t = time.perf_counter()
    seen = calibrate(model, samples(), method, progress=lambda n: bar.update(1))
    bar.close()
    seconds = time.perf_counter() - t
    meta = {
        "calibration": {"method": method, "batches": seen, "samples": len(folders), "data": str(data),
                        "quantize_downsample": quantize_downsample, "device": str(dev), "seconds": round(seconds, 2)},
        "source": {"path": str(ckpt_path), "sha256": ckpt.sha256, "format": ckpt.source},
        "versions": versions(),
        "producer": f"lean {__version__}",
    }
    if "note" in ckpt.meta:
        meta["note"] = ckpt.meta["note"]
    save_checkpoint(out, model.state_dict(), "ptq", cfg, meta)
    log(f"wrote {out} ({seen} batches in {seconds:.1f}s)")
    return meta


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", disable=not enabled, file=sys.stderr)


def parser() -> argparse.ArgumentParser:
    from lean.quantize import CALIBRATION_METHODS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=Path("model/resnet50/bevfusion-det.pth"), help="float checkpoint")
    p.add_argument("--out", type=Path, default=Path("model/resnet50int8/bevfusion_ptq.pth"))
    p.add_argument("--data", type=Path, default=Path("example-data"),
                   help="an example-data folder, or a folder of them (one sample each)")
    p.add_argument("--method", choices=CALIBRATION_METHODS, default="mse", help="activation amax method (default mse)")
    p.add_argument("--batches", type=int, default=None, help="calibration batches (default: one per sample)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--cameras", type=int, default=None, help="cameras per sample (default 6)")
    p.add_argument("--quantize-downsample", action="store_true", help="also quantize the vtransform downsample")
    add_common(p)
    return p


def main(args) -> None:
    run_ptq(args.ckpt, args.out, args.data, args.method, args.batches, args.device, args.quantize_downsample,
            cameras=args.cameras)


if __name__ == "__main__":
    sys.exit(run(main, parser=parser()))
