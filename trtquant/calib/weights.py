"""calibrate_weights: amax of every quantized layer's weight straight from the weight (no data needed).

pytorch-quantization's ``calib.calibrate_weights``: per output channel (axis 0; axis 1 for
ConvTranspose) or per tensor, by ``max``, ``percentile`` or ``mse`` over a histogram of |w|. The
method is the argument's, not the one of the layer's calibrator.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor, nn

from .histogram import HistogramCalibrator

__all__ = ["calibrate_weights"]

_METHODS = ("max", "percentile", "mse")


def _channel_axis(module: nn.Module) -> int:
    return 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0


def _amax_of(w: Tensor, method: str, num_bits, unsigned: bool, percentile: float, num_bins: int) -> Tensor:
    if method == "max":
        return w.detach().abs().amax().to(torch.float32)
    calibrator = HistogramCalibrator(num_bits if isinstance(num_bits, int) else 8, None, unsigned, num_bins=num_bins)
    calibrator.collect(w.detach())
    kwargs = {"percentile": percentile} if method == "percentile" else {}
    amax = calibrator.compute_amax(method, **kwargs)
    assert amax is not None  # collect() just saw the weight
    return amax.reshape(())


def calibrate_weights(model: nn.Module, method: str = "percentile", perchannel: bool = True,
                      percentile: float = 99.99, num_bins: int = 2048) -> None:
    """Set ``weight_quantizer.amax`` of every layer with a weight and a weight quantizer.

    Args:
        model: any module tree containing quantized layers.
        method: "max", "percentile" or "mse".
        perchannel: one amax per output channel (shape broadcastable to the weight) or one per tensor.
        percentile: for ``method="percentile"``.
        num_bins: histogram bins for percentile/mse.
    """
    if method not in _METHODS:
        raise TypeError(f"Unsupported calibration method {method!r}; calibrate_weights supports {', '.join(_METHODS)}")
    for name, module in model.named_modules():
        wq = getattr(module, "weight_quantizer", None)
        w = getattr(module, "weight", None)
        if wq is None or not isinstance(w, Tensor):
            continue
        args = (method, wq.num_bits, wq.unsigned, percentile, num_bins)
        if not perchannel:
            amax = _amax_of(w, *args)
        else:
            axis = _channel_axis(module)
            per: List[Tensor] = [_amax_of(w.select(axis, i), *args) for i in range(w.shape[axis])]
            shape = [1] * w.dim()
            shape[axis] = w.shape[axis]
            amax = torch.stack(per).reshape(shape)
        wq.amax = amax.detach().cpu()
