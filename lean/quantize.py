"""The quantize stage: float checkpoint -> calibrated PTQ checkpoint (INT8 scales for the export).

Reads the float checkpoint, builds the BN-folded model, places ModelOpt's quantizers
(``lean.quant.modelopt``), runs the calibration data through it and saves the folded weights
with every quantizer's amax in the project's format.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lean
from lean.build import build_folded, resolve_config, resolve_device, versions
from lean.checkpoint import read_checkpoint, save_checkpoint
from lean.config import DEFAULT_DATA, DEMO_FLOAT_CKPT, DEMO_PTQ_CKPT
from lean.data import MATRIX_FILES, load_inputs
from lean.errors import LeanError
from lean.io import clean_stale, ensure_writable
from lean.log import logger
from lean.quant.modelopt import calibrate, insert_quantizers, quant_config


@dataclass
class PTQOptions:
    ckpt: Path = DEMO_FLOAT_CKPT
    out: Path = DEMO_PTQ_CKPT
    data: Path = DEFAULT_DATA  # an example-data folder, or a folder of them (one sample each)
    method: str = "mse"
    batches: int | None = None  # None: one per sample
    device: str = "auto"
    cameras: int | None = None
    quantize_downsample: bool = False
    progress: bool = True  # a progress bar on stderr


def calibration_folders(data: Path) -> list[Path]:
    """``data`` is one example-data folder, or a folder of them (one sample each)."""
    data = Path(data)
    if not data.is_dir():
        raise LeanError(f"calibration data {data} is not a folder: pass an example-data folder or a folder of them")
    marker = f"{MATRIX_FILES[0]}.tensor"  # every sample has it; points.tensor only where depth is used
    if (data / marker).exists():
        return [data]
    found = sorted(p for p in data.iterdir() if (p / marker).exists())
    if not found:
        raise LeanError(f"{data} holds no samples: expected {marker} in it or in its subfolders")
    return found


def run_ptq(opts: PTQOptions) -> dict:
    """Calibrate and write ``opts.out``; returns the metadata saved with it."""
    quant_config(opts.method)  # a bad method is a one-line error before any work
    device = resolve_device(opts.device)
    folders = calibration_folders(opts.data)
    batches = len(folders) if opts.batches is None else opts.batches
    if batches < 1:
        raise LeanError(f"--batches must be at least 1, got {batches}")
    out = Path(opts.out)
    if out.is_dir():
        raise LeanError(f"--out {out} is a folder: pass the .pth file to write, e.g. {out / 'bevfusion_ptq.pth'}")
    ensure_writable(out.parent)  # before calibrating, not after
    clean_stale(out.parent, out.name)  # temp files of PTQ runs into this file that were killed
    logger.info("reading %s", opts.ckpt)
    ckpt = read_checkpoint(opts.ckpt)
    if ckpt.kind != "float":
        raise LeanError(f"{opts.ckpt} is already quantized ({ckpt.source}): PTQ starts from a float checkpoint")
    cfg = resolve_config(ckpt, cameras=opts.cameras)
    model = build_folded(cfg, ckpt.state_dict, f"checkpoint {opts.ckpt}")
    model = insert_quantizers(model, opts.method, opts.quantize_downsample).to(device)

    def samples() -> Iterator:
        # Each sample is read when needed, so hundreds of calibration folders never sit in memory.
        for folder in itertools.islice(itertools.cycle(folders), batches):
            sample, img, depth = load_inputs(folder, cfg)
            yield img.to(device), None if depth is None else depth.to(device), sample

    t = time.perf_counter()
    with _progress(batches, f"calibrating ({opts.method})", opts.progress) as bar:  # closed before any error prints
        seen = calibrate(model, samples(), opts.method, progress=lambda n: bar.update(1))
    seconds = time.perf_counter() - t
    meta = {
        "calibration": {"method": opts.method, "batches": seen, "samples": len(folders), "data": str(opts.data),
                        # No wall time: two runs of the same calibration write the same bytes.
                        "quantize_downsample": opts.quantize_downsample, "device": str(device)},
        "source": {"path": str(opts.ckpt), "sha256": ckpt.sha256, "format": ckpt.source},
        "versions": versions(),
        "producer": f"lean {lean.__version__}",
    }
    if "note" in ckpt.meta:
        meta["note"] = ckpt.meta["note"]
    save_checkpoint(opts.out, model.state_dict(), "ptq", cfg, meta)
    logger.info("wrote %s (%d batches in %.1fs)", opts.out, seen, seconds)
    return meta


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", disable=not enabled, file=sys.stderr)
