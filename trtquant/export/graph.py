"""Compatibility import path: the ONNX graph index lives in :mod:`trtquant.graph.index`."""

from trtquant.graph.index import Dim, GraphIndex, Shape, is_default_domain, names_of
from trtquant.graph.ops import PASSTHROUGH as PASSTHROUGH_OPS

__all__ = ["GraphIndex", "PASSTHROUGH_OPS", "Dim", "Shape", "is_default_domain", "names_of"]
