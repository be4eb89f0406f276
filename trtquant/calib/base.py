"""Calibrator interface: collect statistics on the tensor's device, compute amax later."""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor


class Calibrator:
    """Collects statistics of a tensor over batches; subclasses define what and how amax follows."""

    kind: str = "base"

    def __init__(self, num_bits: int = 8, axis=None, unsigned: bool = False, ignore_nonfinite: bool = False):
        self._num_bits = num_bits
        self._axis = axis
        self._unsigned = unsigned
        self.ignore_nonfinite = ignore_nonfinite
        # A device flag, read once after calibration: no host sync per batch.
        self._nonfinite: Optional[Tensor] = None
        self.num_batches = 0

    def _note_nonfinite(self, batch_amax: Tensor) -> None:
        bad = ~torch.isfinite(batch_amax).all()
        self._nonfinite = bad if self._nonfinite is None else (self._nonfinite | bad)

    def saw_nonfinite(self) -> bool:
        return bool(self._nonfinite) if self._nonfinite is not None else False

    def collect(self, x: Tensor) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        self._nonfinite = None
        self.num_batches = 0

    def compute_amax(self, *args, **kwargs) -> Optional[Tensor]:
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Tensor]:
        raise NotImplementedError

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        raise NotImplementedError

    def config_key(self) -> tuple:
        """Calibrators with equal keys collect identical statistics from identical data."""
        return (type(self).__name__, self._num_bits, self._axis, self._unsigned, self.ignore_nonfinite,
                getattr(self, "_num_bins", None), getattr(self, "_skip_zeros", None))

    def copy_from(self, other: "Calibrator") -> None:
        """Take ``other``'s statistics (both saw the same tensors)."""
        self.load_state_dict(other.state_dict())
        self._nonfinite = None if other._nonfinite is None else other._nonfinite.clone()
        self.num_batches = other.num_batches

    def all_reduce_(self, group=None) -> None:
        """Merge this calibrator's statistics across torch.distributed ranks, in place."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_bits={self._num_bits}, axis={self._axis}, unsigned={self._unsigned}, batches={self.num_batches})"
