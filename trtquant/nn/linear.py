"""Quantized Linear: input per tensor, weight per output row (axis 0, Gemm transB=1 in ONNX)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..descriptor import QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW
from .base import QuantMixin, check_unused_kwargs


class QuantLinear(QuantMixin, nn.Linear):
    _float_type = nn.Linear
    default_quant_desc_weight = QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs):
        desc_in = kwargs.pop("quant_desc_input", None)
        desc_w = kwargs.pop("quant_desc_weight", None)
        check_unused_kwargs(self._float_type, kwargs)
        self._float_type.__init__(self, in_features, out_features, bias=bias, **kwargs)
        self.init_quantizer(desc_in, desc_w)

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(self.input_quantizer(input), self.quant_weight(), self.bias)


Linear = QuantLinear
