"""pytorch-quantization's ``tensor_quant`` face: descriptors, presets and autograd quant functions.

Names and argument orders are the original's (``fake_tensor_quant(inputs, amax, num_bits=8,
unsigned=False, narrow_range=True)`` ...); the arithmetic of the integer functions is trtquant's
(see :mod:`trtquant.functional`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .descriptor import (
    QUANT_DESC_8BIT_CONV1D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONV3D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONVTRANSPOSE1D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONVTRANSPOSE3D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW,
    QUANT_DESC_8BIT_PER_TENSOR,
    QUANT_DESC_UNSIGNED_8BIT_PER_TENSOR,
    QuantDescriptor,
    ScaledQuantDescriptor,
)
from .functional import (
    _FakeFp8Function, _FakeTensorQuantFunction, _TensorQuantFunction, fake_fp8, fake_quant, fake_tensor_quant,
    quant_bounds, tensor_quant,
)

# pytorch-quantization's class names.
TensorQuantFunction = _TensorQuantFunction
FakeTensorQuantFunction = _FakeTensorQuantFunction
ScaledE4M3Function = _FakeFp8Function


class LegacyFakeTensorQuantFunction(_FakeTensorQuantFunction):
    """The original's pure-PyTorch fake quant (its CUDA kernel's reference); here the same computation."""


class FakeAffineTensorQuantFunction(torch.autograd.Function):
    """Asymmetric (scale and zero point) fake quantization over [min_range, max_range], per tensor.

    The step is (max - min) / (2^bits - 1); the zero point is the integer nearest to min/step shifted
    to the signed range [-2^(bits-1), 2^(bits-1) - 1]. Gradient passes where min <= x <= max.
    Experimental in the original too (TensorRT runs symmetric quantization).
    """

    @staticmethod
    def forward(ctx, inputs: Tensor, min_range: Tensor, max_range: Tensor, num_bits: int = 8):
        ctx.save_for_backward(inputs, min_range, max_range)
        levels = 2.0 ** num_bits - 1
        step = (max_range - min_range) / levels
        lo, hi = -(2.0 ** (num_bits - 1)), 2.0 ** (num_bits - 1) - 1
        zero_point = torch.round(min_range / step) - lo
        codes = torch.clamp(torch.round(inputs / step) - zero_point, lo, hi)
        return (codes + zero_point) * step

    @staticmethod
    def backward(ctx, grad_outputs: Tensor):
        inputs, min_range, max_range = ctx.saved_tensors
        inside = (inputs >= min_range) & (inputs <= max_range)
        return torch.where(inside, grad_outputs, torch.zeros_like(grad_outputs)), None, None, None


legacy_fake_tensor_quant = LegacyFakeTensorQuantFunction.apply
fake_affine_tensor_quant = FakeAffineTensorQuantFunction.apply


def scaled_e4m3(inputs: Tensor, amax: Optional[Tensor] = None, E: int = 4, M: int = 3) -> Tensor:
    """FP8 fake quantization: amax maps to the format's largest value (448 for E4M3); None rounds unscaled.

    ``E, M`` = 4, 3 (E4M3, TensorRT's FP8) or 5, 2 (E5M2; the original supports E4M3 only).
    """
    if (E, M) not in ((4, 3), (5, 2)):
        raise NotImplementedError(f"FP8 format E{E}M{M} is not supported; use E=4, M=3 (E4M3) or E=5, M=2 (E5M2)")
    return fake_fp8(inputs, amax, (E, M))


__all__ = [
    "QuantDescriptor", "ScaledQuantDescriptor", "QUANT_DESC_8BIT_PER_TENSOR", "QUANT_DESC_UNSIGNED_8BIT_PER_TENSOR",
    "QUANT_DESC_8BIT_CONV1D_WEIGHT_PER_CHANNEL", "QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONV3D_WEIGHT_PER_CHANNEL", "QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW",
    "QUANT_DESC_8BIT_CONVTRANSPOSE1D_WEIGHT_PER_CHANNEL", "QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONVTRANSPOSE3D_WEIGHT_PER_CHANNEL", "fake_tensor_quant", "tensor_quant", "fake_quant",
    "quant_bounds", "legacy_fake_tensor_quant", "fake_affine_tensor_quant", "scaled_e4m3",
    "TensorQuantFunction", "FakeTensorQuantFunction", "LegacyFakeTensorQuantFunction",
    "FakeAffineTensorQuantFunction", "ScaledE4M3Function",
]
