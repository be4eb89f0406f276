"""Structural rules written once, over an abstract DAG.

Placement decides on a torch.fx graph, the checker, the ONNX Runtime graph and the parity helpers on
an ONNX graph; each adapts its graph to :class:`Dag` (``trtquant.placement.fx_dag.FxDag``,
:class:`trtquant.graph.onnx_dag.OnnxDag`) and calls the rules here, so they cannot disagree.

A :class:`Dag` node has a canonical op (an ONNX op name from :mod:`trtquant.graph.ops`, "" for a graph
input), its data inputs (constants left out, quantizers - Q/DQ pairs or TensorQuantizer calls - looked
through), and a topological position used for deterministic tie-breaks.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, Optional, Protocol, TypeVar

from . import ops

N = TypeVar("N", bound=Hashable)
Q = TypeVar("Q", covariant=True)

#: How far back a rule walks (nodes); a residual block's branch is a handful of nodes.
MAX_DEPTH = 128


class Dag(Protocol[N]):
    """What a structural rule needs to know about a graph."""

    def op(self, n: N) -> str:
        """Canonical op of ``n`` (ONNX op name or a virtual op of :mod:`.ops`); "" for a graph input."""

    def inputs(self, n: N) -> Sequence[N]:
        """Non-constant data inputs of ``n`` in slot order, quantizers looked through."""

    def order(self, n: N) -> int:
        """Topological position of ``n`` (graph inputs: -1)."""


def weighted_source(dag: Dag[N], n: N, sources: frozenset[str] = ops.RESIDUAL_SOURCES,
                    through: frozenset[str] = ops.CONV_EPILOGUE) -> Optional[N]:
    """The weighted layer ``n`` comes from through its epilogue only (BN, activations, bias, scale)."""
    for _ in range(MAX_DEPTH):
        op = dag.op(n)
        if op in sources:
            return n
        ins = dag.inputs(n)
        if op not in through or len(ins) != 1:
            return None
        n = ins[0]
    return None


def ancestor_depths(dag: Dag[N], n: N, limit: int = MAX_DEPTH) -> dict[N, int]:
    """Shortest number of edges from ``n`` back to each of its ancestors (``n`` itself: 0)."""
    depth = {n: 0}
    frontier = [n]
    for d in range(1, limit):
        nxt = []
        for x in frontier:
            for a in dag.inputs(x):
                if a not in depth:
                    depth[a] = d
                    nxt.append(a)
        if not nxt:
            break
        frontier = nxt
    return depth


@dataclass(frozen=True)
class ResidualSplit(Generic[N]):
    """A residual Add: which input is the identity (skip) and which the weighted branch."""

    identity: int  # input slot of the identity
    branch: int  # input slot of the branch
    source: N  # the weighted layer the branch comes from


def residual_split(dag: Dag[N], add: N) -> Optional[ResidualSplit[N]]:
    """Which input of ``add`` is the residual identity, or None when ``add`` is not a residual Add.

    The rule (ModelOpt's non-residual-input map, trtquant's placement): an input that reaches a
    weighted layer through its epilogue only is a branch. With one branch, the other input is the
    identity - unless the branch input or its layer is itself the lowest common ancestor of both
    inputs (then it feeds the other input: the block input, or ConvNeXt's downsampling conv). With two (a downsample
    conv on the skip path), the branch is the input with the longer path to the lowest common
    ancestor; the LCA is the common ancestor with the smallest (sum, max) of the two distances, then
    the latest in topological order; equal paths make input 1 the identity (``out += identity``).

    "Residual" means a Conv+Add fusion candidate: an Add whose branch reaches its layer through a
    permute or a Mul by a tensor (torchvision's ConvNeXt, SE-ResNet's SE-scaled branch end) is a plain
    elementwise layer to TensorRT and gets None (docs/graph-model.md, "Which Adds are residual").
    """
    ins = dag.inputs(add)
    if dag.op(add) != "Add" or len(ins) != 2 or ins[0] == ins[1]:
        return None
    a, b = ins
    src = (weighted_source(dag, a), weighted_source(dag, b))
    if src[0] is None and src[1] is None:
        return None
    da, db = ancestor_depths(dag, a), ancestor_depths(dag, b)
    common = da.keys() & db.keys()
    lca = min(common, key=lambda n: (da[n] + db[n], max(da[n], db[n]), -dag.order(n))) if common else None
    if src[0] is not None and src[1] is not None:
        if lca is None or src[0] == src[1]:
            return None
        branch = 0 if da[lca] >= db[lca] else 1
    else:
        branch = 0 if src[0] is not None else 1
        if lca is not None and lca in (ins[branch], src[branch]):
            # The sourced input is an ancestor of the other one (the block input, e.g. after a
            # StochasticDepth the walk cannot see through) or its layer feeds both inputs (ConvNeXt's
            # downsampling conv): it is not a branch of its own.
            return None
    source = src[branch]
    assert source is not None
    return ResidualSplit(identity=1 - branch, branch=branch, source=source)


class QuantizedDag(Dag[N], Protocol[N, Q]):
    """A :class:`Dag` that also says which quantizer reads each data input."""

    def input_quantizers(self, n: N) -> Sequence[Optional[Q]]:
        """Per data input of ``n`` (same order as :meth:`Dag.inputs`): its quantizer, or None."""


def concat_quantizer_groups(dag: QuantizedDag[N, Q], nodes: Iterable[N]) -> list[tuple[N, list[Optional[Q]]]]:
    """(Concat, the quantizer of each of its data inputs) for every Concat with a quantized input.

    TensorRT needs one scale for a concatenated INT8 tensor: placement makes these quantizers share
    amax, the checker reports a Concat whose inputs are mixed or have different scales.
    """
    out = []
    for n in nodes:
        if dag.op(n) != "Concat":
            continue
        qs = list(dag.input_quantizers(n))
        if len(qs) >= 2 and any(q is not None for q in qs):
            out.append((n, qs))
    return out


__all__ = ["Dag", "MAX_DEPTH", "QuantizedDag", "ResidualSplit", "ancestor_depths", "concat_quantizer_groups",
           "residual_split", "weighted_source"]
