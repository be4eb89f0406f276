"""``nn.modules.tensor_quantizer``: :class:`trtquant.quantizer.TensorQuantizer` under its old path."""

from ...quantizer import TensorQuantizer

__all__ = ["TensorQuantizer"]
