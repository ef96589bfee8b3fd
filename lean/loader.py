"""Streaming calibration data: a PyTorch DataLoader whose worker processes read, decode, crop
and draw the depth image of each sample while the calibration runs on the previous ones.

Every source is a list of items and a function that turns one into a ``lean.frames.Frame``:
example-data folders (``folder_frame``) or planned nuScenes samples (``nuscenes_frame``). At most
``workers x prefetch`` frames wait in memory, whatever the sample count. Frames travel as uint8
images in pinned memory and are copied to the device without blocking; ``Frame.inputs``
normalizes them there. The stream counts the seconds the calibration waited for data.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from lean.config import CameraConfig
from lean.frames import Frame, folder_frame, nuscenes_frame
from lean.errors import LeanError
from lean.nuscenes import SamplePlan

MAX_WORKERS = 16  # more than the calibration of one GPU needs (BENCHMARKS.md)
PREFETCH = 4  # frames queued per worker


def default_workers() -> int:
    """One worker per CPU the process may use, less one for the calibration loop itself."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(MAX_WORKERS, cpus - 1))


def die_with_parent(parent: int, worker_id: int) -> None:
    """A loader worker's first act: the kernel kills it when the calibration process dies, SIGKILL
    included (no clean-up runs there). PyTorch's workers notice a dead parent only while idle; a
    killed PTQ left its four workers running for 14 minutes in a test here."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the prctl
        os._exit(0)


@contextlib.contextmanager
def worker_deaths():
    """A loader process that died (the kernel's OOM killer sends SIGKILL) as a one-line error. PyTorch
    raises it as a RuntimeError from its SIGCHLD handler, wherever the main process then is."""
    try:
        yield
    except RuntimeError as e:
        match = re.search(r"DataLoader worker \(pid\(?s?\)? ([\d, ]+)\) (?:is killed by signal: ([^.]+)|exited "
                          r"unexpectedly(?: with exit code (-?\d+))?)", str(e))
        if not match:
            raise
        pid, signal_name, code = match[1].strip(), match[2], match[3]
        if signal_name and signal_name.startswith("Bus"):  # PyTorch's own diagnosis of SIGBUS in a worker
            raise LeanError(f"a data loader process (pid {pid}) was killed by signal {signal_name}: shared memory "
                            "(/dev/shm) ran out; enlarge it (docker: --shm-size) or pass fewer --workers; "
                            "nothing was written") from None
        how = f"killed by signal {signal_name}" if signal_name else "exited unexpectedly" + (
            f" with exit code {code}" if code else "")
        raise LeanError(f"a data loader process (pid {pid}) was {how}, often the kernel's OOM killer: "
                        "free memory or pass fewer --workers; nothing was written") from None


@dataclass(frozen=True)
class Failed:
    """A sample a worker could not read: the one-line message travels instead of a traceback."""

    message: str


class FrameSet(Dataset):
    """Items and the function that reads one (a module-level function or a partial of one, so
    it pickles for any start method)."""

    def __init__(self, items: list, read):
        self.items, self.read = list(items), read

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Frame | Failed:
        try:
            return self.read(self.items[i])
        except LeanError as e:
            return Failed(str(e))


def folder_set(folders: list[Path], cfg: CameraConfig) -> FrameSet:
    return FrameSet(folders, functools.partial(folder_frame, cfg=cfg))


def nuscenes_set(dataroot: Path, plans: list[SamplePlan], cfg: CameraConfig) -> FrameSet:
    return FrameSet(plans, functools.partial(nuscenes_frame, dataroot, cfg=cfg))


class Stream:
    """``count`` frames of ``frames`` (cycling when it holds fewer) on ``device``, read ahead by
    ``workers`` processes (0: read in this process)."""

    def __init__(self, frames: FrameSet, count: int, device: torch.device, workers: int | None = None,
                 prefetch: int = PREFETCH):
        if len(frames) == 0:
            raise LeanError("calibration got no data: pass a folder with at least one sample")
        self.frames, self.count, self.device = frames, count, torch.device(device)
        self.workers = default_workers() if workers is None else workers
        if self.workers < 0:
            raise LeanError(f"--workers must be 0 or more, got {self.workers}")
        self.workers = min(self.workers, count)
        self.prefetch = prefetch
        self.waited = 0.0  # seconds the consumer spent waiting for the next frame

    def __iter__(self) -> Iterator[Frame]:
        loader = DataLoader(
            self.frames, batch_size=None, sampler=[i % len(self.frames) for i in range(self.count)],
            num_workers=self.workers, prefetch_factor=self.prefetch if self.workers else None,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            worker_init_fn=functools.partial(die_with_parent, os.getpid()) if self.workers else None)
        batches = iter(loader)
        try:
            for _ in range(self.count):
                start = time.perf_counter()
                frame = next(batches)
                self.waited += time.perf_counter() - start
                if isinstance(frame, Failed):
                    raise LeanError(frame.message)
                yield frame.to(self.device)
        finally:
            del batches  # stops the workers now, also when the calibration failed
