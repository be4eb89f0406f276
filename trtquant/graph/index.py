"""The one ONNX graph model: an index over ``model.graph`` for readers, and a mutable mode for rewrites.

`GraphIndex` answers the questions graph rules keep asking: who produces a tensor, who consumes
it, is it a constant (initializer, `Constant` node, or a constant seen through
Identity/Cast/Transpose/Reshape/Unsqueeze/Squeeze/Flatten), what are its dtype and shape, and in
which order the nodes can run. Only the top-level graph is indexed; subgraphs (If/Loop bodies) are
not looked into.

Rewrites (the ONNX Runtime graph, the export passes) use the same index: :meth:`GraphIndex.add_node`,
:meth:`~GraphIndex.remove_node`, :meth:`~GraphIndex.set_input`, :meth:`~GraphIndex.replace_uses`
and :meth:`~GraphIndex.add_initializer` keep the producer/consumer maps right incrementally; node
indices stay stable until :meth:`~GraphIndex.commit` (or :meth:`~GraphIndex.toposort_`) writes the
live nodes back to the ModelProto, which stays the single source of truth. Initializers and graph
output renames are written to the proto at once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from itertools import chain
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .ops import PASSTHROUGH as PASSTHROUGH_OPS
from .ops import QDQ
from .walk import constant_node_value, taken_names, topo_passes

__all__ = ["GraphIndex", "Dim", "Shape", "is_default_domain", "names_of"]

Dim = int | None  # None: symbolic or unknown
Shape = tuple[Dim, ...]



def is_default_domain(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


class GraphIndex:
    """Producer/consumer maps, constants, types and order of ``model.graph``; mutable for rewrites.

    Args:
        model: the model, ideally after shape inference so that ``value_info`` is filled in.
        base_dir: directory that external-data paths are relative to (only needed when the
            model's external data was not loaded with it).
        name_tag: infix of the names :meth:`fresh` makes.
    """

    def __init__(self, model: onnx.ModelProto, base_dir: str = "", *, name_tag: str = "__tq") -> None:
        graph = model.graph
        self.model = model
        self.base_dir = base_dir
        self.name_tag = name_tag  # fresh names are f"{hint}{name_tag}{counter}"
        self.opsets: dict[str, int] = {o.domain: o.version for o in model.opset_import}
        self.opset: int | None = self.opsets.get("", self.opsets.get("ai.onnx"))
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.inputs: list[str] = [i.name for i in graph.input if i.name not in self.initializers]
        self.outputs: list[str] = [o.name for o in graph.output]
        self.types: dict[str, onnx.TypeProto] = {
            vi.name: vi.type for vi in chain(graph.value_info, graph.input, graph.output)
        }
        self._uid = 0
        self._taken: set[str] | None = None  # every name in use, built on the first fresh()
        self._index_nodes()

    def _index_nodes(self) -> None:
        """(Re)build the node list and producer/consumer maps from ``model.graph.node``."""
        self.nodes: list[onnx.NodeProto] = list(self.model.graph.node)
        self.names: list[str] = [n.name or f"{n.op_type}#{i}" for i, n in enumerate(self.nodes)]
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for i, node in enumerate(self.nodes):
            self._link(i, node)
        self.removed: set[int] = set()  # node indices removed since the last commit
        self._edited = False
        self._const: dict[str, np.ndarray | None] = {}

    def _link(self, i: int, node: onnx.NodeProto) -> None:
        for slot, name in enumerate(node.input):
            if name:
                self.consumers[name].append((i, slot))
        for name in node.output:
            if name:
                self.producer[name] = i

    # --- structure -------------------------------------------------------------------------
    def producer_of(self, tensor: str) -> onnx.NodeProto | None:
        idx = self.producer.get(tensor)
        return None if idx is None else self.nodes[idx]

    def op_of(self, tensor: str) -> str | None:
        """Op type of the default-domain node producing ``tensor`` (None for graph inputs/constants)."""
        node = self.producer_of(tensor)
        return node.op_type if node is not None and is_default_domain(node) else None

    def consumer_nodes(self, tensor: str) -> Iterator[tuple[int, int, onnx.NodeProto]]:
        """(node index, input slot, node) for every consumer of ``tensor``."""
        for idx, slot in self.consumers.get(tensor, ()):
            yield idx, slot, self.nodes[idx]

    @staticmethod
    def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    @staticmethod
    def has_attr(node: onnx.NodeProto, name: str) -> bool:
        return any(a.name == name for a in node.attribute)

    def is_graph_output(self, tensor: str) -> bool:
        return tensor in self.outputs

    def live_nodes(self) -> Iterator[tuple[int, onnx.NodeProto]]:
        """(index, node) of every node not removed since the last commit, in index order."""
        for i, node in enumerate(self.nodes):
            if i not in self.removed:
                yield i, node

    # --- order -----------------------------------------------------------------------------
    def topo_order(self) -> list[int]:
        """Live node indices in topological order: repeated passes over the nodes, each taking (in index
        order) every node whose inputs are available. ValueError for a cycle or an unproduced input."""
        return topo_passes(self)

    def toposort_(self) -> None:
        """Write the live nodes back to the model in :meth:`topo_order` (renumbers the nodes)."""
        self.commit(order=self.topo_order())

    # --- mutable mode ----------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        """A tensor/node name used nowhere in the graph yet: ``{hint}{name_tag}{n}``."""
        if self._taken is None:
            self._taken = taken_names(self)
        while True:
            self._uid += 1
            name = f"{hint}{self.name_tag}{self._uid}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def add_initializer(self, value: np.ndarray | onnx.TensorProto, hint: str = "const", name: str | None = None) -> str:
        """Append an initializer (a fresh name from ``hint`` unless ``name`` is given); returns its name."""
        name = name or self.fresh(hint)
        if isinstance(value, onnx.TensorProto):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = name
        else:
            tensor = numpy_helper.from_array(np.asarray(value), name)
        self.model.graph.initializer.append(tensor)
        self.initializers[name] = self.model.graph.initializer[-1]
        if self._taken is not None:
            self._taken.add(name)
        self._const.pop(name, None)
        return name

    def remove_initializer(self, name: str) -> None:
        tensor = self.initializers.pop(name)
        self.model.graph.initializer.remove(tensor)
        self._const.clear()

    def add_node(self, node: onnx.NodeProto) -> int:
        """Add ``node`` (written to the model at :meth:`commit`, after the nodes before it); returns its index."""
        i = len(self.nodes)
        self.nodes.append(node)
        self.names.append(node.name or f"{node.op_type}#{i}")
        self._link(i, node)
        if self._taken is not None:
            self._taken.update(node.output)
            self._taken.add(node.name)
        self._edited = True
        self._const.clear()
        return i

    def remove_node(self, i: int) -> None:
        if i in self.removed:
            return
        node = self.nodes[i]
        for name in node.output:
            if self.producer.get(name) == i:
                del self.producer[name]
        for slot, name in enumerate(node.input):
            if name:
                self._unuse(name, i, slot)
        self.removed.add(i)
        self._edited = True
        self._const.clear()

    def set_input(self, i: int, slot: int, tensor: str) -> None:
        """Make input ``slot`` of node ``i`` read ``tensor`` ("" for none), padding skipped slots with ""."""
        node = self.nodes[i]
        while len(node.input) <= slot:
            node.input.append("")
        if node.input[slot]:
            self._unuse(node.input[slot], i, slot)
        node.input[slot] = tensor
        if tensor:
            self.consumers[tensor].append((i, slot))
        self._edited = True
        self._const.clear()

    def replace_uses(self, old: str, new: str, graph_outputs: bool = False) -> int:
        """Every node input reading ``old`` reads ``new``; with ``graph_outputs``, graph outputs named
        ``old`` are renamed too. Returns the number of inputs changed."""
        uses = self.consumers.pop(old, [])
        for i, slot in uses:
            self.nodes[i].input[slot] = new
            self.consumers[new].append((i, slot))
        if graph_outputs and old in self.outputs:
            for o in self.model.graph.output:
                if o.name == old:
                    o.name = new
            self.outputs = [new if o == old else o for o in self.outputs]
        if uses:
            self._edited = True
            self._const.clear()
        return len(uses)

    def commit(self, order: Sequence[int] | None = None) -> None:
        """Write the live nodes (in index order, or ``order``) back to ``model.graph.node`` and reindex."""
        if not self._edited and order is None:
            return
        keep = [self.nodes[i] for i in order] if order is not None else [n for _, n in self.live_nodes()]
        graph = self.model.graph
        del graph.node[:]
        graph.node.extend(keep)
        self._index_nodes()

    def _unuse(self, tensor: str, i: int, slot: int) -> None:
        uses = self.consumers.get(tensor)
        if uses is not None:
            uses.remove((i, slot))
            if not uses:
                del self.consumers[tensor]

    # --- constants -------------------------------------------------------------------------
    def const(self, tensor: str) -> np.ndarray | None:
        """Value of a constant tensor, or None if it is not a (resolvable) constant."""
        if not tensor:
            return None
        if tensor not in self._const:
            self._const[tensor] = None  # guards against cycles in malformed graphs
            try:
                self._const[tensor] = self._resolve(tensor)
            except Exception:  # malformed constant, unsupported dtype, missing external file
                self._const[tensor] = None
        return self._const[tensor]

    def _resolve(self, tensor: str) -> np.ndarray | None:
        if tensor in self.initializers:
            return numpy_helper.to_array(self.initializers[tensor], self.base_dir)
        node = self.producer_of(tensor)
        if node is None or not is_default_domain(node):
            return None
        op = node.op_type
        if op == "Constant":
            return constant_node_value(node, self.base_dir)
        if op not in PASSTHROUGH_OPS:
            return None
        x = self.const(node.input[0])
        if x is None:
            return None
        if op == "Identity":
            return x
        if op == "Cast":
            return x.astype(helper.tensor_dtype_to_np_dtype(self.attr(node, "to")))
        if op == "Transpose":
            return np.transpose(x, self.attr(node, "perm"))
        if op == "Flatten":
            axis = self.attr(node, "axis", 1)
            axis = axis + x.ndim if axis < 0 else axis
            return x.reshape(int(np.prod(x.shape[:axis])), -1)
        if op == "Reshape":
            shape = self.const(node.input[1]) if len(node.input) > 1 else None
            if shape is None:
                return None
            dims = [int(d) for d in shape]
            if not self.attr(node, "allowzero", 0):
                dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
            return x.reshape(dims)
        # Unsqueeze / Squeeze: axes is an attribute before opset 13, an input from 13 on.
        axes = self.attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes_value = self.const(node.input[1])
            if axes_value is None:
                return None
            axes = [int(a) for a in axes_value.reshape(-1)]
        if op == "Squeeze":
            return np.squeeze(x, axis=None if axes is None else tuple(axes))
        out_rank = x.ndim + len(axes or ())
        return np.expand_dims(x, tuple(sorted(a % out_rank for a in axes or ())))

    def is_const_rooted(self, tensor: str, _depth: int = 0) -> bool:
        """True when ``tensor`` derives only from constants through passthrough ops or Q/DQ.

        This is the TensorRT notion of a weight: an ``IConstantLayer`` possibly followed by layers
        the parser folds. Ops with no inputs (Constant, ConstantOfShape-like) count as constant.
        """
        if not tensor:
            return False
        if tensor in self.initializers or self._const.get(tensor) is not None:
            return True
        node = self.producer_of(tensor)
        if node is None or _depth > 64:
            return False
        if node.op_type == "Constant" or not any(node.input):
            return True
        if is_default_domain(node) and node.op_type in PASSTHROUGH_OPS | QDQ:
            return self.is_const_rooted(node.input[0], _depth + 1)
        return False

    def is_foldable(self, tensor: str) -> bool:
        """True when ``tensor`` is computed from constants only (constant folding would remove it)."""
        seen: dict[str, bool] = {}
        stack = [tensor]
        while stack:  # iterative post-order: deep graphs must not hit the recursion limit
            t = stack[-1]
            if t in seen:
                stack.pop()
                continue
            node = self.producer_of(t)
            if t in self.initializers or (node is not None and not any(node.input)):
                seen[t] = True
            elif node is None or node.op_type.startswith("Random"):
                seen[t] = False
            else:
                todo = [i for i in node.input if i and i not in seen]
                if todo:
                    stack.extend(todo)
                    continue
                seen[t] = all(seen[i] for i in node.input if i)
            stack.pop()
        return seen[tensor]

    # --- types -----------------------------------------------------------------------------
    def dtype(self, tensor: str) -> int | None:
        """ONNX ``TensorProto`` element type of ``tensor``, None if unknown."""
        if tensor in self.initializers:
            return self.initializers[tensor].data_type or None
        node = self.producer_of(tensor)
        if node is not None and node.op_type == "Constant" and is_default_domain(node):
            for a in node.attribute:
                if a.name == "value":
                    return a.t.data_type or None
                if a.name.startswith("value_float"):
                    return onnx.TensorProto.FLOAT
                if a.name.startswith("value_int"):
                    return onnx.TensorProto.INT64
        t = self.types.get(tensor)
        if t is not None and t.HasField("tensor_type"):
            return t.tensor_type.elem_type or None
        return None

    def shape(self, tensor: str) -> Shape | None:
        """Shape of ``tensor`` (None for an unknown rank; None entries for symbolic dims)."""
        if tensor in self.initializers:
            return tuple(int(d) for d in self.initializers[tensor].dims)
        value = self._const.get(tensor)
        if value is not None:
            return tuple(value.shape)
        node = self.producer_of(tensor)
        if node is not None and node.op_type == "Constant" and is_default_domain(node):
            value = self.const(tensor)
            return None if value is None else tuple(value.shape)
        t = self.types.get(tensor)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        return tuple(d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim)

    def rank(self, tensor: str) -> int | None:
        shape = self.shape(tensor)
        return None if shape is None else len(shape)

    def all_dtypes(self) -> set[int]:
        """Every element type declared anywhere in the top-level graph (including Cast targets)."""
        types = {t.data_type for t in self.initializers.values()}
        types |= {t.tensor_type.elem_type for t in self.types.values() if t.HasField("tensor_type")}
        for node in self.nodes:
            if node.op_type == "Cast":
                types.add(self.attr(node, "to", 0))
            elif node.op_type == "Constant":
                dt = self.dtype(node.output[0])
                if dt:
                    types.add(dt)
        types.discard(0)
        return types


def names_of(index: GraphIndex, idxs: Sequence[int]) -> tuple[str, ...]:
    """Node names for node indices, in order, without duplicates."""
    return tuple(dict.fromkeys(index.names[i] for i in idxs))
