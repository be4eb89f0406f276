"""One graph model for every ONNX reader and writer, one op vocabulary, and the structural rules.

* :mod:`.ops` - which ops pass constants through, commute with quantization, or belong to a conv epilogue;
* :mod:`.index` - :class:`GraphIndex`, the ONNX graph index (producers/consumers, constants, attributes,
  types, topological order, and a mutable mode for graph rewrites);
* :mod:`.dag` - structural rules written once over an abstract DAG (residual identity, concat sharing,
  epilogue walks); :mod:`.onnx_dag` adapts an ONNX graph to it, ``trtquant.placement.fx_dag`` a torch.fx
  graph, so placement and the checker cannot disagree.
"""

from .dag import ResidualSplit, concat_quantizer_groups, residual_split, weighted_source
from .index import GraphIndex

__all__ = ["GraphIndex", "ResidualSplit", "concat_quantizer_groups", "residual_split", "weighted_source"]
