import math

import pytest
import torch

from lean.quant import histogram
from lean.quant.calib import RangeCollector

needs_triton = pytest.mark.skipif(not torch.cuda.is_available() or histogram.abs_log2_statistics is None,
                                  reason="needs a CUDA GPU and Triton (run on the GPU machine)")


def values(n: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Signed activations with zeros, values below, at and above the binned range, and bin edges."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-12, 12, (n,), generator=g).float())
    x[::7] = 0.0
    x[1::101] = 1e-12  # under 2^-32: not binned
    x[2::211] = -3e12  # over 2^32: not binned, but the max
    x[3] = 2.0 ** 32  # the range's top edge: the last bin, as histc
    x[4] = 2.0 ** -32  # its bottom edge: the first bin
    x[5:5 + 64] = torch.exp2(torch.arange(64) / 32.0 - 1.0)  # bin edges
    return x.to(dtype)


def reference(x: torch.Tensor) -> tuple[float, torch.Tensor]:
    return x.abs().max().item(), torch.histc(x.abs().float().log2_(), histogram.HIST_BINS, *histogram.LOG2_RANGE).double()


def statistics(x: torch.Tensor, with_histogram: bool = True, repeat: int = 1):
    """max |x| and the summed counts of ``repeat`` passes, as a collector's first batches get them."""
    amax = torch.zeros((), device=x.device)
    scratch = histogram.new_scratch(x.device)
    hist = torch.zeros(histogram.HIST_BINS, dtype=torch.float64, device=x.device)
    for _ in range(repeat):
        if with_histogram:
            hist += histogram.log2_histogram(x, amax, scratch)
        else:
            histogram.max_abs_(x, amax)
    return amax.item(), hist


def test_torch_path_is_histc_and_the_max():
    x = values(50_000)
    amax = torch.zeros(())
    counts = histogram.log2_histogram(x, amax)
    counts2 = histogram.log2_histogram(x[:1000] * 2, amax)
    assert amax.item() == max(reference(x)[0], reference(x[:1000] * 2)[0])
    assert torch.equal(counts, reference(x)[1]) and torch.equal(counts2, reference(x[:1000] * 2)[1])
    assert counts.dtype == torch.float64
    assert histogram.new_scratch("cpu") is None


def test_nan_counts_as_infinite_and_empty_changes_nothing():
    amax = torch.zeros(())
    assert histogram.log2_histogram(torch.empty(0), amax).sum() == 0 and amax.item() == 0
    histogram.max_abs_(torch.empty(0), amax)
    assert amax.item() == 0
    assert histogram.log2_histogram(torch.tensor([1.0, float("nan"), -2.0]), amax).sum() == 2
    assert amax.item() == math.inf
    other = torch.zeros(())
    histogram.max_abs_(torch.tensor([float("nan")]), other)
    assert other.item() == math.inf


def test_a_repeated_tensor_is_read_once(monkeypatch):
    import lean.quant.calib as calib

    calls = []
    real = calib.log2_histogram
    monkeypatch.setattr(calib, "log2_histogram", lambda *a: calls.append(1) or real(*a))
    x = values(1000)
    c = RangeCollector(histogram=True)
    c.collect(x)
    c.collect(x)
    assert len(calls) == 1
    c.forget_last()
    c.collect(x)
    assert len(calls) == 2 and torch.equal(c.hist, 3 * reference(x)[1])


def test_a_shared_quantizer_reuses_the_counts_of_its_tensor():
    """A second call on the same tensor adds the same counts (as reading it again would), and
    the tensor changed in place or another tensor is read afresh."""
    x = values(10_000)
    c = RangeCollector(histogram=True)
    c.collect(x)
    c.collect(x)  # conv1 and the block's identity read the same tensor
    assert torch.equal(c.hist, 2 * reference(x)[1]) and c.counted.item() == 2 * x.numel()
    x.mul_(2)
    c.collect(x)
    y = x.clone()
    y[0] = 1e13
    c.collect(y)
    assert torch.equal(c.hist, 2 * reference(x / 2)[1] + reference(x)[1] + reference(y)[1])
    assert c.compute_amax("max").item() == y.abs().max().item()
    with torch.inference_mode():  # no version counter: always read afresh
        z = values(1000)
        c = RangeCollector(histogram=True)
        c.collect(z)
        c.collect(z)
        assert torch.equal(c.hist, 2 * reference(z)[1])
    m = RangeCollector(histogram=False)
    m.collect(x)
    m.collect(x)
    assert m.hist is None and m.compute_amax("max").item() == x.abs().max().item()


@needs_triton
@pytest.mark.parametrize("n", [1, 1023, 1024, 1025, 100_003, 3_000_001])
def test_kernel_bins_as_histc(n):
    x = values(max(n, 100) + 5, seed=n)[5:5 + n].cuda()  # from the bin edges on: n = 1 is binned
    amax, hist = statistics(x)
    top, want = reference(x)
    assert amax == top and torch.equal(hist, want)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_reads_half_precision(dtype):
    for x in (values(300_000, dtype=dtype).cuda(), (torch.randn(100_000) * 100).to(dtype).cuda()):
        top, want = reference(x.float())
        amax, hist = statistics(x)
        assert amax == top and torch.equal(hist, want)
    assert math.isfinite(top)  # the second is finite in half precision


@needs_triton
def test_kernel_max_only_nan_and_accumulation():
    x = values(500_000).cuda()
    assert statistics(x, with_histogram=False)[0] == x.abs().max().item()
    amax, hist = statistics(x, repeat=3)
    assert torch.equal(hist, 3 * reference(x)[1])  # the scratch is zero again after each tensor
    assert statistics(torch.tensor([1.0, float("nan")], device="cuda"))[0] == math.inf
    assert statistics(torch.tensor([1.0, float("nan")], device="cuda"), with_histogram=False)[0] == math.inf


@needs_triton
def test_kernel_reads_channels_last_and_other_strides():
    x = values(2 * 64 * 30 * 40).view(2, 64, 30, 40).cuda()
    for y in (x.to(memory_format=torch.channels_last), x[:, ::2], x.transpose(2, 3)):
        top, want = reference(y)
        assert statistics(y)[0] == top and torch.equal(statistics(y)[1], want)


@needs_triton
def test_kernel_replays_in_a_cuda_graph():
    x = values(1_000_000).cuda()
    c = RangeCollector(histogram=True)
    c.collect(x)  # compiles before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        c.collect(x.clone())
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(c.hist, 4 * reference(x)[1])  # once eager and three replays (capturing runs nothing)
    assert c.counted.item() == 4 * x.numel()
