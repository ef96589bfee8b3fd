import numpy as np
import pytest
import torch

from lean.quant.calib import RangeCollector, mse_amax, mse_log_amax, percentile_amax


def test_mse_amax_is_the_best_candidate():
    rng = np.random.default_rng(0)
    x = np.abs(np.concatenate([rng.normal(0, 1, 20000), [30.0] * 5]))
    hist, edges = np.histogram(x, bins=512)
    amax = float(mse_amax(hist, edges, start_bin=64))
    centers = (edges[1:] + edges[:-1]) / 2

    def err(a):
        scale = 127.0 / a
        q = np.clip(np.round(centers * scale), -128, 127) / scale
        return ((q - centers) ** 2 * hist).sum()

    errors = [err(c) for c in centers[64:]]
    assert amax == pytest.approx(centers[64:][int(np.argmin(errors))], rel=1e-6)
    assert 3 < amax < 30  # clips the outliers, keeps the bulk


def activations(seed=0, shape=(6, 64, 64, 176)):
    """Post-ReLU-like values: half zeros, a Gaussian bulk and a few outliers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(shape, generator=g))
    x.view(-1)[:: 100003] = 12.0
    return x


def test_collector_keeps_the_exact_max_over_batches():
    c = RangeCollector(histogram=False)
    for scale in (1.0, 3.0, 2.0):
        c.collect(torch.tensor([-scale * 1.5, 0.25, scale]))
    assert c.compute_amax("max").item() == 4.5
    assert c.hist is None


def test_no_data_is_a_user_error():
    from lean.errors import LeanError

    with pytest.raises(LeanError):
        RangeCollector(histogram=True).compute_amax("mse")


def test_log_histogram_mse_matches_a_fine_linear_histogram():
    """The log-binned search costs (almost) no accuracy against a 4096-bin linear histogram:
    the quantization MSE of its amax is within 1% of that one's."""
    x = activations()
    c = RangeCollector(histogram=True)
    c.collect(x)
    ours = c.compute_amax("mse").item()
    hist, edges = np.histogram(x.abs().numpy(), bins=4096, range=(0, x.abs().max().item()))
    reference = mse_amax(hist, edges, start_bin=256).item()

    def quant_mse(amax):
        s = amax / 127
        return ((torch.clamp(torch.round(x / s), -128, 127) * s - x) ** 2).mean().item()

    assert quant_mse(ours) <= 1.01 * quant_mse(reference)
    assert 3.0 < ours < 12.0  # clips the outliers


def test_percentile_counts_the_zeros():
    x = activations(1, (4, 8, 64, 64))
    c = RangeCollector(histogram=True)
    c.collect(x)
    for p in (75.0, 99.0, 99.99):
        want = torch.quantile(x.abs().flatten()[::7].double(), p / 100).item()  # quantile() takes 16M values at most
        got = percentile_amax(c.hist.double(), c.counted.item(), c.amax.item(), p).item()
        assert got == pytest.approx(want, rel=0.05, abs=1e-6), p


def test_mse_on_an_empty_histogram_falls_back_to_the_max():
    assert mse_log_amax(torch.zeros(8), 2.5).item() == 2.5
