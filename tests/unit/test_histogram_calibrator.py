"""HistogramCalibrator: exact growth/re-binning, batch-order invariance, closed-form percentiles, non-finite data."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import trtquant
from trtquant.calib.histogram import HistogramCalibrator
from trtquant.calib.methods import METHODS

METHOD_KWARGS = {"max": {}, "percentile": {"percentile": 99.9}, "mse": {}, "entropy": {}}


def _samples(n: int = 64, seed: int = 0) -> torch.Tensor:
    """n samples whose magnitudes span several powers of two, so the range grows while collecting."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    return x * torch.logspace(-3, 3, n, base=2.0).reshape(n, 1, 1, 1)


def _collect(batches, **kw) -> HistogramCalibrator:
    cal = HistogramCalibrator(**kw)
    for b in batches:
        cal.collect(b)
    return cal


def _full_hist(cal: HistogramCalibrator) -> torch.Tensor:
    counts, _ = cal.histogram
    return counts


# ---- growth and exact re-binning -------------------------------------------------------------------

def test_growth_rebins_without_losing_counts():
    g = torch.Generator().manual_seed(1)
    batches = [torch.rand(1000, generator=g) * s for s in (0.3, 0.01, 5.0, 2.0, 40.0, 0.5)]
    cal = HistogramCalibrator(num_bins=256)
    total = 0
    ranges = []
    for b in batches:
        cal.collect(b)
        total += b.numel()
        counts, edges = cal.histogram
        ranges.append(float(cal._range))
        assert int(counts.sum()) == total, "re-binning lost or duplicated counts"
        assert counts.dtype == torch.int64
        assert float(edges[-1]) >= float(b.abs().max())
    # The range only grows, in powers of two, and covers the largest value seen.
    assert ranges == sorted(ranges)
    assert all(math.log2(r).is_integer() for r in ranges)
    assert ranges[-1] == 64.0  # smallest power of two >= max |x| (< 40)

    # The grown histogram is exactly the histogram of all the data collected at once.
    one_shot = _collect([torch.cat(batches)], num_bins=256)
    assert torch.equal(cal._hist, one_shot._hist)
    assert torch.equal(cal._range, one_shot._range)


@pytest.mark.parametrize("num_bins", [2048, 128])
def test_same_samples_in_any_batching_give_identical_histograms_and_amax(num_bins):
    x = _samples(64)
    batchings = {
        "1x64": [x],
        "8x8": list(x.split(8)),
        "8x8 reversed": list(x.split(8))[::-1],
        "64x1 shuffled": [x[i : i + 1] for i in torch.randperm(64, generator=torch.Generator().manual_seed(3))],
    }
    cals = {k: _collect(v, num_bins=num_bins) for k, v in batchings.items()}
    ref_counts, ref_edges = cals["1x64"].histogram
    assert int(ref_counts.sum()) == x.numel()
    ref_amax = {m: cals["1x64"].compute_amax(m, **kw) for m, kw in METHOD_KWARGS.items()}
    assert set(ref_amax) == set(METHODS)
    for name, cal in cals.items():
        counts, edges = cal.histogram
        assert torch.equal(counts, ref_counts), name
        assert torch.equal(edges, ref_edges), name
        assert torch.equal(cal._range, cals["1x64"]._range), name
        for method, kw in METHOD_KWARGS.items():
            amax = cal.compute_amax(method, **kw)
            assert torch.equal(amax, ref_amax[method]), f"{name}: {method} amax {amax} != {ref_amax[method]}"


def test_batch_invariance_through_calibrate():
    """The same 64 samples as 1x64 and 8x8 batches through trtquant.calibrate: identical amax for every method."""
    x = _samples(64).flatten(1)[:, :16]

    def calibrated(batches):
        torch.manual_seed(0)
        model = trtquant.quantize(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)))
        trtquant.calibrate(model, batches, method="max", progress=False)
        out = {}
        for method, kw in METHOD_KWARGS.items():
            trtquant.compute_amax(model, method, **kw)
            out[method] = {n: q.amax for n, q in trtquant.quantizers(model).items()}
        return out

    a = calibrated([x])
    b = calibrated(list(x.split(8)))
    c = calibrated(list(x.split(8))[::-1])
    for method in METHOD_KWARGS:
        for name in a[method]:
            assert torch.equal(a[method][name], b[method][name]), f"{method} {name}: 1x64 vs 8x8"
            assert torch.equal(a[method][name], c[method][name]), f"{method} {name}: 1x64 vs 8x8 reversed"
    assert not torch.equal(a["max"]["0.input_quantizer"], a["entropy"]["0.input_quantizer"])


# ---- options -------------------------------------------------------------------------------------

def test_skip_zeros_drops_exactly_the_zeros():
    g = torch.Generator().manual_seed(2)
    x = torch.relu(torch.randn(10_000, generator=g))  # about half exact zeros
    tiny = torch.full((7,), 1e-6)  # not zeros: must stay in bin 0
    n_zero = int((x == 0).sum())
    assert n_zero > 1000
    plain = _collect([x, tiny])
    skipped = _collect([x, tiny], skip_zeros=True)
    c_plain, c_skip = plain.histogram[0], skipped.histogram[0]
    assert int(c_skip.sum()) == x.numel() + tiny.numel() - n_zero
    assert int(c_plain[0] - c_skip[0]) == n_zero
    assert torch.equal(c_plain[1:], c_skip[1:])
    assert int(c_skip[0]) == int((x[x > 0] < plain._range / 2048).sum()) + tiny.numel()
    # Zeros dominate bin 0 and drag the percentile down; without them it is the percentile of x > 0.
    assert skipped.compute_amax("percentile", percentile=50.0) > plain.compute_amax("percentile", percentile=50.0)


@pytest.mark.parametrize("axis", [0, 1, (0,)])
def test_per_channel_axis_is_rejected(axis):
    with pytest.raises(ValueError, match="per-tensor only"):
        HistogramCalibrator(axis=axis)
    with pytest.raises(ValueError, match="per-tensor only"):
        trtquant.TensorQuantizer(trtquant.QuantDescriptor(axis=axis, calib_method="histogram"))


@pytest.mark.parametrize("num_bins", [1, 0, 2.5, True])
def test_num_bins_must_be_an_integer_of_at_least_two(num_bins):
    with pytest.raises(ValueError, match="num_bins must be an integer >= 2"):
        HistogramCalibrator(num_bins=num_bins)


def test_any_num_bins_rebins_exactly_in_any_batch_order():
    """pytorch-quantization allows any bin count (its tests use 19): the range still doubles, so old bin i
    merges into new bin i // 2 and the histogram does not depend on batch order."""
    torch.manual_seed(0)
    small, big = torch.rand(1000), torch.rand(1000) * 5
    a, b = HistogramCalibrator(num_bins=19), HistogramCalibrator(num_bins=19)
    a.collect(small), a.collect(big)
    b.collect(big), b.collect(small)
    assert torch.equal(a._calib_hist, b._calib_hist) and int(a._calib_hist.sum()) == 2000
    assert a._calib_bin_edges.numel() == 20 and float(a._calib_bin_edges[-1]) == 8.0


# ---- non-finite activations ------------------------------------------------------------------------

def _linear_model() -> nn.Module:
    torch.manual_seed(0)
    return trtquant.quantize(nn.Sequential(nn.Linear(4, 4)))


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_nonfinite_input_raises_naming_the_quantizer(bad):
    x = torch.randn(8, 4)
    x[3, 2] = bad
    model = _linear_model()
    with pytest.raises(trtquant.CalibrationError) as info:
        trtquant.calibrate(model, [torch.randn(8, 4), x], method="percentile", progress=False)
    msg = str(info.value)
    assert "0.input_quantizer" in msg
    assert "weight_quantizer" not in msg  # the weights are finite
    assert "ignore_nonfinite" in msg  # says how to proceed
    # Every quantizer is back in its previous state (quantizing, not collecting).
    q = model[0].input_quantizer
    assert q.is_enabled and q._if_quant and not q._if_calib


@pytest.mark.parametrize("method", ["max", "percentile", "entropy"])
def test_ignore_nonfinite_skips_them(method):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, 4, generator=g)
    x[0, 0], x[5, 1], x[9, 3] = math.inf, -math.inf, math.nan
    model = _linear_model()
    trtquant.calibrate(model, [x], method=method, progress=False, ignore_nonfinite=True)
    amax = model[0].input_quantizer.amax
    assert torch.isfinite(amax).all()
    # Exactly what calibrating on the data with the non-finite values zeroed gives.
    ref = _linear_model()
    trtquant.calibrate(ref, [torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)], method=method, progress=False)
    assert torch.equal(amax, ref[0].input_quantizer.amax)
    if method == "max":
        finite = x[torch.isfinite(x)]
        assert float(amax) >= float(finite.abs().max())


# ---- closed form: percentile of |x| for uniform and Gaussian data -----------------------------------

def _normal_abs_quantile(p: float) -> float:
    """q with P(|X| <= q) = p for X ~ N(0, 1)."""
    return math.sqrt(2.0) * torch.special.erfinv(torch.tensor(p, dtype=torch.float64)).item()


def _normal_abs_density(q: float) -> float:
    return 2.0 * math.exp(-q * q / 2) / math.sqrt(2 * math.pi)


def _calibrated_quantizer(batches) -> trtquant.TensorQuantizer:
    q = trtquant.TensorQuantizer(trtquant.QuantDescriptor(calib_method="histogram"))
    trtquant.calibrate(q, batches, method="percentile", progress=False)
    return q


PERCENTILES = [90.0, 99.0, 99.9, 99.99]


@pytest.mark.parametrize("dist", ["uniform", "normal"])
def test_percentile_of_iid_data_is_within_one_bin_of_the_analytic_quantile(dist):
    n_batches, batch = 8, 1 << 19  # 4M samples
    g = torch.Generator().manual_seed(5)
    if dist == "uniform":
        batches = [torch.rand(batch, generator=g) * 2 - 1 for _ in range(n_batches)]
        quantile, density = (lambda p: p), (lambda q: 1.0)  # |x| ~ U(0, 1)
    else:
        batches = [torch.randn(batch, generator=g) for _ in range(n_batches)]
        quantile, density = _normal_abs_quantile, _normal_abs_density
    q = _calibrated_quantizer(batches)
    n = n_batches * batch
    width = float(q._calibrator._range) / q._calibrator._num_bins
    for pct in PERCENTILES:
        q.load_calib_amax("percentile", percentile=pct)
        amax = float(q.amax)
        p = pct / 100
        analytic = quantile(p)
        # Sampling error of the empirical quantile (asymptotic standard deviation), 5 sigma.
        slack = 5 * math.sqrt(p * (1 - p) / n) / density(analytic)
        # amax is the right edge of the bin holding the quantile: the quantile lies in [amax - width, amax].
        assert amax - width - slack <= analytic <= amax + slack, (
            f"{dist} p={pct}: amax {amax} vs analytic {analytic} (bin width {width}, sampling slack {slack:.2e})"
        )
        if slack < width / 4:
            assert abs(amax - analytic) <= width + slack


@pytest.mark.parametrize("dist", ["uniform", "normal"])
def test_percentile_of_exact_quantile_samples_brackets_the_analytic_quantile(dist):
    """Samples placed at the exact quantiles of the distribution (no sampling error), shuffled, random signs."""
    n = 1 << 20
    g = torch.Generator().manual_seed(6)
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    mag = u if dist == "uniform" else math.sqrt(2.0) * torch.special.erfinv(u)
    sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    x = (mag * sign)[torch.randperm(n, generator=g)].float()
    q = _calibrated_quantizer(list(x.split(1 << 17)))
    width = float(q._calibrator._range) / q._calibrator._num_bins
    for pct in PERCENTILES:
        q.load_calib_amax("percentile", percentile=pct)
        amax = float(q.amax)
        analytic = pct / 100 if dist == "uniform" else _normal_abs_quantile(pct / 100)
        # The only error left is the rank discreteness: one sample (1/n of probability) apart.
        slack = 1.0 / (n * (1.0 if dist == "uniform" else _normal_abs_density(analytic))) + 1e-6
        assert amax - width - slack <= analytic <= amax + slack, (
            f"{dist} p={pct}: amax {amax}, analytic {analytic}, bin width {width}, slack {slack:.1e}"
        )
