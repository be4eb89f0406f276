"""The compiled CPU histogram kernel: counts equal torch.histc's, and the calibrator's two CPU paths agree."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from trtquant import settings
from trtquant.calib import _native
from trtquant.calib import histogram as _histogram
from trtquant.calib.histogram import HistogramCalibrator

needs_kernel = pytest.mark.skipif(_native.load() is None, reason="no C compiler: the torch.histc path is used")


def _histc(x: torch.Tensor, nbins: int, range_: float) -> torch.Tensor:
    xa = x.abs()
    xa = xa[torch.isfinite(xa) & (xa <= range_)]
    return torch.histc(xa, bins=nbins, min=0.0, max=range_).to(torch.int64)


@needs_kernel
@pytest.mark.parametrize("kind", ["signed", "relu", "channels_last", "transposed", "tiny"])
def test_counts_equal_histc(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, 40, 40, generator=g) * 3  # 204,800 values: several threads
    if kind == "relu":
        x = x.relu()
    elif kind == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif kind == "transposed":
        x = x.transpose(1, 3)  # not dense in any layout the kernel reads directly: copied first
    elif kind == "tiny":
        x = x[:1, :1, :10, :10]  # below the threading threshold
    for nbins, range_ in [(2048, 16.0), (128, 8.0), (16, 0.5)]:
        counts = torch.zeros(nbins, dtype=torch.int64)
        stats = _native.abs_histogram(x, nbins, range_, counts)
        assert torch.equal(counts, _histc(x, nbins, range_)), (kind, nbins, range_)
        assert stats.max_abs == float(x.abs().max())
        assert stats.zeros == int((x == 0).sum())
        assert stats.over == int((x.abs() > range_).sum())
        assert stats.nonfinite == 0
        assert int(counts.sum()) + stats.over == x.numel()


@needs_kernel
def test_edges_nonfinite_and_accumulation() -> None:
    nbins, range_ = 16, 4.0  # bin width 0.25
    x = torch.tensor([0.0, -0.0, 0.25, -0.2499, 3.99, 4.0, -4.0, 4.01, float("inf"), float("-inf"), float("nan"),
                      1e-30, -2.5])
    counts = torch.zeros(nbins, dtype=torch.int64)
    stats = _native.abs_histogram(x, nbins, range_, counts)
    expected = torch.zeros(nbins, dtype=torch.int64)
    for v, b in [(0.0, 0), (0.0, 0), (0.25, 1), (0.2499, 0), (3.99, 15), (4.0, 15), (4.0, 15), (1e-30, 0), (2.5, 10)]:
        expected[b] += 1
    assert torch.equal(counts, expected)
    assert stats == _native.HistStats(max_abs=4.010000228881836, zeros=2, over=1, nonfinite=3)
    _native.abs_histogram(x, nbins, range_, counts)  # adds, never overwrites
    assert torch.equal(counts, 2 * expected)


def _count_paths(monkeypatch) -> dict:
    """Count calls of the compiled kernel and of the torch.histc path (from now on, in this test)."""
    calls = {"native": 0, "histc": 0}
    kernel, histc = _native.abs_histogram, _histogram._histc_counts

    def counted_kernel(*a, **k):
        calls["native"] += 1
        return kernel(*a, **k)

    def counted_histc(*a, **k):
        calls["histc"] += 1
        return histc(*a, **k)

    monkeypatch.setattr(_native, "abs_histogram", counted_kernel)
    monkeypatch.setattr(_histogram, "_histc_counts", counted_histc)
    return calls


def _both_paths(monkeypatch, batches, **kw):
    """The same batches through the compiled kernel and through torch.histc; asserts which path each took."""
    calls = _count_paths(monkeypatch)
    native = HistogramCalibrator(**kw)
    for b in batches:
        native.collect(b)
    assert calls["native"] >= len(batches) and calls["histc"] == 0, calls
    monkeypatch.setattr(_native, "load", lambda: None)
    fallback = HistogramCalibrator(**kw)
    for b in batches:
        fallback.collect(b)
    assert calls["histc"] >= len(batches), calls
    monkeypatch.undo()
    return native, fallback


@needs_kernel
@pytest.mark.parametrize("kw", [{}, {"skip_zeros": True}, {"ignore_nonfinite": True}, {"num_bins": 128}])
def test_native_and_histc_paths_give_the_same_histogram(monkeypatch, kw) -> None:
    g = torch.Generator().manual_seed(3)
    # Growing magnitudes (the range doubles several times: re-binning), ReLU zeros, and a NaN/inf batch.
    batches = [torch.randn(4, 8, 20, 20, generator=g).relu() * 2.0 ** k for k in (-3, 0, 4, 2)]
    if kw.get("ignore_nonfinite"):
        batches[2][0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    native, fallback = _both_paths(monkeypatch, batches, **kw)
    assert torch.equal(native._range, fallback._range)
    assert torch.equal(native._hist, fallback._hist)
    assert native.num_batches == fallback.num_batches == 4
    for method in ("percentile", "mse", "entropy"):
        assert torch.equal(native.compute_amax(method), fallback.compute_amax(method)), method


@needs_kernel
def test_nonfinite_is_reported_like_the_other_paths(monkeypatch) -> None:
    x = torch.randn(1000)
    x[10] = float("nan")
    native, fallback = _both_paths(monkeypatch, [torch.randn(1000), x])
    assert native.saw_nonfinite() and fallback.saw_nonfinite()
    assert torch.equal(native._hist, fallback._hist) and int(native._hist.sum()) == 2000


@pytest.mark.parametrize("top", [1024.0001, 1024.0, 0.7500001, 3.0e-5])
def test_range_is_an_exact_power_of_two_and_nothing_is_dropped(top: float) -> None:
    """float32 log2(1024.0001) rounds to 10: a range from it would drop the maximum."""
    x = torch.tensor([0.5 * top, -top, top], dtype=torch.float32)
    cal = HistogramCalibrator()
    cal.collect(x)
    r = float(cal._range)
    assert r >= float(x.abs().max()) and r / 2 < float(x.abs().max()) and r == 2.0 ** round(math.log2(r))
    assert int(cal._hist.sum()) == 3


def test_falls_back_without_a_compiler(monkeypatch, caplog) -> None:
    monkeypatch.setattr(_native, "_lib", None)
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setattr(_native, "_compiler", lambda: None)
    assert _native.load() is None
    calls = _count_paths(monkeypatch)
    cal = HistogramCalibrator(num_bins=16)
    cal.collect(torch.arange(10.0))
    assert calls == {"native": 0, "histc": 1}  # the torch.histc path ran, the kernel did not
    # max 9 -> range 16, bin width 1: one value in each of bins 0..9.
    assert float(cal._range) == 16.0
    assert cal._hist.tolist() == [1] * 10 + [0] * 6


def test_build_failure_warns_and_falls_back(monkeypatch, tmp_path, caplog) -> None:
    def broken(cc, out):
        raise RuntimeError("cc: error: something is wrong")

    monkeypatch.setenv("TRTQUANT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(settings, "_current", None)  # settings are read once: read the patched environment
    monkeypatch.setattr(_native, "_lib", None)
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setattr(_native, "_compiler", lambda: "/usr/bin/cc")
    monkeypatch.setattr(_native, "_build", broken)
    with caplog.at_level(logging.WARNING):
        assert _native.load() is None
    assert "torch.histc" in caplog.text and "something is wrong" in caplog.text


def test_disabled_by_environment(monkeypatch) -> None:
    monkeypatch.setenv("TRTQUANT_NATIVE_HISTOGRAM", "0")
    monkeypatch.setattr(settings, "_current", None)  # settings are read once: read the patched environment
    monkeypatch.setattr(_native, "_lib", None)
    monkeypatch.setattr(_native, "_tried", False)
    assert _native.load() is None


@needs_kernel
def test_nonfinite_in_the_first_batch(monkeypatch) -> None:
    x = torch.linspace(-3, 5, 1001)
    x[0], x[500] = float("inf"), float("nan")
    native, fallback = _both_paths(monkeypatch, [x, x * 0.5], ignore_nonfinite=True)
    assert float(native._range) == 8.0 and torch.equal(native._hist, fallback._hist)
