"""An ONNX graph as a :class:`trtquant.graph.dag.Dag`: nodes are indices into ``GraphIndex.nodes``.

Graph inputs are ``"input:<name>"``. Constants (initializers, Constant nodes and what folds from
them) are not data inputs; Q/DQ nodes are looked through, so a graph reads the same before and
after quantizers are inserted. Two exporter spellings become one canonical op (:mod:`.ops`):
Add/Sub/Mul/Div with one constant operand is ``Affine``, ``x * f(x)`` with ``f`` elementwise on
``x`` alone (SiLU, GELU's erf form, HardSwish as x*HardSigmoid(x), Mish) is ``SelfGated``; a MatMul
with a constant operand is a Linear layer, reported as ``Gemm``.
"""

from __future__ import annotations

from typing import Optional, Union

from . import ops
from .index import GraphIndex, is_default_domain

Node = Union[int, str]

_ELEMENTWISE_BINARY = frozenset({"Add", "Sub", "Mul", "Div"})


class OnnxDag:
    """Adapter of a :class:`GraphIndex` to the structural rules (cached per node)."""

    def __init__(self, index: GraphIndex) -> None:
        self.g = index
        self._inputs: dict[Node, list[Node]] = {}
        self._quantizers: dict[Node, list[Optional[int]]] = {}
        self._op: dict[Node, str] = {}

    # --- Dag protocol ----------------------------------------------------------------------
    def op(self, n: Node) -> str:
        if isinstance(n, str):
            return ""
        if n not in self._op:
            self._op[n] = self._canonical(n)
        return self._op[n]

    def inputs(self, n: Node) -> list[Node]:
        if n not in self._inputs:
            self._resolve(n)
        return self._inputs[n]

    def order(self, n: Node) -> int:
        return n if isinstance(n, int) else -1

    def input_quantizers(self, n: Node) -> list[Optional[int]]:
        """Per data input: the index of the DequantizeLinear it is read through, or None.

        Identity/Reshape/Transpose/... between the DQ and ``n`` are looked through too: TensorRT moves
        Q/DQ across them, so the input is quantized all the same.
        """
        if n not in self._quantizers:
            self._resolve(n)
        return self._quantizers[n]

    def _dq_behind(self, tensor: str) -> Optional[int]:
        g = self.g
        for _ in range(16):
            idx = g.producer.get(tensor)
            if idx is None or not is_default_domain(g.nodes[idx]):
                return None
            op = g.nodes[idx].op_type
            if op == ops.DQ:
                return idx
            if op not in ops.PASSTHROUGH:
                return None
            tensor = g.nodes[idx].input[0]
        return None

    # --- helpers ---------------------------------------------------------------------------
    def source(self, tensor: str) -> tuple[Optional[Node], Optional[int]]:
        """(float producer of ``tensor`` with Q/DQ looked through, the first DQ passed); (None, None) for a constant."""
        g = self.g
        dq = None
        for _ in range(64):
            if not tensor or g.is_const_rooted(tensor):
                return None, None
            idx = g.producer.get(tensor)
            if idx is None:
                return f"input:{tensor}", dq
            node = g.nodes[idx]
            if node.op_type in ops.QDQ and is_default_domain(node):
                if node.op_type == ops.DQ and dq is None:
                    dq = idx
                tensor = node.input[0]
                continue
            return idx, dq
        return None, None

    def _data_tensors(self, idx: int) -> list[str]:
        node = self.g.nodes[idx]
        if self.op(idx) == ops.SELF_GATED:
            return [self._gated_input(idx) or node.input[0]]
        return [t for t in node.input if t and not self.g.is_const_rooted(t)]

    def data_tensors(self, n: Node) -> list[str]:
        """The tensor names of :meth:`inputs`, in the same order."""
        if isinstance(n, str):
            return []
        return [t for t in self._data_tensors(n) if self.source(t)[0] is not None]

    def _resolve(self, n: Node) -> None:
        ins: list[Node] = []
        qs: list[Optional[int]] = []
        for t in self.data_tensors(n):
            src, dq = self.source(t)
            assert src is not None
            ins.append(src)
            qs.append(dq if dq is not None else self._dq_behind(t))
        self._inputs[n], self._quantizers[n] = ins, qs

    def _canonical(self, idx: int) -> str:
        g = self.g
        node = g.nodes[idx]
        op = node.op_type
        if not is_default_domain(node):
            return f"{node.domain}.{op}"
        if op in _ELEMENTWISE_BINARY and len(node.input) == 2:
            const = [g.is_const_rooted(t) for t in node.input]
            if const.count(True) == 1:
                return ops.AFFINE
            if op == "Mul" and self._gated_input(idx) is not None:
                return ops.SELF_GATED
        if op == "MatMul" and len(node.input) == 2 and g.is_const_rooted(node.input[1]):
            return "Gemm"
        return op

    def _gated_input(self, idx: int) -> Optional[str]:
        """``x`` when node ``idx`` is ``Mul(x, f(x))`` with ``f`` built from gate functions and constants."""
        node = self.g.nodes[idx]
        for k in (0, 1):
            x, gate = node.input[k], node.input[1 - k]
            if x and gate and self._derives_elementwise(gate, x):
                return x
        return None

    def _derives_elementwise(self, tensor: str, x: str, depth: int = 0) -> bool:
        if depth > 8:
            return False
        g = self.g
        idx = g.producer.get(tensor)
        if idx is None:
            return False
        node = g.nodes[idx]
        data = [t for t in node.input if t and not g.is_const_rooted(t)]
        if len(data) != 1 or not is_default_domain(node):
            return False
        if node.op_type not in ops.GATE_FUNCTIONS and not (node.op_type in _ELEMENTWISE_BINARY and len(node.input) == 2):
            return False
        return data[0] == x or self._derives_elementwise(data[0], x, depth + 1)


__all__ = ["OnnxDag"]
