"""Whole-graph walks behind :class:`trtquant.graph.index.GraphIndex`: topological order, names in use,
every tensor of a graph (subgraphs included), constant-node values."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper

if TYPE_CHECKING:
    from .index import GraphIndex

__all__ = ["all_tensors", "constant_node_value", "taken_names", "topo_passes"]


def topo_passes(g: GraphIndex) -> list[int]:
    """Live node indices of ``g`` in the order of repeated in-order passes (see ``GraphIndex.topo_order``).

    Computed in one sweep: pass(n) = max(1, pass(p) + [p comes after n]) over the producers p of
    n's inputs, and the order is (pass, index).
    """
    graph = g.model.graph
    available = {i.name for i in graph.input} | set(g.initializers) | {""}
    live = [i for i, _ in g.live_nodes()]
    deps: dict[int, set[int]] = {}
    users: dict[int, list[int]] = {i: [] for i in live}
    blocked: set[int] = set()  # reads a tensor nothing produces
    for i in live:
        ds = set()
        for name in g.nodes[i].input:
            if name in available:
                continue
            p = g.producer.get(name)
            if p is None:
                blocked.add(i)
            else:
                ds.add(p)
        deps[i] = ds
        for p in ds:
            users[p].append(i)
    missing = {i: len(ds) for i, ds in deps.items()}
    level: dict[int, int] = {}
    ready = [i for i in live if not missing[i] and i not in blocked]
    while ready:
        i = ready.pop()
        level[i] = max([1] + [level[p] + (p > i) for p in deps[i]])
        for u in users[i]:
            missing[u] -= 1
            if not missing[u] and u not in blocked:
                ready.append(u)
    if len(level) != len(live):
        n = g.nodes[next(i for i in live if i not in level)]
        raise ValueError(f"graph has a cycle or a missing input near {n.op_type} '{n.name}'")
    return sorted(live, key=lambda i: (level[i], i))


def taken_names(g: GraphIndex) -> set[str]:
    """Every tensor and node name of the top-level graph (to pick fresh names against)."""
    graph = g.model.graph
    names = set(g.initializers) | set(g.types) | {i.name for i in graph.input} | set(g.outputs)
    for node in g.nodes:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    names.discard("")
    return names


def all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a graph: initializers (dense and sparse), node attributes, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from all_tensors(attr.g)
            for sub in attr.graphs:
                yield from all_tensors(sub)


def constant_node_value(node: onnx.NodeProto, base_dir: str = "") -> np.ndarray | None:
    """Value of a ``Constant`` node (None for sparse and string values: not needed by the checks)."""
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t, base_dir)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None
