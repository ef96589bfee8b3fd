"""One activation tensor's calibration statistics: max |x| folded into a running max, and the
counts of log2 |x| in fixed bins (``BINS_PER_OCTAVE`` per octave over 2^-32..2^32). Both stay on
the tensor's device with no host read, so a CUDA graph can replay them.

On CUDA with Triton (PyTorch's own GPU compiler, installed with every CUDA build of PyTorch) one
kernel reads each value once and does both. PyTorch's path is ``aminmax``, ``abs``, ``log2`` and
``histc``: four passes, and ``histc`` adds all 2048 bins of every 512-value block to its output
with global atomics. The kernel adds one count per value instead, into one of 16 copies of the
histogram, which are summed after. Its bins are ``histc``'s exactly (the same float arithmetic,
CUDA's ``log2f``), which the tests check on the GPU. Why not the obvious alternatives, measured on
the H100 (BENCHMARKS.md): the cost of Triton's ``tl.histogram`` grows with the bin count (at 2048
bins it made calibration slower than ``histc``), and a single copy serializes on the busiest bins.
Elsewhere (the CPU, or no Triton) the PyTorch ops run.
"""

from __future__ import annotations

import math

import torch

from lean.quant.triton_stats import abs_log2_statistics

LOG2_RANGE = (-32.0, 32.0)
BINS_PER_OCTAVE = 32
HIST_BINS = int(LOG2_RANGE[1] - LOG2_RANGE[0]) * BINS_PER_OCTAVE
COPIES = 16  # histogram copies the kernel's programs spread their atomics over
TILE = 1024  # values per program


def _fused(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and abs_log2_statistics is not None


def max_abs_(x: torch.Tensor, amax: torch.Tensor) -> None:
    """Fold max |x| into ``amax`` (float32, in place; NaN counts as infinite)."""
    if x.numel() == 0:
        return
    if _fused(x):
        return _launch(x, amax, None)
    lo, hi = torch.aminmax(x)
    torch.maximum(amax, torch.nan_to_num(torch.maximum(hi, -lo).float(), nan=math.inf), out=amax)


def log2_histogram(x: torch.Tensor, amax: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Fold max |x| into ``amax`` and return the counts of log2 |x| (float64 [HIST_BINS]; zeros and
    values outside the range are not counted). ``scratch`` (from ``new_scratch``) is the kernel's
    working memory; without it the PyTorch ops run."""
    if x.numel() == 0:
        return torch.zeros(HIST_BINS, dtype=torch.float64, device=x.device)
    if scratch is not None and _fused(x):
        _launch(x, amax, scratch)
        counts = scratch.sum(0, dtype=torch.float64)
        scratch.zero_()
        return counts
    max_abs_(x, amax)
    # log2(0) = -inf falls outside the range: zeros are not binned (they quantize exactly).
    return torch.histc(x.abs().float().log2_(), HIST_BINS, *LOG2_RANGE).double()


def new_scratch(device) -> torch.Tensor | None:
    """The kernel's zeroed int32 [COPIES, HIST_BINS] counts on ``device``; None where it does not run."""
    device = torch.device(device)
    if device.type != "cuda" or abs_log2_statistics is None:
        return None
    return torch.zeros(COPIES, HIST_BINS, dtype=torch.int32, device=device)


def _launch(x: torch.Tensor, amax: torch.Tensor, scratch: torch.Tensor | None) -> None:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        x = x.permute(0, 2, 3, 1)  # the order of the values does not matter: flatten without a copy
    flat = x.reshape(-1)  # a view for the contiguous activations of a forward
    n = flat.numel()
    with torch.cuda.device(x.device):  # Triton launches on the current device's current stream
        abs_log2_statistics[(-(-n // TILE),)](flat, n, amax if scratch is None else scratch, amax, *LOG2_RANGE,
                                              HISTOGRAM=scratch is not None, COPIES=COPIES, BINS=HIST_BINS,
                                              PER_OCTAVE=BINS_PER_OCTAVE, TILE=TILE)
