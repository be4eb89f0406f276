"""float layer type -> quantized layer type, used by quantize() and quant_modules."""

from __future__ import annotations

from typing import Dict, Type

from torch import nn

from . import attention, conv, linear, pool

QUANT_MODULE_MAP: Dict[Type[nn.Module], type] = {
    nn.Conv1d: conv.QuantConv1d,
    nn.Conv2d: conv.QuantConv2d,
    nn.Conv3d: conv.QuantConv3d,
    nn.ConvTranspose1d: conv.QuantConvTranspose1d,
    nn.ConvTranspose2d: conv.QuantConvTranspose2d,
    nn.ConvTranspose3d: conv.QuantConvTranspose3d,
    nn.Linear: linear.QuantLinear,
    nn.MultiheadAttention: attention.QuantMultiheadAttention,
    nn.MaxPool1d: pool.QuantMaxPool1d,
    nn.MaxPool2d: pool.QuantMaxPool2d,
    nn.MaxPool3d: pool.QuantMaxPool3d,
    nn.AvgPool1d: pool.QuantAvgPool1d,
    nn.AvgPool2d: pool.QuantAvgPool2d,
    nn.AvgPool3d: pool.QuantAvgPool3d,
    nn.AdaptiveAvgPool1d: pool.QuantAdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d: pool.QuantAdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d: pool.QuantAdaptiveAvgPool3d,
}


def register(float_type: Type[nn.Module], quant_type: type) -> None:
    """Teach quantize() to swap ``float_type`` for ``quant_type`` (which needs a ``from_float``)."""
    if not hasattr(quant_type, "from_float"):
        raise TypeError(f"{quant_type.__name__} needs a from_float(module, ...) classmethod")
    QUANT_MODULE_MAP[float_type] = quant_type


def unregister(float_type: Type[nn.Module]) -> None:
    QUANT_MODULE_MAP.pop(float_type, None)
