"""Read-only index over an ONNX graph for static checks.

`GraphIndex` answers the questions graph rules keep asking: who produces a tensor, who consumes
it, is it a constant (initializer, `Constant` node, or a constant seen through
Identity/Cast/Transpose/Reshape/Unsqueeze/Squeeze/Flatten), and what are its dtype and shape.
Only the top-level graph is indexed; subgraphs (If/Loop bodies) are not looked into.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from itertools import chain
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["GraphIndex", "PASSTHROUGH_OPS", "Dim", "Shape", "is_default_domain", "names_of"]

Dim = int | None  # None: symbolic or unknown
Shape = tuple[Dim, ...]

#: Ops that keep a tensor constant when their data input is constant (the TensorRT parser folds them).
PASSTHROUGH_OPS = frozenset({"Identity", "Cast", "Transpose", "Reshape", "Unsqueeze", "Squeeze", "Flatten"})


def is_default_domain(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


class GraphIndex:
    """Producer/consumer maps, constant values and type information of ``model.graph``.

    Args:
        model: the model, ideally after shape inference so that ``value_info`` is filled in.
        base_dir: directory that external-data paths are relative to (only needed when the
            model's external data was not loaded with it).
    """

    def __init__(self, model: onnx.ModelProto, base_dir: str = "") -> None:
        graph = model.graph
        self.model = model
        self.base_dir = base_dir
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.names: list[str] = [n.name or f"{n.op_type}#{i}" for i, n in enumerate(self.nodes)]
        self.opsets: dict[str, int] = {o.domain: o.version for o in model.opset_import}
        self.opset: int | None = self.opsets.get("", self.opsets.get("ai.onnx"))
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.inputs: list[str] = [i.name for i in graph.input if i.name not in self.initializers]
        self.outputs: list[str] = [o.name for o in graph.output]
        self.types: dict[str, onnx.TypeProto] = {
            vi.name: vi.type for vi in chain(graph.value_info, graph.input, graph.output)
        }
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for i, node in enumerate(self.nodes):
            for slot, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((i, slot))
            for name in node.output:
                if name:
                    self.producer[name] = i
        self._const: dict[str, np.ndarray | None] = {}

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
            return self._constant_node_value(node)
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

    def _constant_node_value(self, node: onnx.NodeProto) -> np.ndarray | None:
        for a in node.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t, self.base_dir)
            if a.name == "value_float":
                return np.array(a.f, dtype=np.float32)
            if a.name == "value_floats":
                return np.array(list(a.floats), dtype=np.float32)
            if a.name == "value_int":
                return np.array(a.i, dtype=np.int64)
            if a.name == "value_ints":
                return np.array(list(a.ints), dtype=np.int64)
        return None  # sparse_value / strings: not needed by the checks

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
        if is_default_domain(node) and node.op_type in PASSTHROUGH_OPS | {"QuantizeLinear", "DequantizeLinear"}:
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
