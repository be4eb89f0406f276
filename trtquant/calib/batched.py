"""amax for many histograms at once: each method over a stack of histograms in a few large tensor operations.

Why: calibration computes an amax for every quantizer of a model (54 histograms for ResNet-50). One
search per histogram is a chain of dozens of small tensor operations, and on a machine whose cores are
shared - DataLoader workers, a second job - each of them waits for a thread the OS has descheduled, so
the chains cost seconds instead of a fraction of one. Stacked, the same arithmetic is a handful of
operations over ``[histograms, candidates, ...]``, on the histograms' own device.

Input is the collector's representation (:class:`~trtquant.calib.histogram.HistogramCalibrator`):
counts over uniform bins from 0 whose width is a power of two, each row trimmed to its last non-empty
bin (``lengths``) and zero-padded to the longest. The results equal :mod:`trtquant.calib.methods`'
per-histogram functions on the trimmed rows (tests compare them on varied histograms), because:

* max, percentile and entropy do the same element-wise float64 arithmetic per row; padding only adds
  exact zeros to sums, and candidates past a row's length are masked out before its arg-min;
* MSE scores depend on the bin width only through an exact power-of-two factor (every float32 and
  float64 operation of the Q/DQ error scales exactly by it), so one table of squared errors in units of
  the bin width serves every row, and the search is one matrix product ``counts @ errors.T``.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor

from .methods import _check_percentile, _check_quant_args, _divergence, _fake_quant_rows

__all__ = ["HistogramStack", "stack_histograms", "max_amax_batched", "percentile_amax_batched",
           "mse_amax_batched", "entropy_amax_batched", "amax_batched"]

# Elements per [rows, candidates, groups] block of the entropy search (float64: 2 MiB per temporary).
# Large enough that a ResNet-50 set is a few dozen operations, small enough to stay in the last-level cache.
_ENTROPY_BLOCK_ELEMS = 1 << 18
# Threads the entropy search spreads its rows over on the CPU (at most the intra-op thread count).
_MAX_ROW_WORKERS = 4
# Largest MSE error table kept between calls (float64 [bins, bins]); larger ones are built per block.
_MSE_TABLE_MAX_BINS = 4096


@dataclass(frozen=True)
class HistogramStack:
    """Histograms as rows: ``counts`` [R, N] (zero beyond each row's length), ``lengths`` [R] (>= 1, the
    trimmed length of each row), ``widths`` [R] float32 (bin width, a power of two). Row r's bin k covers
    ``[k * widths[r], (k + 1) * widths[r])``."""

    counts: Tensor
    lengths: Tensor
    widths: Tensor

    @property
    def rows(self) -> int:
        return self.counts.shape[0]


def stack_histograms(counts: list[Tensor], widths: list[Tensor]) -> HistogramStack:
    """Stack raw (untrimmed) histograms of one device; each row is trimmed to its last non-empty bin.

    Rows with no count at all are refused (they have no amax; the per-histogram functions raise too).
    """
    if not counts or len(counts) != len(widths):
        raise ValueError(f"need matching, non-empty lists of histograms and widths, got {len(counts)} and {len(widths)}")
    width = max(c.numel() for c in counts)
    device = counts[0].device
    stacked = torch.zeros(len(counts), width, dtype=torch.int64, device=device)
    for row, c in zip(stacked, counts):
        row[: c.numel()] = c.reshape(-1)
    positions = torch.arange(1, width + 1, device=device)
    lengths = torch.where(stacked > 0, positions, 0).amax(1)
    if bool((lengths == 0).any()):
        empty = torch.nonzero(lengths == 0).flatten().tolist()
        raise ValueError(f"histogram rows {empty} are empty: all counts are zero (no calibration data was collected)")
    longest = int(lengths.max())
    w = torch.stack([torch.as_tensor(x, dtype=torch.float32, device=device).reshape(()) for x in widths])
    return HistogramStack(stacked[:, :longest].contiguous(), lengths, w)


def _edges_at(index: Tensor, widths: Tensor) -> Tensor:
    """``edges[index]`` of each row: ``float32(index) * width``, exact as the collector's edges are."""
    return index.to(torch.float32) * widths


# --------------------------------------------------------------------------------------------------
# max and percentile
# --------------------------------------------------------------------------------------------------
def max_amax_batched(stack: HistogramStack) -> Tensor:
    """Upper edge of each row's last non-empty bin (:func:`~trtquant.calib.methods.max_amax`), [R] float32."""
    return _edges_at(stack.lengths, stack.widths)


def percentile_amax_batched(stack: HistogramStack, percentile: float = 99.99) -> Tensor:
    """:func:`~trtquant.calib.methods.percentile_amax` for every row: one cumsum and one searchsorted."""
    _check_percentile(percentile)
    cumulative = torch.cumsum(stack.counts.to(torch.float64), dim=1)
    target = (cumulative[:, -1] * (float(percentile) / 100.0)).unsqueeze(1)
    idx = torch.searchsorted(cumulative, target, side="left").squeeze(1)
    idx = torch.minimum(idx, stack.lengths - 1)
    return _edges_at(idx + 1, stack.widths)


# --------------------------------------------------------------------------------------------------
# MSE: one matrix product against a table of squared Q/DQ errors in bin-width units
# --------------------------------------------------------------------------------------------------
def _mse_error_rows(candidates: Tensor, bins: int, num_bits: int, unsigned: bool) -> Tensor:
    """Squared Q/DQ error of every bin center (width 1) for each candidate amax = center of bin i, float64."""
    centers = torch.arange(bins, dtype=torch.float32, device=candidates.device).add_(0.5)
    quantized = _fake_quant_rows(centers, centers[candidates].unsqueeze(1), num_bits, unsigned)
    return quantized.to(torch.float64).sub_(centers.to(torch.float64)).square_()


@functools.lru_cache(maxsize=2)
def _mse_error_table(bins: int, num_bits: int, unsigned: bool, device: str) -> Tensor:
    """[candidates = bins, bins]: the same for every histogram with ``bins`` bins (see the module docstring)."""
    return _mse_error_rows(torch.arange(bins, device=device), bins, num_bits, unsigned)


def _first_valid_argmin(scores: Tensor, valid: Tensor) -> Tensor:
    """Per row, the first index where ``scores`` is minimal among the valid entries (``argmin``'s tie rule)."""
    masked = torch.where(valid, scores, torch.inf)
    best = masked.amin(1, keepdim=True)
    return torch.argmax((valid & (masked == best)).to(torch.int8), dim=1)


def _last_valid_argmin(scores: Tensor, valid: Tensor) -> Tensor:
    """Per row, the last index where ``scores`` is minimal among the valid entries (entropy's tie rule)."""
    masked = torch.where(valid, scores, torch.inf)
    best = masked.amin(1, keepdim=True)
    hit = (valid & (masked == best)).to(torch.int8)
    return hit.shape[1] - 1 - torch.argmax(hit.flip(1), dim=1)


def mse_amax_batched(stack: HistogramStack, num_bits: int = 8, unsigned: bool = False, start_bin: int = 128,
                     stride: int = 1) -> Tensor:
    """:func:`~trtquant.calib.methods.mse_amax` for every row, [R] float32.

    Candidate i of row r (bin centers ``i in range(start_r, length_r, stride)``, ``start_r = start_bin``
    when the row is longer, else 0) scores ``sum_k counts[r, k] * E[i, k] * width_r**2 / length_r``
    with E the squared error table in bin-width units; ``width_r**2`` is an exact common factor, so it
    is left out of the comparison.
    """
    _check_quant_args(num_bits, unsigned, start_bin, stride, fp8=True)  # FP8 errors scale with the bin width too
    if isinstance(num_bits, list):
        num_bits = tuple(num_bits)
    counts = stack.counts.to(torch.float64)
    rows, bins = counts.shape
    device = counts.device
    if bins <= _MSE_TABLE_MAX_BINS:
        table = _mse_error_table(bins, num_bits, unsigned, str(device))
        scores = counts @ table.T
    else:
        block = max(1, (1 << 22) // bins)
        scores = torch.cat([counts @ _mse_error_rows(torch.arange(b0, min(b0 + block, bins), device=device), bins,
                                                     num_bits, unsigned).T for b0 in range(0, bins, block)], dim=1)
    scores = scores / stack.lengths.to(torch.float64).unsqueeze(1)
    i = torch.arange(bins, device=device)
    start = torch.where(stack.lengths > start_bin, start_bin, 0).unsqueeze(1)
    valid = (i >= start) & (i < stack.lengths.unsqueeze(1)) & ((i - start) % stride == 0)
    best = _first_valid_argmin(scores, valid)
    return (best.to(torch.float32) + 0.5) * stack.widths


# --------------------------------------------------------------------------------------------------
# entropy: the prefix-sum KL search of methods.entropy_amax with a leading row dimension
# --------------------------------------------------------------------------------------------------
def entropy_amax_batched(stack: HistogramStack, num_bits: int = 8, unsigned: bool = False, start_bin: int = 128,
                         stride: int = 1) -> Tensor:
    """:func:`~trtquant.calib.methods.entropy_amax` for every row, [R] float32.

    Same arithmetic, element for element, as the per-histogram search (see its docstring for the
    derivation); rows are processed longest first, and a block of candidates only involves the rows
    long enough to have candidates in it.
    """
    _check_quant_args(num_bits, unsigned, start_bin, stride)
    order = torch.argsort(stack.lengths, descending=True, stable=True)
    lengths = stack.lengths[order]
    bins = stack.counts[order].to(torch.float64)
    rows, n = bins.shape
    device = bins.device
    nbins = 1 << (num_bits - 1 + int(unsigned))
    lengths_host = lengths.tolist()

    if n >= 2:  # bins[0] = bins[1] for rows of two bins or more
        bins[:, 0] = torch.where(lengths >= 2, bins[:, 1], bins[:, 0])
    positive = bins > 0
    nonzero = positive.to(torch.float64)
    blogb = torch.where(positive, bins * torch.log(torch.where(positive, bins, 1.0)), 0.0)
    prefixes = torch.cat([bins.new_zeros(rows, 3, 1), torch.cumsum(torch.stack([bins, nonzero, blogb], 1), 2)], 2)
    prefix_sum = prefixes[:, 0]
    suffix_sum = torch.cat([torch.cumsum(bins.flip(1), 1).flip(1), bins.new_zeros(rows, 1)], 1)
    total = suffix_sum[:, :1]

    starts = torch.clamp(lengths, max=start_bin)
    first = int(starts.min())
    candidates = torch.arange(first, n + 1, device=device)
    group_ids = torch.arange(nbins + 1, device=device)
    # Prefixes with the bin index first: gathering the group bounds copies contiguous [3, rows] slabs.
    by_bin = prefixes.permute(2, 1, 0).contiguous()  # [n + 1, 3, rows]
    divergence = torch.full((rows, candidates.numel()), torch.inf, dtype=torch.float64, device=device)
    block = max(1, _ENTROPY_BLOCK_ELEMS // (rows * (nbins + 1)))
    slab = by_bin
    for b0 in range(0, candidates.numel(), block):
        i = candidates[b0: b0 + block]
        needed = sum(1 for length in lengths_host if length >= first + b0)  # rows sorted longest first
        if needed == 0:
            break
        if needed < 0.75 * slab.shape[2]:  # drop rows with no candidates left (a copy, so done rarely)
            slab = by_bin[:, :, :needed].contiguous()
        active = slab.shape[2]
        b = i.numel()
        bounds = torch.div(group_ids * i.unsqueeze(1) + (nbins - 1), nbins, rounding_mode="floor")
        at_bounds = slab.index_select(0, bounds.reshape(-1)).view(b, nbins + 1, 3, active)
        s, z, blogb_sum = at_bounds.diff(dim=1).unbind(2)  # each [b, nbins, active]
        # A group without a non-zero bin has s == blogb_sum == 0: its Q value is taken as 1 (log 0 terms
        # vanish), exactly the per-histogram search's where(occupied, ..., 1.0) without the selects.
        empty = z == 0
        mean = (s + empty).div_(z.clamp_min(1.0))
        group_terms = blogb_sum - s * torch.log(mean)
        # Sum each candidate's groups in the per-histogram search's order (contiguous inner reduction).
        inner = group_terms.permute(2, 0, 1).contiguous().sum(2)  # [active, b]
        index = i.unsqueeze(0).expand(active, -1)
        b_last = bins[:active].gather(1, index - 1)
        tail = suffix_sum[:active].gather(1, index)
        g_last = torch.div((i - 1) * nbins, i, rounding_mode="floor")
        q_last = mean.gather(1, g_last.view(-1, 1, 1).expand(-1, 1, active)).view(b, active).T
        mass = prefix_sum[:active].gather(1, index)
        divergence[:active, b0: b0 + b] = _divergence(inner, b_last, tail, q_last, mass, total[:active])

    valid = (candidates >= starts.unsqueeze(1)) & (candidates <= lengths.unsqueeze(1)) & (
        (candidates - starts.unsqueeze(1)) % stride == 0)
    best = candidates[_last_valid_argmin(divergence, valid)]
    widths = stack.widths[order]
    amax = torch.where(total.squeeze(1) > 0, _edges_at(best, widths), _edges_at(lengths, widths))
    return torch.empty_like(amax).scatter_(0, order, amax)


# --------------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _one_intra_op_thread(device: torch.device) -> Iterator[None]:
    """On the CPU, run the search on one intra-op thread.

    Its operations are a few hundred microseconds each. Split over threads, every one of them ends at
    a barrier, and on a machine whose cores are shared (DataLoader workers, another job) each barrier
    waits for a thread the OS has descheduled: measured on 2 cores with two busy processes, the entropy
    search of ResNet-50 took 0.9 s median and 4.4 s worst on two threads, against well under a second
    on one. One thread costs little when the machine is idle, because the search is memory-bound.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def amax_batched(stack: HistogramStack, method: str, **kwargs) -> Tensor:
    """amax of every row by ``method`` (max, percentile, mse, entropy) with the per-histogram keyword arguments."""
    from .methods import get_method

    get_method(method)  # the registry's error for an unknown name
    fn = {"max": max_amax_batched, "percentile": percentile_amax_batched, "mse": mse_amax_batched,
          "entropy": entropy_amax_batched}.get(method)
    if fn is None:
        raise ValueError(f"calibration method {method!r} has no batched form")
    device = stack.counts.device
    workers = min(torch.get_num_threads(), stack.rows, _MAX_ROW_WORKERS) if device.type == "cpu" else 1
    with _one_intra_op_thread(device):
        if fn is not entropy_amax_batched or workers < 2:
            return fn(stack, **kwargs)
        return _rows_in_parallel(fn, stack, workers, kwargs)


def _rows_in_parallel(fn, stack: HistogramStack, workers: int, kwargs: dict) -> Tensor:
    """``fn`` over disjoint sets of rows on ``workers`` threads, each running one-thread operations.

    Rows are independent, so the result is the same as one call. Unlike intra-op threads, the workers
    never wait for each other between operations: on an idle machine the search takes about 1/workers
    of the time; on a busy one each worker simply gets less CPU, never a barrier to wait at.
    """
    from concurrent.futures import ThreadPoolExecutor

    order = torch.argsort(stack.lengths, descending=True, stable=True).tolist()
    parts = [order[w::workers] for w in range(workers)]  # round robin over length: balanced work
    subsets = [torch.tensor(p, device=stack.counts.device) for p in parts]

    def run(rows: Tensor) -> Tensor:
        torch.set_num_threads(1)
        sub = HistogramStack(stack.counts.index_select(0, rows), stack.lengths.index_select(0, rows),
                             stack.widths.index_select(0, rows))
        return fn(sub, **kwargs)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="trtquant-amax") as pool:
        results = list(pool.map(run, subsets))
    amax = torch.empty(stack.rows, dtype=torch.float32, device=stack.counts.device)
    for rows, value in zip(subsets, results):
        amax[rows] = value
    return amax


def cache_key(method: str, kwargs: dict) -> Optional[tuple]:
    """A hashable key for (method, kwargs), or None when an argument is not hashable (then nothing is cached)."""
    try:
        key = (method, tuple(sorted(kwargs.items())))
        hash(key)
    except TypeError:
        return None
    return key
