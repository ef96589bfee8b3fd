"""Calibration statistics that never wait on the GPU, and the amax searches run on them.

ModelOpt's own calibrators check every tensor on the host (``assert not torch.any(isnan(amax))``,
histogram ranges read back with ``.item()``): three or more host syncs per quantizer per batch,
which made GPU calibration many times slower than the forward it measures (BENCHMARKS.md). ``RangeCollector``
plugs into a ModelOpt ``TensorQuantizer`` in place of its calibrator and keeps everything on the
tensor's device:

- the exact running max of |x|;
- for histogram methods, a histogram of log2 |x| of every value with fixed bins (32 per octave
  over 2^-32..2^32), so no range ever has to be read back to re-bin. Every value, not a
  subsample: the rare large values set the amax.

Both come from ``lean.quant.histogram`` (one Triton kernel on CUDA). A shared quantizer (conv1's
input and its block's identity, a neck concat and the backbone conv that reads it) is called
again on the tensor it has just seen (BENCHMARKS.md counts how often). The statistics of such a call are those of the previous one, reused without reading the tensor again,
so every amax is what counting each call afresh gives.

On CUDA the statistics can run on a side stream, beside the forward's convolutions.

Fixed shapes and no host reads also let a whole calibration forward be captured once as a CUDA
graph and replayed for every batch (``lean.quant.modelopt.calibrate``).
"""

from __future__ import annotations

import weakref

import torch

from lean.errors import LeanError
from lean.quant.histogram import BINS_PER_OCTAVE, HIST_BINS, LOG2_RANGE, log2_histogram, max_abs_, new_scratch

MSE_OCTAVES = 4  # amax candidates span max/16 .. max, as pytorch-quantization's start_bin=128 of 2048
PERCENTILE = 99.99


def log_edges() -> torch.Tensor:
    return torch.pow(2.0, torch.linspace(*LOG2_RANGE, HIST_BINS + 1, dtype=torch.float64))


class RangeCollector:
    """Sync-free statistics of one activation quantizer (ModelOpt's calibrator interface)."""

    def __init__(self, histogram: bool, stream=None):
        self.histogram = histogram
        self.stream = stream  # a CUDA side stream for the statistics, or None for the current one
        self.reset()

    def reset(self) -> None:
        self.amax = None
        self.hist = None
        self.counted = None  # values offered to the histogram, zeros included (on the device: graph replays count)
        self._last = None  # (weak reference to the last tensor collected, its version)
        self._counts = None  # that tensor's histogram
        self._scratch = None

    def forget_last(self) -> None:
        """Read the next tensor afresh: called before a CUDA graph capture (and after a failed one),
        so that no captured call re-adds counts computed outside the graph."""
        self._last = self._counts = None

    def collect(self, x: torch.Tensor) -> None:
        version = None if x.is_inference() else x._version  # inference tensors have no version counter
        again = (version is not None and self._last is not None and self._last[0]() is x
                 and self._last[1] == version)
        self._last = (weakref.ref(x), version)
        x = x.detach()
        if self.stream is None:
            return self._collect(x, again)
        self.stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(self.stream):
            self._collect(x, again)
        x.record_stream(self.stream)  # x's memory stays reserved until the statistics have read it

    def _collect(self, x: torch.Tensor, again: bool) -> None:
        # In place throughout: a captured CUDA graph updates the same tensors on every replay.
        if self.amax is None:
            self.amax = torch.zeros((), device=x.device)
            if self.histogram:
                self.hist = torch.zeros(HIST_BINS, dtype=torch.float64, device=x.device)
                self.counted = torch.zeros((), dtype=torch.float64, device=x.device)
                self._scratch = new_scratch(x.device)
        if not self.histogram:
            if not again:
                max_abs_(x, self.amax)
            return
        if not again:
            self._counts = log2_histogram(x, self.amax, self._scratch)
        # The same tensor again (a shared quantizer): its counts again, without reading it again.
        self.hist.add_(self._counts)
        self.counted.add_(x.numel())

    def compute_amax(self, method: str = "max") -> torch.Tensor:
        if self.amax is None:
            raise LeanError("a quantizer saw no data during calibration: the calibration data never reached it")
        exact = self.amax.detach().cpu().double()
        if not torch.isfinite(exact):
            raise LeanError("a quantizer saw NaN or infinite activations during calibration: check the calibration "
                            "data and the checkpoint's weights")
        if method == "max" or exact.item() == 0:
            return exact.float()
        counts = self.hist.detach().cpu().double()
        if method == "mse":
            return mse_log_amax(counts, exact.item())
        if method == "percentile":
            return percentile_amax(counts, self.counted.item(), exact.item())
        raise LeanError(f"calibration method {method!r} is not computed from a RangeCollector")


def mse_log_amax(counts: torch.Tensor, exact_max: float) -> torch.Tensor:
    """``mse_amax`` on the log histogram: candidates from max/16 up to the top bin, never above the max."""
    nonzero = torch.nonzero(counts).flatten()
    if len(nonzero) == 0:
        return torch.tensor(exact_max, dtype=torch.float32)
    top = int(nonzero[-1])
    start = max(0, top - MSE_OCTAVES * BINS_PER_OCTAVE)
    edges = log_edges()
    centers = torch.sqrt(edges[1:] * edges[:-1])  # geometric: the bins are even in log2
    best = mse_amax(counts[: top + 1], centers=centers[: top + 1], start_bin=start)
    return torch.clamp(best, max=exact_max).float()


def percentile_amax(counts: torch.Tensor, total: int, exact_max: float, percentile: float = PERCENTILE) -> torch.Tensor:
    """Smallest bin edge below which ``percentile`` % of all values (zeros included) lie."""
    zeros = max(total - counts.sum().item(), 0.0)
    cumulative = (zeros + torch.cumsum(counts, 0)) / max(total, 1)
    i = int(torch.searchsorted(cumulative, torch.tensor([percentile / 100.0], dtype=torch.float64)))
    edge = log_edges()[min(i + 1, HIST_BINS)].item()
    return torch.tensor(min(edge, exact_max), dtype=torch.float32)


def mse_amax(hist, edges=None, start_bin: int = 128, chunk: int = 256, centers=None) -> torch.Tensor:
    """amax minimizing the histogram-weighted MSE of INT8 [-128, 127] fake quantization.

    The search is pytorch-quantization's: every bin centre from ``start_bin`` on is a candidate,
    and each bin counts as its centre. ModelOpt 0.47's own ``compute_amax("mse")`` passes
    ``num_bits`` into the ``bias`` slot of its fake-quant call and returns a wrong amax, so the
    search is done here, vectorized. Give ``edges`` (linear bins) or ``centers``.
    """
    if hist is None or (edges is None and centers is None):
        raise LeanError("a quantizer saw no data during calibration: the calibration data never reached it")
    counts = torch.as_tensor(hist).detach().cpu().double().flatten()
    if centers is None:
        edges = torch.as_tensor(edges).detach().cpu().double().flatten()
        centers = (edges[1:] + edges[:-1]) / 2
    centers = torch.as_tensor(centers).double()
    candidates = centers[min(start_bin, len(centers) - 1) :]
    best_err, best = None, None
    for part in candidates.split(chunk):
        scale = 127.0 / part[:, None]
        fq = torch.clamp(torch.round(centers[None] * scale), -128, 127) / scale
        err = ((fq - centers[None]) ** 2 * counts[None]).sum(1)
        i = int(err.argmin())
        if best_err is None or err[i] < best_err:
            best_err, best = err[i], part[i]
    return best.float()
