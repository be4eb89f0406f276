"""``nn.modules.quant_linear``: :class:`trtquant.nn.linear.QuantLinear` under its old path."""

from ..linear import Linear, QuantLinear

__all__ = ["Linear", "QuantLinear"]
