"""MaxCalibrator: running max of |x|, per tensor or per channel."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

from ..errors import CalibrationError
from .base import Calibrator


def reduce_amax(x: Tensor, axis=None, keepdims: bool = True) -> Tensor:
    """max |x| over every dimension except ``axis`` (kept with size, others size 1 when keepdims)."""
    # max(max x, -min x) reads x without materialising |x| (a full-size copy); NaN propagates.
    x = x.detach()
    if axis is None:
        lo, hi = torch.aminmax(x)
        return torch.maximum(hi, -lo).abs()  # abs: +0.0 for an all -0.0 tensor
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    axes = tuple(a % x.dim() for a in axes)
    dims = [d for d in range(x.dim()) if d not in axes]
    if not dims:
        return x.abs()
    return torch.maximum(x.amax(dim=dims, keepdim=keepdims), -x.amin(dim=dims, keepdim=keepdims)).abs()


class MaxCalibrator(Calibrator):
    """Keeps the running maximum of |x|; ``track_amax`` also records each batch's amax."""

    kind = "max"

    def __init__(self, num_bits: int = 8, axis=None, unsigned: bool = False, track_amax: bool = False,
                 ignore_nonfinite: bool = False):
        super().__init__(num_bits, axis, unsigned, ignore_nonfinite)
        self._track_amax = track_amax
        self._calib_amax: Optional[Tensor] = None
        self._amaxs: List[Tensor] = []

    def collect(self, x: Tensor) -> None:
        x = x.detach()
        if self.ignore_nonfinite:
            x = torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))
        batch_amax = reduce_amax(x, self._axis).to(torch.float32)
        if not self.ignore_nonfinite:
            self._note_nonfinite(batch_amax)
        if self._calib_amax is None:
            self._calib_amax = batch_amax.clone()
        else:
            if batch_amax.shape != self._calib_amax.shape:
                raise CalibrationError(
                    f"per-channel amax shape changed between batches: {tuple(self._calib_amax.shape)} -> "
                    f"{tuple(batch_amax.shape)}; the quantized axis must keep its size"
                )
            torch.maximum(self._calib_amax, batch_amax, out=self._calib_amax)
        if self._track_amax:
            self._amaxs.append(batch_amax)
        self.num_batches += 1

    @property
    def amaxs(self) -> List[Tensor]:
        return self._amaxs

    def reset(self) -> None:
        super().reset()
        self._calib_amax = None
        self._amaxs = []

    def compute_amax(self, method: str = "max", **kwargs) -> Optional[Tensor]:
        if method != "max":
            raise ValueError(
                f"method '{method}' needs a histogram; this quantizer collected only maxima "
                "(use calib_method='histogram' for percentile/mse/entropy)"
            )
        return None if self._calib_amax is None else self._calib_amax.clone()

    def state_dict(self) -> Dict[str, Tensor]:
        if self._calib_amax is None:
            return {}
        return {"amax": self._calib_amax.detach().cpu(), "num_batches": torch.tensor(self.num_batches)}

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        self.reset()
        if "amax" in state:
            self._calib_amax = state["amax"].to(torch.float32).clone()
            self.num_batches = int(state.get("num_batches", torch.tensor(1)))

    def all_reduce_(self, group=None) -> None:
        import torch.distributed as dist

        if self._calib_amax is None:
            raise RuntimeError("cannot merge an empty MaxCalibrator across ranks: this rank saw no data")
        dist.all_reduce(self._calib_amax, op=dist.ReduceOp.MAX, group=group)
        n = torch.tensor([self.num_batches], dtype=torch.int64, device=self._calib_amax.device)
        dist.all_reduce(n, group=group)
        self.num_batches = int(n)
