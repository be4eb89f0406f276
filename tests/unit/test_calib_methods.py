"""trtquant.calib.methods: amax from a histogram, checked against closed forms and slow references."""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import pytest
import torch

from trtquant.calib.methods import (
    METHODS,
    _fake_quant_rows,
    entropy_amax,
    get_method,
    max_amax,
    mse_amax,
    percentile_amax,
)

try:
    from scipy.stats import entropy as scipy_entropy
except ImportError:  # pragma: no cover - the explicit KL below has the same semantics
    scipy_entropy = None


# --------------------------------------------------------------------------------------------------
# slow references: one candidate at a time, literally pytorch-quantization's definitions
# --------------------------------------------------------------------------------------------------
def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """scipy.stats.entropy(p, q): normalise both; 0 where p == 0; inf where p > 0 and q == 0."""
    if scipy_entropy is not None:
        return float(scipy_entropy(p, q))
    p = p / p.sum()
    q = q / q.sum()
    total = 0.0
    for pj, qj in zip(p, q):
        if pj > 0:
            total += math.inf if qj == 0 else pj * math.log(pj / qj)
    return total


def ref_entropy(hist, edges, num_bits=8, unsigned=False, start_bin=128, stride=1) -> float:
    bins = np.array(hist, dtype=np.float64)  # a copy: pytorch-quantization mutates its input here
    bins[0] = bins[1]
    nbins = 1 << (num_bits - 1 + int(unsigned))
    start = min(start_bin, len(bins))
    divergences = []
    for i in range(start, len(bins) + 1, stride):
        space = np.linspace(0, i, num=nbins + 1)
        digitized = np.digitize(range(i), space) - 1
        digitized[bins[:i] == 0] = -1
        new_density_counts = np.zeros(nbins, dtype=np.float64)
        for key, members in Counter(digitized.tolist()).items():
            if key != -1:
                new_density_counts[key] = bins[:i][digitized == key].sum() / members
        new_density = np.where(digitized != -1, new_density_counts[np.maximum(digitized, 0)], 0.0)
        reference = bins[:i].copy()
        reference[-1] += bins[i:].sum()
        divergences.append(_kl(reference, new_density))
    divergences = np.array(divergences)
    last_argmin = len(divergences) - 1 - np.argmin(divergences[::-1])
    return float(np.asarray(edges, dtype=np.float32)[last_argmin * stride + start])


def ref_mse(hist, edges, num_bits=8, unsigned=False, start_bin=128, stride=1) -> float:
    counts = np.array(hist, dtype=np.float64)
    e = np.asarray(edges, dtype=np.float32)
    centers = (e[1:] + e[:-1]) / np.float32(2)
    bound = (1 << num_bits) - 1 if unsigned else (1 << (num_bits - 1)) - 1
    low = 0 if unsigned else -bound - 1
    start = start_bin if len(centers) > start_bin else 0
    mses, args = [], []
    for i in range(start, len(centers), stride):
        scale = np.float32(centers[i]) / np.float32(bound)
        q = np.clip(np.round(centers / scale), low, bound).astype(np.float32)  # np.round: half to even
        y = q * scale
        err = y.astype(np.float64) - centers.astype(np.float64)
        mses.append(float(np.sum(err**2 * counts)) / len(centers))
        args.append(i)
    return float(centers[args[int(np.argmin(mses))]])


def ref_percentile_bin(hist, percentile) -> int:
    """pytorch-quantization's _compute_amax_percentile returns edges[this bin] (its left edge)."""
    h = np.asarray(hist, dtype=np.float64)
    return int(np.searchsorted(np.cumsum(h / h.sum()), percentile / 100))


# --------------------------------------------------------------------------------------------------
# histograms
# --------------------------------------------------------------------------------------------------
def _hist_of(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    xa = x.abs().float()
    top = float(xa.max())
    counts = torch.histc(xa, bins=n, min=0.0, max=top).to(torch.int64)
    return counts, torch.linspace(0.0, top, n + 1)


def _cases() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    cases = {}
    cases["halfnormal_2048"] = _hist_of(torch.randn(200_000, generator=g), 2048)
    laplace = torch.distributions.Laplace(0.0, 1.0).icdf(torch.rand(200_000, generator=g) * 0.999999 + 5e-7)
    cases["laplace_2048"] = _hist_of(laplace, 2048)
    counts = torch.randint(0, 50, (1000,), generator=g)
    counts[torch.rand(1000, generator=g) < 0.3] = 0
    counts[-1] = 3
    cases["random_zeros_1000"] = (counts, torch.arange(1001, dtype=torch.float32) * 0.01)
    cases["small_300"] = _hist_of(torch.randn(5_000, generator=g) * 3, 300)
    return cases


CASES = _cases()


# --------------------------------------------------------------------------------------------------
# closed forms
# --------------------------------------------------------------------------------------------------
def test_percentile_uniform_within_one_bin():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1_000_000, generator=g)
    counts, edges = _hist_of(x, 2048)
    width = float(edges[1] - edges[0])
    amax = percentile_amax(counts, edges, 99.9)
    assert amax.dim() == 0 and amax.dtype == torch.float32
    # The sample quantile lies in the last bin kept; the analytic one differs from it by sampling
    # noise only (std sqrt(p (1 - p) / N) = 3.2e-5, allowed 4 std on top of the bin).
    sample_q = float(torch.kthvalue(x, math.ceil(0.999 * x.numel())).values)
    assert float(amax) - width < sample_q <= float(amax)
    assert abs(float(amax) - 0.999) <= width + 4 * math.sqrt(0.999 * 0.001 / x.numel())


def test_percentile_halfnormal_brackets_analytic_quantile():
    # Exact expected counts of |N(0, 1)| (1e9 samples): the analytic quantile must lie in the last
    # bin kept, i.e. amax - width < q <= amax (upper edge: the requested mass is never clipped).
    n, top, total = 2048, 6.0, 1e9
    edges = torch.linspace(0.0, top, n + 1, dtype=torch.float64)
    cdf = torch.special.erf(edges / math.sqrt(2.0))
    counts = (cdf[1:] - cdf[:-1]) * total
    width = top / n
    for pct in (99.0, 99.9, 99.99):
        q = float(torch.special.ndtri(torch.tensor((1 + pct / 100) / 2, dtype=torch.float64)))
        amax = float(percentile_amax(counts, edges.float(), pct))
        assert amax - width - 1e-6 < q <= amax + 1e-6, (pct, q, amax)


@pytest.mark.parametrize("name", ["halfnormal_2048", "laplace_2048", "random_zeros_1000"])
def test_percentile_is_pytorch_quantization_plus_one_bin(name):
    counts, edges = CASES[name]
    for pct in (50.0, 90.0, 99.9, 99.99):
        expected = edges[ref_percentile_bin(counts.numpy(), pct) + 1]
        assert float(percentile_amax(counts, edges, pct)) == float(expected)


def test_percentile_100_and_max():
    counts = torch.tensor([0, 3, 0, 2, 0])
    edges = torch.arange(6, dtype=torch.float32)
    assert float(percentile_amax(counts, edges, 100)) == 4.0
    assert float(max_amax(counts, edges)) == 4.0
    assert float(percentile_amax(counts, edges, 1e-6)) == 2.0  # never 0, unlike the left edge


@pytest.mark.parametrize("bad", [0, -1.0, 100.0001, float("nan")])
def test_percentile_range(bad):
    with pytest.raises(ValueError, match="percentile"):
        percentile_amax(torch.ones(4), torch.arange(5.0), bad)


# --------------------------------------------------------------------------------------------------
# mse / entropy against the slow references
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("stride", [1, 2])
def test_entropy_matches_reference(name, stride):
    counts, edges = CASES[name]
    expected = ref_entropy(counts.numpy(), edges.numpy(), stride=stride)
    assert float(entropy_amax(counts, edges, stride=stride)) == expected


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("stride", [1, 2])
def test_mse_matches_reference(name, stride):
    counts, edges = CASES[name]
    expected = ref_mse(counts.numpy(), edges.numpy(), stride=stride)
    assert float(mse_amax(counts, edges, stride=stride)) == expected


@pytest.mark.parametrize("fn, ref", [(entropy_amax, ref_entropy), (mse_amax, ref_mse)])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"unsigned": True},  # 256 levels
        {"num_bits": 4, "start_bin": 16},
        {"start_bin": 400},  # > len(hist): the documented fallback
        {"start_bin": 7, "stride": 3},
    ],
)
def test_options_match_reference(fn, ref, kwargs):
    counts, edges = CASES["small_300"]
    assert float(fn(counts, edges, **kwargs)) == ref(counts.numpy(), edges.numpy(), **kwargs)


def test_entropy_empty_last_bin_is_infinite_divergence():
    # Candidates whose last bin is empty while mass lies beyond it have KL = inf and never win.
    g = torch.Generator().manual_seed(7)
    counts = torch.randint(1, 100, (600,), generator=g)
    counts[200:560:2] = 0
    edges = torch.arange(601, dtype=torch.float32)
    amax = float(entropy_amax(counts, edges))
    assert amax == ref_entropy(counts.numpy(), edges.numpy())
    assert counts[int(amax) - 1] > 0


def test_entropy_degenerate_histograms():
    assert float(entropy_amax(torch.tensor([5]), torch.tensor([0.0, 0.5]))) == 0.5
    # only bin 0 populated: bins[0] = bins[1] empties it; fall back to the max edge
    assert float(entropy_amax(torch.tensor([5, 0, 0]), torch.tensor([0.0, 1.0, 2.0, 3.0]))) == 1.0


def test_fake_quant_rows_formula():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 126.6, 200.0, -127.6, -200.0])
    out = _fake_quant_rows(x, torch.tensor([[127.0], [254.0]]), 8, False)
    assert out[0].tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 127.0, 127.0, -128.0, -128.0]  # half to even
    assert out[1].tolist() == [0.0, 2.0, 2.0, 0.0, -2.0, 126.0, 200.0, -128.0, -200.0]
    unsigned = _fake_quant_rows(torch.tensor([-3.0, 3.5, 300.0]), torch.tensor([[255.0]]), 8, True)
    assert unsigned[0].tolist() == [0.0, 4.0, 255.0]


# --------------------------------------------------------------------------------------------------
# contracts
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_input_not_mutated(name, dtype):
    counts, edges = CASES["random_zeros_1000"]
    counts = counts.to(dtype)
    counts[0] = 0
    before_counts, before_edges = counts.clone(), edges.clone()
    amax = get_method(name)(counts, edges)
    assert amax.dim() == 0 and amax.dtype == torch.float32 and amax.device == counts.device
    assert torch.equal(counts, before_counts) and torch.equal(edges, before_edges)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_empty_histogram_raises(name):
    with pytest.raises(ValueError, match="histogram is empty"):
        get_method(name)(torch.zeros(16, dtype=torch.int64), torch.linspace(0, 1, 17))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="edges must be 1-D"):
        max_amax(torch.ones(4), torch.arange(4.0))
    with pytest.raises(ValueError, match="hist must be"):
        max_amax(torch.ones(2, 2), torch.arange(5.0))
    with pytest.raises(ValueError, match="num_bits"):
        mse_amax(torch.ones(4), torch.arange(5.0), num_bits=1)


def test_get_method():
    assert get_method("entropy") is entropy_amax and set(METHODS) == {"max", "percentile", "mse", "entropy"}
    message = "unknown calibration method 'entropie'; known: entropy, max, mse, percentile (did you mean 'entropy'?)"
    with pytest.raises(ValueError, match=re.escape(message)):
        get_method("entropie")
    with pytest.raises(ValueError, match=r"known: entropy, max, mse, percentile$"):
        get_method("kl_divergence_xyz")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(METHODS))
def test_cuda_matches_cpu(name):
    fn = get_method(name)
    for counts, edges in CASES.values():
        cpu = fn(counts, edges)
        gpu = fn(counts.cuda(), edges.cuda())
        assert gpu.device.type == "cuda"
        # float64 sums run in another order on the GPU: a near-tie may move the pick by one bin
        assert abs(float(gpu) - float(cpu)) <= float(edges[1] - edges[0]) * 1.0001
    # edges on the CPU, counts on the GPU: the result follows the histogram
    assert fn(counts.cuda(), edges).device.type == "cuda"
