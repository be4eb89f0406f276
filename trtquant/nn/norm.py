"""Quantized InstanceNorm: an input quantizer in front of the float normalization.

pytorch-quantization's ``QuantInstanceNorm1d/2d/3d``. TensorRT fuses an InstanceNormalization whose
input comes through Q/DQ; the normalization itself runs in float.
"""

from __future__ import annotations

from torch import nn

from .pool import _make

QuantInstanceNorm1d = _make("QuantInstanceNorm1d", nn.InstanceNorm1d, __name__)
QuantInstanceNorm2d = _make("QuantInstanceNorm2d", nn.InstanceNorm2d, __name__)
QuantInstanceNorm3d = _make("QuantInstanceNorm3d", nn.InstanceNorm3d, __name__)

__all__ = ["QuantInstanceNorm1d", "QuantInstanceNorm2d", "QuantInstanceNorm3d"]
