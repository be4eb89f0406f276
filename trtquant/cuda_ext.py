"""pytorch-quantization's compiled ``cuda_ext`` functions, in PyTorch (any device).

The original is a CUDA extension; these compute the same quantities with tensor ops so code that
calls them directly keeps working on CPU and GPU alike. The fake-quant math is trtquant's
(x / scale rounded, times scale: what TensorRT and ONNX Runtime compute).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import fp8_round, quant_bounds

__all__ = ["fake_tensor_quant", "fake_tensor_quant_", "fake_tensor_quant_with_axis", "fake_e4m3fy"]

_EPS = 1.0 / (1 << 24)


def _fake(inputs: Tensor, amax: Tensor, num_bits: int, unsigned: bool, narrow_range: bool) -> Tensor:
    qmin, qmax, bound = quant_bounds(num_bits, unsigned, narrow_range)
    amax = torch.as_tensor(amax, device=inputs.device).to(torch.float32)
    x = inputs.float()
    scale = amax / bound
    safe = torch.where(amax > _EPS, scale, torch.ones_like(scale))
    out = torch.round(x / safe).clamp(qmin, qmax) * safe
    # amax at or below FP16's resolution quantizes everything to 0.
    out = torch.where(amax > _EPS, out, torch.zeros_like(out))
    return out.to(inputs.dtype)


def fake_tensor_quant(inputs: Tensor, amax: Tensor, num_bits: int = 8, unsigned: bool = False,
                      narrow_range: bool = True) -> Tensor:
    """Fake-quantize with a per-tensor amax (narrow range by default, as the extension)."""
    return _fake(inputs, amax, num_bits, unsigned, narrow_range)


def fake_tensor_quant_(inputs: Tensor, amax: Tensor, num_bits: int = 8, unsigned: bool = False,
                       narrow_range: bool = True) -> Tensor:
    """In-place :func:`fake_tensor_quant`; returns ``inputs``."""
    with torch.no_grad():
        inputs.copy_(_fake(inputs, amax, num_bits, unsigned, narrow_range))
    return inputs


def fake_tensor_quant_with_axis(inputs: Tensor, amax: Tensor, axis: int, num_bits: int = 8, unsigned: bool = False,
                                narrow_range: bool = True) -> Tensor:
    """Fake-quantize with one amax per index of ``axis`` (``amax`` has that axis' size elements)."""
    axis = axis % inputs.dim()
    shape = [1] * inputs.dim()
    shape[axis] = inputs.shape[axis]
    return _fake(inputs, torch.as_tensor(amax).reshape(shape), num_bits, unsigned, narrow_range)


def fake_e4m3fy(inputs: Tensor) -> Tensor:
    """Round to FP8 E4M3 (saturating at +-448), unscaled."""
    return fp8_round(inputs, (4, 3))
