"""HistogramCalibrator: a histogram of |x| collected on the tensor's own device.

The range is always a power of two (the smallest one >= max |x| seen so far) split into
``num_bins`` equal bins. Because ``num_bins / range`` is then a power of two, each value's bin
``floor(|x| * num_bins / range)`` is computed exactly, and when a later batch grows the range the
old bins merge exactly (2^k old bins -> 1 new bin). The final histogram therefore depends only on
the data, not on batch size or order - amax is deterministic - and no host sync is needed per batch.
The price: between num_bins/2 and num_bins bins lie below the maximum.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _native
from .base import Calibrator

_TINY = 2.0 ** -100
# Calibrators holding statistics whose amax has not been computed yet: a per-quantizer amax request
# (pytorch-quantization's ``load_calib_amax`` loop) computes theirs in the same batch. Weak: a
# calibrator that is garbage collected leaves the set by itself.
_PENDING: "weakref.WeakSet[HistogramCalibrator]" = weakref.WeakSet()
_FLT_MAX = 3.4028234663852886e38


def _pow2_ceil(m: Tensor) -> Tensor:
    """The smallest power of two >= m, exactly (float32 log2 would round 1024.0001 down to 2^10)."""
    m = m.to(torch.float32).clamp_min(_TINY)
    mantissa, exponent = torch.frexp(m)  # m = mantissa * 2^exponent, mantissa in [0.5, 1)
    return torch.ldexp(torch.ones_like(m), torch.where(mantissa == 0.5, exponent - 1, exponent))


def rebin(hist: Tensor, old_range: Tensor, new_range: Tensor) -> Tensor:
    """Merge ``hist`` over [0, old_range] into the same number of bins over [0, new_range] (>= old, power-of-two ratio)."""
    n = hist.numel()
    ratio = old_range / new_range  # 2^-k, exact
    idx = (torch.arange(n, device=hist.device, dtype=torch.float32) * ratio).floor_().long()
    return torch.zeros_like(hist).scatter_add_(0, idx, hist)


def _bin_counts(xa: Tensor, n: int, range_: Tensor) -> Tensor:
    """Counts of |x| in ``n`` bins over [0, range_], int64; values beyond the range land in the last bin."""
    idx = (xa * (n / range_)).to(torch.int32).clamp_(0, n - 1).reshape(-1)
    # bincount sizes its output from max(idx) (a host sync on CUDA); scatter_add does not.
    ones = torch.ones((), dtype=torch.int64, device=xa.device).expand(idx.numel())
    return torch.zeros(n, dtype=torch.int64, device=xa.device).scatter_add_(0, idx.long(), ones)


_HISTC_CHUNK = 1 << 23  # histc counts in float32: exact while a call sees < 2^24 elements


def _histc_counts(xa: Tensor, n: int, range_: float) -> Tensor:
    """CPU: torch.histc over [0, range_] (exact bins: range_ and n are powers of two), int64 counts.

    Values above the range (and NaN) are not counted; callers compare the total with numel.
    """
    flat = xa.reshape(-1)
    total = torch.zeros(n, dtype=torch.int64)
    for start in range(0, flat.numel(), _HISTC_CHUNK):
        total += torch.histc(flat[start:start + _HISTC_CHUNK], bins=n, min=0.0, max=range_).to(torch.int64)
    return total


class HistogramCalibrator(Calibrator):
    """Histogram of |x| with ``num_bins`` bins; amax by percentile, mse or entropy from it."""

    kind = "histogram"

    def __init__(self, num_bits: int = 8, axis=None, unsigned: bool = False, num_bins: int = 2048,
                 skip_zeros: bool = False, ignore_nonfinite: bool = False, *, grow_method: Optional[str] = None,
                 torch_hist: bool = True):
        if axis is not None:
            raise ValueError(
                f"HistogramCalibrator is per-tensor only (axis=None), got axis={axis}; "
                "use calib_method='max' for per-channel weights"
            )
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
            raise ValueError(f"num_bins must be an integer >= 2 (a power of two >= 16 is recommended), got {num_bins!r}")
        # pytorch-quantization's grow_method (deprecated there, ignored) and torch_hist (numpy or torch
        # binning): the range here always grows by powers of two and bins with torch, so both are accepted
        # for compatibility and have no effect.
        self._grow_method = grow_method
        self._torch_hist = torch_hist
        super().__init__(num_bits, axis, unsigned, ignore_nonfinite)
        self._num_bins = num_bins
        self._skip_zeros = skip_zeros
        self._hist: Optional[Tensor] = None
        self._range: Optional[Tensor] = None
        self._amax_cache: Dict[tuple, Tensor] = {}  # (method, resolved kwargs) -> amax of the current histogram

    def _statistics_changed(self) -> None:
        self._amax_cache = {}
        if self._hist is None:
            _PENDING.discard(self)
        else:
            _PENDING.add(self)

    def collect(self, x: Tensor) -> None:
        try:
            self._collect(x)
        finally:
            self._statistics_changed()

    def _collect(self, x: Tensor) -> None:
        x = x.detach()
        if x.dtype != torch.float32:
            x = x.float()
        if x.device.type == "cpu" and x.numel() and _native.load() is not None:
            self._collect_native(x)
            return
        # Most calibrated tensors are ReLU outputs: skip the |x| copy when nothing is negative
        # (on the CPU the min is a cheap reduction, the copy is a fresh allocation).
        xa = x if x.device.type == "cpu" and x.numel() and bool(x.amin() >= 0) else x.abs()
        if self.ignore_nonfinite:
            xa = torch.where(torch.isfinite(xa), xa, torch.zeros((), device=xa.device))
        if xa.device.type == "cpu":
            self._collect_cpu(xa)
            return
        m = xa.amax()
        if not self.ignore_nonfinite:
            self._note_nonfinite(m)
            # inf/NaN are reported after calibration (no per-batch sync); keep the range finite meanwhile.
            m = torch.where(torch.isfinite(m), m, torch.zeros((), device=m.device))
        new_range = _pow2_ceil(m) if self._range is None else torch.maximum(self._range, _pow2_ceil(m))
        if self._hist is not None:
            self._hist = rebin(self._hist, self._range, new_range)
        self._range = new_range
        counts = _bin_counts(xa, self._num_bins, new_range)
        if self._skip_zeros:
            counts[0] -= (xa == 0).sum()
        self._hist = counts if self._hist is None else self._hist.add_(counts)
        self.num_batches += 1

    def _collect_native(self, x: Tensor) -> None:
        # One read of x per batch (|x|, bins, max, zeros, out-of-range and non-finite counts together);
        # a second only when the range grows. Counts equal torch.histc's on the same range.
        n = self._num_bins
        counts = torch.zeros(n, dtype=torch.int64)
        if self._range is None:
            lo, hi = torch.aminmax(x)
            m = max(-float(lo), float(hi))
            if not math.isfinite(m):  # inf/NaN present: the kernel finds the finite maximum
                m = _native.abs_histogram(x, n, _FLT_MAX, torch.zeros(n, dtype=torch.int64)).max_abs
            stats = _native.abs_histogram(x, n, float(_pow2_ceil(torch.tensor(m))), counts)
            self._range = _pow2_ceil(torch.tensor(m))
        else:
            stats = _native.abs_histogram(x, n, float(self._range), counts)
            if stats.over:
                new_range = torch.maximum(self._range, _pow2_ceil(torch.tensor(stats.max_abs)))
                counts.zero_()
                stats = _native.abs_histogram(x, n, float(new_range), counts)
                self._hist = rebin(self._hist, self._range, new_range)
                self._range = new_range
        if stats.over:  # cannot happen with an exact power-of-two range; never drop values silently
            raise RuntimeError(f"histogram: {stats.over} values above the range {float(self._range)}")
        zeros = stats.zeros
        if stats.nonfinite:  # counted as 0 (the value they are replaced by), like the other paths
            counts[0] += stats.nonfinite
            zeros += stats.nonfinite
            if not self.ignore_nonfinite:
                self._note_nonfinite(torch.tensor(float("nan")))
        if self._skip_zeros:
            counts[0] -= zeros
        self._hist = counts if self._hist is None else self._hist.add_(counts)
        self.num_batches += 1

    def _collect_cpu(self, xa: Tensor) -> None:
        # Host reads are free on the CPU: bin against the current range in one pass, and find the
        # max only when something fell outside it (then the range grows and both re-bin exactly).
        n = self._num_bins
        if self._range is not None:
            counts = _histc_counts(xa, n, float(self._range))
            if int(counts.sum()) == xa.numel():
                if self._skip_zeros:
                    counts[0] -= int((xa == 0).sum())
                self._hist.add_(counts)
                self.num_batches += 1
                return
        m = xa.amax()
        if not torch.isfinite(m):
            self._note_nonfinite(m)
            xa = torch.where(torch.isfinite(xa), xa, torch.zeros(()))
            m = xa.amax()
        new_range = _pow2_ceil(m) if self._range is None else torch.maximum(self._range, _pow2_ceil(m))
        counts = _histc_counts(xa, n, float(new_range))
        if self._skip_zeros:
            counts[0] -= int((xa == 0).sum())
        if self._hist is not None:
            self._hist = rebin(self._hist, self._range, new_range).add_(counts)
        else:
            self._hist = counts
        self._range = new_range
        self.num_batches += 1

    def reset(self) -> None:
        super().reset()
        self._hist = None
        self._range = None
        self._statistics_changed()

    @property
    def _calib_hist(self) -> Optional[Tensor]:
        """pytorch-quantization's name: the counts over [0, range] (all ``num_bins``), or None."""
        return None if self._hist is None else self._hist

    @property
    def _calib_bin_edges(self) -> Optional[Tensor]:
        """pytorch-quantization's name: the ``num_bins + 1`` bin edges, or None."""
        if self._hist is None:
            return None
        return torch.arange(self._num_bins + 1, device=self._hist.device, dtype=torch.float32) * (self._range / self._num_bins)

    @property
    def histogram(self) -> Optional[Tuple[Tensor, Tensor]]:
        """(counts, edges), trimmed after the last non-empty bin."""
        if self._hist is None:
            return None
        nz = torch.nonzero(self._hist).flatten()
        last = int(nz[-1]) + 1 if nz.numel() else 1
        width = self._range / self._num_bins
        edges = torch.arange(last + 1, device=self._hist.device, dtype=torch.float32) * width
        return self._hist[:last].clone(), edges

    def _resolved(self, method: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """The method's keyword arguments with this calibrator's num_bits/unsigned where not given."""
        if method in ("mse", "entropy"):
            return {"num_bits": self._num_bits, "unsigned": self._unsigned, **kwargs}
        return dict(kwargs)

    def _all_zero(self) -> bool:
        # Every |x| seen was <= 2^-100: zeros (a zero-initialized layer). The bins would give a
        # meaningless amax of ~1e-34 (scale 0 in fp16); 0 says "all zeros" and the quantizer
        # replaces it with its ZERO_AMAX floor, as for a max-calibrated zero tensor.
        return bool(self._range <= _TINY)

    def compute_amax(self, method: str = "percentile", **kwargs) -> Optional[Tensor]:
        """amax by ``method`` from the histogram (None if nothing was collected).

        Computed in one batch with every other calibrator whose amax is pending (see
        :meth:`compute_amax_many`) and cached until the statistics change; the value is the
        per-histogram function's (:mod:`trtquant.calib.methods`) exactly.
        """
        from .batched import cache_key
        from .methods import get_method

        if self._hist is None:
            return None
        fn = get_method(method)  # an unknown method fails even on an all-zero histogram
        if self._all_zero():
            return torch.zeros((), dtype=torch.float32, device=self._hist.device)
        resolved = self._resolved(method, kwargs)
        key = cache_key(method, resolved)
        if key is not None and key not in self._amax_cache:
            pending = [c for c in list(_PENDING) if c is not self and not c._amax_cache]
            HistogramCalibrator.precompute_amax([self] + pending, method, **kwargs)
        if key is None or key not in self._amax_cache:  # unhashable arguments, or nothing counted
            hist, edges = self.histogram
            return fn(hist, edges, **resolved).to(torch.float32)
        return self._amax_cache[key].clone()

    @staticmethod
    def precompute_amax(calibrators: Sequence["HistogramCalibrator"], method: str, **kwargs) -> None:
        """Compute the amax of many calibrators at once (:mod:`trtquant.calib.batched`) into each one's
        cache, where :meth:`compute_amax` then finds it.

        Histograms are stacked per device and per resolved method arguments, so a model's quantizers
        take a few large tensor operations instead of a chain of small ones each. An error (bad
        argument, empty histogram) is raised for the first calibrator only; the others are left to
        raise it when they are asked themselves.
        """
        from .batched import amax_batched, cache_key, stack_histograms
        from .methods import get_method

        get_method(method)
        groups: Dict[tuple, List[HistogramCalibrator]] = {}
        for cal in calibrators:
            if cal._hist is None or cal._all_zero():
                continue
            key = cache_key(method, cal._resolved(method, kwargs))
            if key is None or key in cal._amax_cache:
                continue
            groups.setdefault((cal._hist.device, key), []).append(cal)
        first = calibrators[0] if calibrators else None
        for (_, key), members in groups.items():
            try:
                members = [c for c in members if int(c._hist.count_nonzero())]
                if not members:
                    continue
                stack = stack_histograms([c._hist for c in members], [c._range / c._num_bins for c in members])
                amax = amax_batched(stack, method, **dict(key[1]))
            except (TypeError, ValueError):
                if first is not None and first in members:
                    raise
                continue
            for cal, value in zip(members, amax.unbind(0)):
                cal._amax_cache[key] = value
                _PENDING.discard(cal)

    def state_dict(self) -> Dict[str, Tensor]:
        if self._hist is None:
            return {}
        return {
            "hist": self._hist.detach().cpu(),
            "range": self._range.detach().cpu().reshape(()),
            "num_batches": torch.tensor(self.num_batches),
        }

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        self.reset()
        if "hist" in state:
            hist = state["hist"]
            if hist.numel() != self._num_bins:
                raise ValueError(f"histogram has {hist.numel()} bins, this calibrator uses {self._num_bins}")
            self._hist = hist.to(torch.int64).clone()
            self._range = state["range"].to(torch.float32).clone()
            self.num_batches = int(state.get("num_batches", torch.tensor(1)))
        self._statistics_changed()

    def all_reduce_(self, group=None) -> None:
        import torch.distributed as dist

        if self._hist is None:
            raise RuntimeError("cannot merge an empty HistogramCalibrator across ranks: this rank saw no data")
        # Agree on the range first, re-bin locally (exact), then sum counts.
        rng = self._range.clone().reshape(1)
        dist.all_reduce(rng, op=dist.ReduceOp.MAX, group=group)
        self._hist = rebin(self._hist, self._range, rng.reshape(()))
        self._range = rng.reshape(())
        dist.all_reduce(self._hist, group=group)
        self._statistics_changed()
        n = torch.tensor([self.num_batches], dtype=torch.int64, device=self._hist.device)
        dist.all_reduce(n, group=group)
        self.num_batches = int(n)
