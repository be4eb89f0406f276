"""amax from a histogram: max, percentile, MSE and entropy (KL), as pure torch functions.

Histogram convention (the collector's): ``hist`` is a 1-D tensor of counts of |x| (or of x for
unsigned quantizers), ``edges`` the ``len(hist) + 1`` bin edges, uniform width, ``edges[0] == 0``.
The collector trims trailing zero bins; these functions take whatever they are given and follow the
definitions below literally (trailing zeros are simply bins holding nothing).

Every search runs over all candidate thresholds at once as tensor operations on the histogram's own
device (no Python loop per candidate or per bin; at most a loop over blocks of candidates to bound
memory). Counts and probabilities are float64. Each function returns a 0-d float32 tensor on
``hist.device``; the only host synchronisation is the emptiness check that decides whether to raise.

The semantics are pytorch-quantization's (``pytorch_quantization.calib.histogram``) so calibrations
made with it are reproduced; the deliberate differences are documented per function.
"""

from __future__ import annotations

import difflib
import math
import numbers
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["max_amax", "percentile_amax", "mse_amax", "entropy_amax", "METHODS", "get_method"]

# Elements of one [candidates, bins] block: small enough to stay in cache on CPU (measured fastest
# around 128K) and to bound memory for 16-bit entropy (65536 groups per candidate).
_BLOCK_ELEMS = 1 << 17


# --------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------
def _prepare(hist: Tensor, edges: Tensor) -> tuple[Tensor, Tensor]:
    """Check shapes, bring ``edges`` to ``hist``'s device, raise on an empty histogram.

    Returns (counts as float64, edges as float32), both on ``hist.device``.
    """
    if not isinstance(hist, Tensor) or not isinstance(edges, Tensor):
        raise TypeError(
            f"hist and edges must be torch tensors, got {type(hist).__name__} and {type(edges).__name__}"
        )
    if hist.dim() != 1 or hist.numel() == 0:
        raise ValueError(f"hist must be a non-empty 1-D tensor of counts, got shape {tuple(hist.shape)}")
    if edges.dim() != 1 or edges.numel() != hist.numel() + 1:
        raise ValueError(
            f"edges must be 1-D with len(hist) + 1 = {hist.numel() + 1} entries, got shape {tuple(edges.shape)}"
        )
    if edges.is_complex() or not edges.is_floating_point():
        raise TypeError(f"edges must be a floating-point tensor, got {edges.dtype}")
    counts = hist.to(torch.float64, copy=True)  # a copy: the caller's histogram is never mutated
    edges32 = edges.to(device=hist.device, dtype=torch.float32)
    # One host sync for both checks (they decide whether to raise, so they cannot stay on device).
    total_positive, width_positive = torch.stack(
        [counts.sum() > 0, edges32[-1] > edges32[0]]
    ).tolist()
    if not total_positive:
        raise ValueError(
            f"histogram is empty: all {hist.numel()} counts are zero (no calibration data was collected)"
        )
    if not width_positive:
        raise ValueError(
            f"histogram range is empty: edges[-1] ({float(edges32[-1])}) must exceed edges[0] "
            f"({float(edges32[0])})"
        )
    return counts, edges32


_FP8 = {(4, 3): 448.0, (5, 2): 57344.0}


def _check_quant_args(num_bits: Any, unsigned: bool, start_bin: int, stride: int, fp8: bool = False) -> None:
    if fp8 and isinstance(num_bits, (tuple, list)) and tuple(num_bits) in _FP8:
        pass
    elif isinstance(num_bits, bool) or not isinstance(num_bits, int) or not 2 <= num_bits <= 16:
        raise ValueError(f"num_bits must be an int in [2, 16]{' or an FP8 format (4, 3)/(5, 2)' if fp8 else ''}, "
                         f"got {num_bits!r}" + ("" if fp8 or not isinstance(num_bits, tuple) else
                                                "; for FP8 use method 'mse', 'percentile' or 'max'"))
    if not isinstance(unsigned, bool):
        raise TypeError(f"unsigned must be a bool, got {unsigned!r}")
    if isinstance(start_bin, bool) or not isinstance(start_bin, int) or start_bin < 1:
        raise ValueError(f"start_bin must be an int >= 1, got {start_bin!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be an int >= 1, got {stride!r}")


def _check_percentile(percentile: float) -> None:
    if isinstance(percentile, bool) or not isinstance(percentile, numbers.Real):
        raise TypeError(f"percentile must be a number, got {percentile!r}")
    if not (0.0 < float(percentile) <= 100.0):
        raise ValueError(f"percentile must be in the range (0, 100], got {percentile!r}")


def _last_nonzero_upper_edge(counts: Tensor, edges: Tensor) -> Tensor:
    """edges[last non-zero bin + 1], computed on device (no sync)."""
    n = counts.numel()
    positions = torch.arange(1, n + 1, device=counts.device)
    last = torch.where(counts > 0, positions, torch.zeros_like(positions)).max()
    return edges[last]


# --------------------------------------------------------------------------------------------------
# fake quantization (the exact formula of ONNX QuantizeLinear -> DequantizeLinear)
# --------------------------------------------------------------------------------------------------
def _fake_quant_rows(x: Tensor, amax_column: Tensor, num_bits: Any, unsigned: bool) -> Tensor:
    """Fake-quantize ``x`` ([n] or [C, n]) with one amax per row (``amax_column`` [C, 1]), float32.

    Exactly TensorRT's / ONNX Q->DQ arithmetic so the searched amax is optimal for the engine that
    will run: ``scale = amax / bound`` in float32, ``q = round_half_even(x / scale)`` (a true
    division, not a multiplication by the reciprocal, which rounds differently), clamped to
    ``[-bound - 1, bound]`` (unsigned ``[0, bound]``), ``y = q * scale``.
    """
    if isinstance(num_bits, tuple):  # FP8: amax maps to the format's largest value
        from ..functional import fp8_round

        ratio = _FP8[num_bits] / amax_column.to(torch.float32)
        return fp8_round(x.to(torch.float32) * ratio, num_bits) / ratio
    bound = (1 << num_bits) - 1 if unsigned else (1 << (num_bits - 1)) - 1
    low = 0.0 if unsigned else float(-bound - 1)
    scale = amax_column.to(torch.float32) / bound
    q = torch.div(x.to(torch.float32), scale)
    q.round_().clamp_(low, float(bound))
    return q.mul_(scale)


# --------------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------------
def max_amax(hist: Tensor, edges: Tensor) -> Tensor:
    """Upper edge of the last non-zero bin: the histogram's view of max(|x|), nothing clipped."""
    counts, edges32 = _prepare(hist, edges)
    return _last_nonzero_upper_edge(counts, edges32)


def percentile_amax(hist: Tensor, edges: Tensor, percentile: float = 99.99) -> Tensor:
    """Smallest bin edge at or above the ``percentile`` quantile of the histogram: clips the rest.

    pytorch-quantization finds the bin ``idx`` where the CDF first reaches ``percentile / 100``
    (``searchsorted``, side='left') and returns its *left* edge ``edges[idx]``. The quantile lies
    inside that bin, so the left edge can clip part of the mass that was asked to be kept (and is 0
    when the quantile falls in the first bin). This returns the *right* edge ``edges[idx + 1]``
    instead: never below the quantile, never 0, and larger than pytorch-quantization's answer by
    exactly one bin width. The CDF is compared as ``cumsum(counts) >= total * percentile / 100``
    so percentile=100 lands exactly on the last non-zero bin.
    """
    _check_percentile(percentile)
    counts, edges32 = _prepare(hist, edges)
    cumulative = torch.cumsum(counts, dim=0)
    target = (cumulative[-1] * (float(percentile) / 100.0)).reshape(1)
    idx = torch.searchsorted(cumulative, target, side="left").clamp_(max=counts.numel() - 1)
    return edges32[idx[0] + 1]


def mse_amax(
    hist: Tensor,
    edges: Tensor,
    num_bits: int = 8,
    unsigned: bool = False,
    start_bin: int = 128,
    stride: int = 1,
) -> Tensor:
    """amax minimising the histogram-weighted squared fake-quantization error.

    Candidates are the bin centers ``centers[i]`` for ``i in range(start_bin, len(hist), stride)``
    (pytorch-quantization's search; starting at ``start_bin`` skips amax values so small that they
    clip most of the data). If the histogram has no more than ``start_bin`` bins, the candidates
    start at bin 0 instead, so short histograms still get a search. Each candidate fake-quantizes
    every bin center with the exact Q/DQ formula (float32) and scores
    ``mean((q(centers) - centers)**2 * counts)`` in float64; the first minimum wins (``argmin``).
    """
    _check_quant_args(num_bits, unsigned, start_bin, stride, fp8=True)
    if isinstance(num_bits, list):
        num_bits = tuple(num_bits)
    counts, edges32 = _prepare(hist, edges)
    n = counts.numel()
    device = counts.device
    centers = (edges32[1:] + edges32[:-1]) / 2
    centers64 = centers.to(torch.float64)
    start = start_bin if n > start_bin else 0
    candidates = torch.arange(start, n, stride, device=device)
    block = max(1, _BLOCK_ELEMS // n)
    scores = []
    for b0 in range(0, candidates.numel(), block):
        rows = candidates[b0 : b0 + block]
        quantized = _fake_quant_rows(centers, centers[rows].unsqueeze(1), num_bits, unsigned)
        err = quantized.to(torch.float64).sub_(centers64)  # exact: difference of two float32 values
        scores.append(err.square_() @ counts)
    mse = torch.cat(scores) / n
    return centers[candidates[torch.argmin(mse)]]


def _divergence(inner: Tensor, b_last: Tensor, tail: Tensor, q_last: Tensor, mass: Tensor, total: Tensor) -> Tensor:
    """KL(P || Q) per candidate from the sum over its groups (``inner``) and its last bin.

    The last bin of P also holds the tail beyond the candidate: its term is swapped for the lumped
    one. ``mass`` is the sum of Q before normalisation. Element-wise, so the batched search
    (:mod:`trtquant.calib.batched`) shares it and gets the same values.
    """
    r_last = b_last + tail
    safe_b = torch.where(b_last > 0, b_last, 1.0)
    correction = r_last * torch.log(torch.where(r_last > 0, r_last, 1.0)) - b_last * torch.log(
        safe_b
    ) - tail * torch.log(q_last)
    correction = torch.where(tail > 0, correction, 0.0)
    kl = (inner + correction) / total + torch.log(mass / total)
    # P > 0 where Q == 0: the tail lands on an empty last bin, or Q is all zero.
    infinite = ((b_last == 0) & (tail > 0)) | (mass == 0)
    return torch.where(infinite, math.inf, kl)


def entropy_amax(
    hist: Tensor,
    edges: Tensor,
    num_bits: int = 8,
    unsigned: bool = False,
    start_bin: int = 128,
    stride: int = 1,
) -> Tensor:
    """amax minimising the KL divergence between the clipped histogram and its quantized version.

    TensorRT's entropy calibration as pytorch-quantization's ``_compute_amax_entropy`` defines it,
    for every candidate ``i in range(start_bin, len(hist) + 1, stride)``:

    * ``bins = hist`` with ``bins[0] = bins[1]`` (zeros dominate bin 0; done on a copy - the
      original mutates the caller's histogram);
    * reference P: ``bins[:i]`` with everything beyond (``sum(bins[i:])``) added to its last bin;
    * candidate Q: ``bins[:i]`` merged into ``nbins = 2**(num_bits - 1 + unsigned)`` groups (bin j
      in group ``floor(j * nbins / i)``, the ``np.digitize`` grouping, exact since nbins is a power
      of two), each non-zero bin replaced by its group's mean over its non-zero bins, zero bins
      kept at zero;
    * ``KL(P || Q)`` as ``scipy.stats.entropy`` computes it: both normalised, terms with P == 0
      are 0, P > 0 where Q == 0 gives +inf.

    The *last* minimum wins; amax = ``edges[i]``. If the histogram has fewer than ``start_bin``
    bins, candidates start at ``len(hist)`` (a single candidate: the full range). If only bin 0 is
    populated (so ``bins`` is empty after the substitution, where pytorch-quantization fails),
    returns the upper edge of the last non-zero bin, as :func:`max_amax`.

    Vectorised over candidates via prefix sums: with group sums S_g and non-zero counts Z_g,
    ``sum_j P_j log(P_j / Q_j)`` reduces per group to ``sum b log b - S_g log(S_g / Z_g)`` plus a
    correction for the last bin, so the work is [candidates, nbins] rather than [candidates, bins]
    and agrees with the literal computation to float64 rounding.
    """
    _check_quant_args(num_bits, unsigned, start_bin, stride)
    counts, edges32 = _prepare(hist, edges)
    n = counts.numel()
    device = counts.device
    nbins = 1 << (num_bits - 1 + int(unsigned))

    bins = counts  # already a private float64 copy
    if n >= 2:
        bins[0] = bins[1]
    zero = bins.new_zeros(1)
    nonzero = (bins > 0).to(torch.float64)
    blogb = torch.where(bins > 0, bins * torch.log(torch.where(bins > 0, bins, 1.0)), 0.0)
    # prefixes[:, k] = (sum(bins[:k]), number of non-zero bins in bins[:k], sum(b log b over bins[:k]))
    prefixes = torch.cat([bins.new_zeros(3, 1), torch.cumsum(torch.stack([bins, nonzero, blogb]), 1)], 1)
    prefix_sum = prefixes[0]
    # suffix[k] = sum(bins[k:]), summed from the end so the tail mass is not a difference of totals
    suffix_sum = torch.cat([torch.cumsum(bins.flip(0), 0).flip(0), zero])
    total = suffix_sum[0]

    start = min(start_bin, n)
    candidates = torch.arange(start, n + 1, stride, device=device)
    group_ids = torch.arange(nbins + 1, device=device)
    block = max(1, _BLOCK_ELEMS // (nbins + 1))
    divergences = []
    for b0 in range(0, candidates.numel(), block):
        i = candidates[b0 : b0 + block]
        # group g holds bins [ceil(g*i/nbins), ceil((g+1)*i/nbins)): bounds[:, g] is its first bin
        bounds = torch.div(group_ids * i.unsqueeze(1) + (nbins - 1), nbins, rounding_mode="floor")
        # per-group (sum, non-zero count, sum b log b) as differences of prefixes at the bounds
        s, z, blogb_sum = (
            prefixes.index_select(1, bounds.reshape(-1)).view(3, i.numel(), nbins + 1).diff(dim=2)
        )
        occupied = z > 0
        mean = torch.where(occupied, s / torch.where(occupied, z, 1.0), 1.0)  # Q value of a group
        group_terms = torch.where(occupied, blogb_sum - s * torch.log(mean), 0.0)
        inner = group_terms.sum(1)  # sum over j < i of bins_j * log(bins_j / Q_j)
        # Last bin of P also holds the tail beyond the candidate: swap its term for the lumped one.
        b_last = bins[i - 1]
        tail = suffix_sum[i]
        g_last = torch.div((i - 1) * nbins, i, rounding_mode="floor")
        q_last = mean.gather(1, g_last.unsqueeze(1)).squeeze(1)
        divergences.append(_divergence(inner, b_last, tail, q_last, prefix_sum[i], total))
    div = torch.cat(divergences)
    last_argmin = div.numel() - 1 - torch.argmin(div.flip(0))
    amax = edges32[candidates[last_argmin]]
    return torch.where(total > 0, amax, _last_nonzero_upper_edge(hist.to(device), edges32))


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------
METHODS: dict[str, Callable[..., Tensor]] = {
    "entropy": entropy_amax,
    "max": max_amax,
    "mse": mse_amax,
    "percentile": percentile_amax,
}


def get_method(name: str) -> Callable[..., Tensor]:
    """The amax function registered under ``name``; a typo gets the known names and a suggestion."""
    if not isinstance(name, str):
        raise TypeError(f"calibration method name must be a str, got {type(name).__name__}")
    try:
        return METHODS[name]
    except KeyError:
        pass
    known = sorted(METHODS)
    message = f"unknown calibration method {name!r}; known: {', '.join(known)}"
    close = difflib.get_close_matches(name.lower(), known, n=1)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    raise ValueError(message)
