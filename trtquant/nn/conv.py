"""Quantized convolutions: input per tensor, weight per output channel (ConvTranspose: axis 1)."""

from __future__ import annotations

from typing import List, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ..descriptor import (
    QUANT_DESC_8BIT_CONV1D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONV3D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONVTRANSPOSE1D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONVTRANSPOSE3D_WEIGHT_PER_CHANNEL,
)
from .base import QuantMixin, check_unused_kwargs


def _split_desc(kwargs: dict):
    return kwargs.pop("quant_desc_input", None), kwargs.pop("quant_desc_weight", None)


class _QuantConvNd(QuantMixin):
    def _init(self, args, kwargs) -> None:
        desc_in, desc_w = _split_desc(kwargs)
        check_unused_kwargs(self._float_type, kwargs)
        self._float_type.__init__(self, *args, **kwargs)
        self.init_quantizer(desc_in, desc_w)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(self.input_quantizer(input), self.quant_weight(), self.bias)


class QuantConv1d(_QuantConvNd, nn.Conv1d):
    _float_type = nn.Conv1d
    default_quant_desc_weight = QUANT_DESC_8BIT_CONV1D_WEIGHT_PER_CHANNEL

    def __init__(self, *args, **kwargs):
        self._init(args, kwargs)


class QuantConv2d(_QuantConvNd, nn.Conv2d):
    _float_type = nn.Conv2d
    default_quant_desc_weight = QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL

    def __init__(self, *args, **kwargs):
        self._init(args, kwargs)


class QuantConv3d(_QuantConvNd, nn.Conv3d):
    _float_type = nn.Conv3d
    default_quant_desc_weight = QUANT_DESC_8BIT_CONV3D_WEIGHT_PER_CHANNEL

    def __init__(self, *args, **kwargs):
        self._init(args, kwargs)


class _QuantConvTransposeNd(_QuantConvNd):
    _dims: int
    _fn = None

    def forward(self, input: Tensor, output_size: Optional[List[int]] = None) -> Tensor:
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size,
                                              self._dims, self.dilation)
        return type(self)._fn(self.input_quantizer(input), self.quant_weight(), self.bias, self.stride,
                              self.padding, output_padding, self.groups, self.dilation)


class QuantConvTranspose1d(_QuantConvTransposeNd, nn.ConvTranspose1d):
    _float_type = nn.ConvTranspose1d
    default_quant_desc_weight = QUANT_DESC_8BIT_CONVTRANSPOSE1D_WEIGHT_PER_CHANNEL
    _dims, _fn = 1, F.conv_transpose1d

    def __init__(self, *args, **kwargs):
        self._init(args, kwargs)


class QuantConvTranspose2d(_QuantConvTransposeNd, nn.ConvTranspose2d):
    _float_type = nn.ConvTranspose2d
    default_quant_desc_weight = QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL
    _dims, _fn = 2, F.conv_transpose2d

    def __init__(self, *args, **kwargs):
        self._init(args, kwargs)


class QuantConvTranspose3d(_QuantConvTransposeNd, nn.ConvTranspose3d):
    _float_type = nn.ConvTranspose3d
    default_quant_desc_weight = QUANT_DESC_8BIT_CONVTRANSPOSE3D_WEIGHT_PER_CHANNEL
    _dims, _fn = 3, F.conv_transpose3d

    def __init__(self, *args, **kwargs):
        self._init(args, kwargs)


# pytorch-quantization aliases
Conv1d, Conv2d, Conv3d = QuantConv1d, QuantConv2d, QuantConv3d
ConvTranspose1d, ConvTranspose2d, ConvTranspose3d = QuantConvTranspose1d, QuantConvTranspose2d, QuantConvTranspose3d
