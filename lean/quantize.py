"""The quantize stage: float checkpoint -> calibrated PTQ checkpoint (INT8 scales for the export).

Reads the float checkpoint, builds the BN-folded model, places ModelOpt's quantizers
(``lean.quant.modelopt``), runs the calibration data through it and saves the folded weights
with every quantizer's amax in the project's format.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lean
from lean.build import build_folded, build_quantized, resolve_config, resolve_device, versions
from lean.checkpoint import read_checkpoint, save_checkpoint
from lean.config import DEFAULT_DATA, DEMO_FLOAT_CKPT, DEMO_PTQ_CKPT
from lean.data import backbone_inputs, sample_folders
from lean.errors import LeanError
from lean.io import clean_stale, ensure_writable
from lean.loader import FrameSet, Stream, folder_set, nuscenes_set, worker_deaths
from lean.log import logger
from lean.nuscenes import DEFAULT_SAMPLES, DEFAULT_SPLIT, SWEEPS, check_dataroot, plan_samples
from lean.quant.modelopt import calibrate, insert_quantizers, quant_config
from lean.ranges import RECORD_SAMPLES, record


FEW_SAMPLES = 8  # fewer distinct calibration samples than this is warned


@dataclass
class PTQOptions:
    ckpt: Path = DEMO_FLOAT_CKPT
    out: Path = DEMO_PTQ_CKPT
    data: Path = DEFAULT_DATA  # an example-data folder, or a folder of them (one sample each)
    nuscenes: Path | None = None  # a nuScenes dataroot instead of ``data``
    version: str = "v1.0-trainval"
    split: str | None = None  # None: the version's default (val, test, mini_val)
    samples: int = DEFAULT_SAMPLES  # nuScenes samples, spread over the split's scenes
    seed: int = 0  # which samples
    method: str = "mse"
    batches: int | None = None  # None: one per sample
    workers: int | None = None  # loader processes; None: one per CPU less one
    device: str = "auto"
    cameras: int | None = None
    quantize_downsample: bool = False
    progress: bool = True  # a progress bar on stderr
    ranges: bool = True  # record every tensor's FP32 range for the export's FP32 islands


def run_ptq(opts: PTQOptions) -> dict:
    """Calibrate and write ``opts.out``; returns the metadata saved with it."""
    quant_config(opts.method)  # a bad method is a one-line error before any work
    device = resolve_device(opts.device)
    _check_counts(opts)
    # A bad --data or --nuscenes is a one-line error before any work.
    folders = None
    if opts.nuscenes is None:
        folders = sample_folders(opts.data)
    else:
        check_dataroot(opts.nuscenes)
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
    frames, source = calibration_set(opts, cfg, folders)  # the tables' errors before the model is built
    model = build_folded(cfg, ckpt.state_dict, f"checkpoint {opts.ckpt}", source=ckpt.source)
    batches = len(frames) if opts.batches is None else opts.batches
    model = insert_quantizers(model, opts.method, opts.quantize_downsample).to(device)
    stream = Stream(frames, batches, device, opts.workers)

    def samples():
        for frame in stream:
            img, depth = frame.inputs()
            yield img, depth, frame

    distinct = min(len(frames), batches)
    repeats = f", each seen {batches / distinct:.3g} times" if batches > distinct else ""
    logger.info("calibrating on %d batches: %d distinct samples of %s%s, with %d loader processes", batches, distinct,
                source["data"], repeats, stream.workers)
    if distinct < FEW_SAMPLES:
        logger.warning("only %d distinct calibration samples: the scales fit %s and may not fit other scenes; "
                       "pass a folder of example-data folders or --nuscenes DATAROOT (hundreds of samples)",
                       distinct, "this one" if distinct == 1 else "these")
    t = time.perf_counter()
    with worker_deaths(), _progress(batches, f"calibrating ({opts.method})", opts.progress) as bar:  # closed before any error prints
        seen = calibrate(model, samples(), opts.method, progress=lambda n: bar.update(1))
    seconds = time.perf_counter() - t
    ranges = None
    if opts.ranges:
        # The FP16 range record (lean.ranges) of the model the export will build from this file.
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        export_model = build_quantized(cfg, state).to(device)
        # Of the samples calibrated on (--batches may take fewer than the source holds).
        measured = spread(FrameSet(frames.items[:min(batches, len(frames))], frames.read), RECORD_SAMPLES)
        with worker_deaths(), _progress(len(measured), "measuring FP32 ranges", opts.progress) as bar:
            ranges = record(export_model, _rig_samples(Stream(measured, len(measured), device, opts.workers)),
                            progress=lambda: bar.update(1))
        del export_model
    meta = {
        "calibration": {"method": opts.method, "batches": seen, "samples": len(frames), **source,
                        # No wall time: two runs of the same calibration write the same bytes.
                        "quantize_downsample": opts.quantize_downsample, "device": str(device)},
        "source": {"path": str(opts.ckpt), "sha256": ckpt.sha256, "format": ckpt.source},
        "versions": versions(),
        "producer": f"lean {lean.__version__}",
    }
    if ranges is not None:
        meta["ranges"] = ranges
    if "note" in ckpt.meta:
        meta["note"] = ckpt.meta["note"]
    save_checkpoint(opts.out, model.state_dict(), "ptq", cfg, meta)
    logger.info("wrote %s (%d samples in %.1f s, %.1f samples/s; %.1f s of it waiting for data)",
                opts.out, seen, seconds, seen / seconds, stream.waited)
    return meta


def spread(frames: FrameSet, count: int) -> FrameSet:
    """At most ``count`` of ``frames``, evenly spread over them (all of them when fewer)."""
    n = len(frames.items)
    if n <= count:
        return frames
    return FrameSet([frames.items[i * n // count] for i in range(count)], frames.read)


def _rig_samples(stream: Stream):
    """(backbone inputs, rig) of each frame of ``stream``."""
    for frame in stream:
        img, depth = frame.inputs()
        yield backbone_inputs(img, depth), frame


def _check_counts(opts: PTQOptions) -> None:
    for flag, value, least in (("--batches", opts.batches, 1), ("--samples", opts.samples, 1),
                               ("--workers", opts.workers, 0)):
        if value is not None and value < least:
            raise LeanError(f"{flag} must be at least {least}, got {value}")


def calibration_set(opts: PTQOptions, cfg, folders) -> tuple[FrameSet, dict]:
    """The calibration samples of ``opts`` (``folders``: ``sample_folders``' list, unused for
    nuScenes) and how the checkpoint's metadata names them."""
    if opts.nuscenes is None:
        return folder_set(folders, cfg), {"data": str(opts.data)}
    logger.info("reading the nuScenes tables of %s (%s)", opts.nuscenes, opts.version)
    plans = plan_samples(opts.nuscenes, opts.version, opts.split, opts.samples, opts.seed, SWEEPS)
    scenes = len({p.scene for p in plans})
    split = opts.split or DEFAULT_SPLIT[opts.version]
    if len(plans) < opts.samples:
        logger.warning("split %s holds %d samples; calibrating on all of them", split, len(plans))
    logger.info("%d samples from %d scenes", len(plans), scenes)
    return nuscenes_set(opts.nuscenes, plans, cfg), {
        "data": str(opts.nuscenes), "nuscenes": {"version": opts.version, "split": split,
                                                 "seed": opts.seed,
                                                 "scenes": scenes, "tokens": [p.token for p in plans]}}


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", disable=not enabled, file=sys.stderr)
