"""What every rule reads: the graph index, each Q/DQ node parsed once, graph walks, the rule registry.

A rule is a function ``(Ctx) -> Iterable[Finding]`` registered with :func:`rule`, which names every
finding id it may emit; :data:`RULES` keeps them in checklist order (the number in the first id).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto as TP

from trtquant.graph import ops
from trtquant.graph.index import GraphIndex, Shape, is_default_domain, names_of
from trtquant.graph.onnx_dag import OnnxDag

from .report import Finding, Target

__all__ = ["BIASED", "Ctx", "FP8", "HALF", "INT4", "QDQ", "RULES", "RULE_IDS", "Rule", "collect_qdq", "consumers_of",
           "dtype_name", "fmt", "param_diffs", "rule", "rule_ids", "same", "walk_back"]

HALF = frozenset({TP.FLOAT16, TP.BFLOAT16})
FP8 = frozenset({TP.FLOAT8E4M3FN, TP.FLOAT8E4M3FNUZ, TP.FLOAT8E5M2, TP.FLOAT8E5M2FNUZ})
INT4 = frozenset({TP.INT4, TP.UINT4})
#: Layers whose input 2 is a bias.
BIASED = ops.WEIGHTED - {"MatMul"}
#: The ONNX spellings of :data:`ops.AFFINE` (with exactly one constant operand: bias add, scale).
_AFFINE_SPELLINGS = frozenset({"Add", "Sub", "Mul", "Div"})


# --- parsed Q/DQ nodes and the rule context -------------------------------------------------
@dataclass
class QDQ:
    """A default-domain QuantizeLinear/DequantizeLinear node with its parameters resolved."""

    idx: int
    node: onnx.NodeProto
    scale: np.ndarray | None  # None: not a constant
    scale_shape: Shape | None
    zp: np.ndarray | None
    axis: int | None  # the explicit attribute only
    block_size: int
    qdtype: int | None  # quantized dtype: Q output / DQ input
    fdtype: int | None  # float dtype: Q input / scale
    shape: Shape | None  # shape of the data input
    partner: int | None = None  # for a DQ fed by a Q: that Q's index
    merged_into: int | None = None  # a DQ identical to its Q is reported together with it
    members: tuple[int, ...] = ()  # node indices reported together: this node + merged DQs
    names: tuple[str, ...] = ()

    @property
    def is_q(self) -> bool:
        return self.node.op_type == ops.Q

    @property
    def x(self) -> str:
        return self.node.input[0] if self.node.input else ""

    @property
    def y(self) -> str:
        return self.node.output[0] if self.node.output else ""

    @property
    def scale_name(self) -> str:
        return self.node.input[1] if len(self.node.input) > 1 else ""

    @property
    def zp_name(self) -> str:
        return self.node.input[2] if len(self.node.input) > 2 else ""

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def granularity(self) -> Literal["tensor", "channel", "block"] | None:
        ss = self.scale_shape
        if self.block_size or (ss is not None and len(ss) >= 2):
            return "block"
        if ss is None:
            return None
        return "tensor" if len(ss) == 0 or ss == (1,) else "channel"


@dataclass
class Ctx:
    """The graph as the rules see it (built once per :func:`check_onnx` call)."""

    g: GraphIndex
    target: Target
    strongly_typed: bool | None
    qdq: dict[int, QDQ]
    units: list[QDQ]  # Q/DQ nodes to check once: a DQ identical to its Q is folded into the Q
    dtypes: frozenset[int] = frozenset()  # every element type in the graph
    shapes_ok: bool = True  # checker and strict shape inference passed
    _dag: OnnxDag | None = None

    @property
    def dag(self) -> OnnxDag:
        """The graph as the shared structural rules see it (:mod:`trtquant.graph.dag`)."""
        if self._dag is None:
            self._dag = OnnxDag(self.g)
        return self._dag

    @property
    def half(self) -> bool:
        """The graph has float16/bfloat16 tensors (an FP16 export)."""
        return bool(self.dtypes & HALF)

    def _members(self, idx: int) -> tuple[int, ...]:
        q = self.qdq.get(idx)
        if q is None:
            return (idx,)
        return self.qdq[q.merged_into].members if q.merged_into is not None else q.members

    def names(self, idx: int) -> tuple[str, ...]:
        return names_of(self.g, self._members(idx))

    def desc(self, idx: int) -> str:
        """``QuantizeLinear/DequantizeLinear 'q', 'dq'``: the node(s) reported for ``idx``."""
        members = self._members(idx)
        op_types = "/".join(dict.fromkeys(self.g.nodes[i].op_type for i in members))
        return f"{op_types} {', '.join(repr(self.g.names[i]) for i in members)}"

    def dq_of(self, tensor: str) -> QDQ | None:
        """The DequantizeLinear behind ``tensor``, looking through Identity/Cast/Transpose/Reshape/...."""
        for _ in range(16):
            idx = self.g.producer.get(tensor)
            if idx is None or not is_default_domain(node := self.g.nodes[idx]):
                return None
            if node.op_type == ops.DQ:
                return self.qdq.get(idx)
            if node.op_type not in ops.PASSTHROUGH:
                return None
            tensor = node.input[0]
        return None

    def behind_dq(self, tensor: str) -> bool:
        return self.dq_of(tensor) is not None

    def uses(self, tensor: str, axis: int | None = None, depth: int = 0
             ) -> Iterator[tuple[int, int, onnx.NodeProto, int | None]]:
        """Consumers of ``tensor`` past Identity/Cast/Transpose/...: (index, slot, node, ``axis`` mapped).

        ``axis`` follows Transpose permutations; a reshaping op maps it to None.
        """
        for idx, slot, node in self.g.consumer_nodes(tensor):
            if node.op_type in ops.PASSTHROUGH and is_default_domain(node) and slot == 0 and depth < 16:
                if node.op_type == "Transpose" and axis is not None:
                    perm = self.g.attr(node, "perm")
                    out_axis: int | None = list(perm).index(axis) if perm else None
                else:
                    out_axis = axis if node.op_type in ("Identity", "Cast") else None
                yield from self.uses(node.output[0], out_axis, depth + 1)
            else:
                yield idx, slot, node, axis

    def quantized_weighted(self, idx: int) -> bool:
        node = self.g.nodes[idx]
        return len(node.input) > 1 and self.behind_dq(node.input[0]) and self.behind_dq(node.input[1])

    def weighted(self) -> Iterator[tuple[int, onnx.NodeProto]]:
        for i, node in enumerate(self.g.nodes):
            if node.op_type in ops.WEIGHTED and is_default_domain(node):
                yield i, node

    def root(self, q: QDQ) -> str:
        """The float tensor a Q/DQ quantizes (for a DQ fed by a Q: the Q's input)."""
        return self.qdq[q.partner].x if q.partner is not None else q.x


# --- the registry ----------------------------------------------------------------------------
Rule = Callable[[Ctx], Iterable[Finding]]
#: The rules, in checklist order; register with :func:`rule`.
RULES: list[Rule] = []
#: Every finding id a registered rule declares, in :data:`RULES` order.
RULE_IDS: list[str] = []
_IDS: dict[Rule, tuple[str, ...]] = {}
_ID = re.compile(r"[A-E](\d+)-[a-z0-9-]+")


def rule(*ids: str) -> Callable[[Rule], Rule]:
    """Register a rule that emits the finding ids ``ids`` (``<checklist number>-<slug>``, e.g. ``B9-scale-rank``).

    The rule's place in :data:`RULES` is the checklist number of its first id, so order does not
    depend on which module is imported first; rules of one number keep their registration order.
    """
    bad = [i for i in ids if not _ID.fullmatch(i)]
    if not ids or bad:
        raise ValueError(f"a rule declares ids like 'B9-scale-rank', got {ids!r}")

    def register(fn: Rule) -> Rule:
        _IDS[fn] = ids
        RULES.append(fn)
        RULES.sort(key=lambda r: _number(_IDS[r][0]) if r in _IDS else 99)
        RULE_IDS[:] = list(dict.fromkeys(i for r in RULES for i in _IDS.get(r, ())))
        return fn

    return register


def rule_ids(fn: Rule) -> tuple[str, ...]:
    """The finding ids ``fn`` declared (empty for a rule appended to :data:`RULES` by hand)."""
    return _IDS.get(fn, ())


def _number(rule_id: str) -> int:
    m = _ID.fullmatch(rule_id)
    assert m is not None
    return int(m.group(1))


# --- message helpers -------------------------------------------------------------------------
def dtype_name(dtype: int | None) -> str:
    if dtype is None:
        return "unknown"
    try:
        return onnx.helper.tensor_dtype_to_string(dtype).removeprefix("TensorProto.").lower()
    except Exception:
        return f"dtype {dtype}"


def fmt(values: np.ndarray | None, k: int = 4) -> str:
    if values is None:
        return "non-constant"
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    shown = ", ".join(f"{v:.6g}" for v in flat[:k])
    if values.ndim == 0:
        return shown
    return f"[{shown}, ...] ({flat.size} values)" if flat.size > k else f"[{shown}]"


def same(a: np.ndarray | None, b: np.ndarray | None, none_is_zero: bool = False) -> bool:
    if a is None and b is None:
        return True
    if a is None or b is None:
        other = b if a is None else a
        return none_is_zero and bool(np.all(np.asarray(other, dtype=np.float64) == 0))
    return a.shape == b.shape and bool(np.array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                                      equal_nan=True))


# --- Q/DQ collection -------------------------------------------------------------------------
def param_diffs(q: QDQ, dq: QDQ) -> list[str]:
    """How a DequantizeLinear's parameters differ from the QuantizeLinear feeding it."""
    diffs = []
    if not (same(q.scale, dq.scale) if q.scale is not None or dq.scale is not None
            else q.scale_name == dq.scale_name):
        diffs.append(f"scale {fmt(q.scale)} vs {fmt(dq.scale)}")
    if not same(q.zp, dq.zp, none_is_zero=True):
        diffs.append(f"zero point {fmt(q.zp)} vs {fmt(dq.zp)}")
    axes = [1 if a is None else a for a in (q.axis, dq.axis)]  # ONNX default axis 1
    if "tensor" not in (q.granularity, dq.granularity) and axes[0] != axes[1]:
        diffs.append(f"axis {q.axis} vs {dq.axis}")
    if q.block_size != dq.block_size:
        diffs.append(f"block_size {q.block_size} vs {dq.block_size}")
    return diffs


def collect_qdq(g: GraphIndex) -> dict[int, QDQ]:
    """Every default-domain Q/DQ node by index; a DQ identical to the Q feeding it is merged into it."""
    out: dict[int, QDQ] = {}
    for i, node in enumerate(g.nodes):
        if node.op_type not in ops.QDQ or not is_default_domain(node):
            continue
        x = node.input[0] if node.input else ""
        scale_name = node.input[1] if len(node.input) > 1 else ""
        zp_name = node.input[2] if len(node.input) > 2 else ""
        scale = g.const(scale_name)
        is_q = node.op_type == ops.Q
        if is_q:
            qdtype = g.attr(node, "output_dtype", 0) or (g.dtype(zp_name) if zp_name else TP.UINT8)
            fdtype = g.dtype(x)
        else:
            qdtype, fdtype = g.dtype(x), g.dtype(scale_name)
        partner = g.producer.get(x) if not is_q and g.op_of(x) == ops.Q else None
        if qdtype is None and partner is not None and partner in out:
            qdtype = out[partner].qdtype
        out[i] = QDQ(i, node, scale, tuple(scale.shape) if scale is not None else g.shape(scale_name),
                     g.const(zp_name) if zp_name else None, g.attr(node, "axis"), g.attr(node, "block_size", 0),
                     qdtype, fdtype, g.shape(x), partner, members=(i,))
    for q in out.values():
        if q.partner is not None and q.partner in out and not param_diffs(out[q.partner], q):
            head = out[q.partner]
            q.merged_into = head.idx
            head.members = (*head.members, q.idx)
    for q in out.values():
        q.names = names_of(g, q.members)
    return out


# --- graph walks -----------------------------------------------------------------------------
def walk_back(ctx: Ctx, tensor: str, through: frozenset[str], targets: frozenset[str],
              skip_qdq: bool = False) -> int | None:
    """Index of the first ``targets`` node above ``tensor``, passing only ``through`` ops.

    :data:`ops.AFFINE` in ``through`` passes Add/Sub/Mul/Div with exactly one constant operand
    (bias add, scale); Q/DQ are passed when ``skip_qdq``.
    """
    g = ctx.g
    for _ in range(64):
        idx = g.producer.get(tensor)
        if idx is None or not is_default_domain(g.nodes[idx]):
            return None
        node = g.nodes[idx]
        if node.op_type in targets:
            return idx
        if (skip_qdq and node.op_type in ops.QDQ) or node.op_type in through:
            tensor = node.input[0]
        elif ops.AFFINE in through and node.op_type in _AFFINE_SPELLINGS and len(node.input) == 2:
            const = [g.is_const_rooted(t) for t in node.input]
            if const.count(True) != 1:
                return None
            tensor = node.input[const.index(False)]
        else:
            return None
    return None


def consumers_of(ctx: Ctx, tensor: str, op_types: frozenset[str] | None = None) -> list[int]:
    return [i for i, _, n in ctx.g.consumer_nodes(tensor) if op_types is None or n.op_type in op_types]
