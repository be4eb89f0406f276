"""Quantized pooling: an input quantizer in front of the float pool.

AvgPool needs its input quantized for TensorRT to run it in INT8; MaxPool commutes with Q/DQ, so
its quantizer exists for pytorch-quantization parity but automatic placement leaves it disabled.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..descriptor import QuantDescriptor
from .base import QuantInputMixin, check_unused_kwargs, quant_input_from_float


class _QuantPool(QuantInputMixin):
    _float_type: type

    def _init(self, args, kwargs) -> None:
        desc_in = kwargs.pop("quant_desc_input", None)
        check_unused_kwargs(self._float_type, kwargs)
        self._float_type.__init__(self, *args, **kwargs)
        self.init_quantizer(desc_in)

    def forward(self, input: Tensor) -> Tensor:
        return self._float_type.forward(self, self.input_quantizer(input))

    @classmethod
    def from_float(cls, module: nn.Module, quant_desc_input: Optional[QuantDescriptor] = None, **_: object):
        return quant_input_from_float(cls, module, quant_desc_input)


def _make(name: str, base: type, module: str = __name__) -> type:
    def __init__(self, *args, **kwargs):
        self._init(args, kwargs)

    return type(name, (_QuantPool, base), {"_float_type": base, "__init__": __init__, "__module__": module,
                                            "__doc__": f"{base.__name__} with an input quantizer."})


QuantMaxPool1d = _make("QuantMaxPool1d", nn.MaxPool1d)
QuantMaxPool2d = _make("QuantMaxPool2d", nn.MaxPool2d)
QuantMaxPool3d = _make("QuantMaxPool3d", nn.MaxPool3d)
QuantAvgPool1d = _make("QuantAvgPool1d", nn.AvgPool1d)
QuantAvgPool2d = _make("QuantAvgPool2d", nn.AvgPool2d)
QuantAvgPool3d = _make("QuantAvgPool3d", nn.AvgPool3d)
QuantAdaptiveAvgPool1d = _make("QuantAdaptiveAvgPool1d", nn.AdaptiveAvgPool1d)
QuantAdaptiveAvgPool2d = _make("QuantAdaptiveAvgPool2d", nn.AdaptiveAvgPool2d)
QuantAdaptiveAvgPool3d = _make("QuantAdaptiveAvgPool3d", nn.AdaptiveAvgPool3d)

MaxPool1d, MaxPool2d, MaxPool3d = QuantMaxPool1d, QuantMaxPool2d, QuantMaxPool3d
AvgPool1d, AvgPool2d, AvgPool3d = QuantAvgPool1d, QuantAvgPool2d, QuantAvgPool3d
AdaptiveAvgPool1d, AdaptiveAvgPool2d, AdaptiveAvgPool3d = QuantAdaptiveAvgPool1d, QuantAdaptiveAvgPool2d, QuantAdaptiveAvgPool3d
