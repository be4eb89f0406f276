"""``nn.modules.quant_instancenorm``: :mod:`trtquant.nn.norm` under its old path."""

from ..norm import QuantInstanceNorm1d, QuantInstanceNorm2d, QuantInstanceNorm3d

__all__ = ["QuantInstanceNorm1d", "QuantInstanceNorm2d", "QuantInstanceNorm3d"]
