"""``nn.modules.quant_conv``: the quantized convolutions of :mod:`trtquant.nn.conv` under their old path."""

from ..conv import (
    Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d, QuantConv1d, QuantConv2d, QuantConv3d,
    QuantConvTranspose1d, QuantConvTranspose2d, QuantConvTranspose3d,
)

__all__ = [
    "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "QuantConv1d", "QuantConv2d", "QuantConv3d", "QuantConvTranspose1d", "QuantConvTranspose2d", "QuantConvTranspose3d",
]
