"""pytorch-quantization's ``utils``: ``reduce_amax`` with its axis semantics (the axes to reduce)."""

from . import quant_logging
from .reduce_amax import reduce_amax

__all__ = ["reduce_amax", "quant_logging"]
