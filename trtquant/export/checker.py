"""Static TensorRT explicit-quantization checks for any Q/DQ ONNX model.

``check_onnx`` implements the static part (rules 1-26) of the validator checklist in
``shared/reference/tensorrt.md``: model-level rules (A1-A5), per-Q/DQ rules (B6-B16) and
placement/fusion rules (C17-C26). Numerics (D27-D29) and artifacts (E30-E31) need onnxruntime or a
GPU and live elsewhere.

Each rule is one function registered in :data:`RULES`, in checklist order; it receives a
:class:`_Ctx` (graph index, target, every Q/DQ node parsed once) and yields :class:`Finding` s.
Rule ids are ``<checklist number>-<slug>`` and stable, e.g. ``B8-zero-point``; ``A0-no-qdq`` is the
one id outside the checklist (a model without any Q/DQ node).

Nothing is assumed about node names or the exporter: scales, zero points and weights may be
initializers, ``Constant`` nodes, or constants seen through Identity/Cast/Transpose/Reshape/
Unsqueeze/Squeeze/Flatten; unnamed nodes are reported as ``<op_type>#<index>``.

Rule ids (E error, W warning, I info):
    A0-no-qdq I | A1-load, A1-onnx-checker, A1-shape-inference, A1-unknown-rank E, A1-too-large I |
    A2-opset E | A3-qoperator E | A4-trt-domain I | A5-fp32-graph W (strongly typed) / I (unknown) |
    B6-dtype E | B7-scale E/W | B8-zero-point E | B9-scale-rank E/W | B10-per-channel-activation E |
    B11-axis E | B12-channel-axis E (W: grouped ConvTranspose) | B13-scalar E | B14-int4 E |
    B15-qdq-pairing W | B16-double-qdq W | C17-partial-quant W | C18-output-qdq W | C19-conv-act-qdq W |
    C20-residual-add W | C21-concat W | C22-redundant-qdq, C22-fusible, C22-float-island I |
    C23-small-channel-conv W | C24-gemv W | C25-quantized-bias W (E: int32) | C26-dla E/I (target dla)
"""

from __future__ import annotations

import os
import re
import textwrap
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import onnx
from onnx import TensorProto as TP

from trtquant.export.graph import PASSTHROUGH_OPS, GraphIndex, Shape, is_default_domain, names_of

__all__ = ["CheckReport", "Finding", "RULES", "Severity", "Target", "check_onnx"]

Severity = Literal["error", "warning", "info"]
Target = Literal["trt10", "trt11", "dla"]

#: Highest default-domain opset per target (TensorRT 10.0 parses 9-20; later limits unconfirmed).
MAX_OPSET: dict[str, int] = {"trt10": 20, "trt11": 20, "dla": 20}
#: Rule-id prefixes whose warnings mean lost INT8 fusion (``CheckReport.fusion_ok``).
FUSION_RULE_PREFIXES = ("B15-", "B16-", "C")

_PROTO_LIMIT = 2**31 - 1
_TINY_SCALE = 2.0**-24 * 127
_FP16_MIN_NORMAL = 2.0**-14
_DLA_MAX_BATCH, _DLA_MAX_DIM = 4096, 8192

_Q, _DQ = "QuantizeLinear", "DequantizeLinear"
_QDQ_OPS = frozenset({_Q, _DQ})
_WEIGHTED = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_FLOAT_IN = frozenset({TP.FLOAT, TP.FLOAT16, TP.BFLOAT16})
_QUANT_OK = frozenset({TP.INT8, TP.FLOAT8E4M3FN, TP.INT4, TP.FLOAT4E2M1})
_INT4 = frozenset({TP.INT4, TP.UINT4})
_HALF = frozenset({TP.FLOAT16, TP.BFLOAT16})
_FP8 = frozenset({TP.FLOAT8E4M3FN, TP.FLOAT8E4M3FNUZ, TP.FLOAT8E5M2, TP.FLOAT8E5M2FNUZ})
_QOPERATOR = frozenset({"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"})
_MS_QOPERATOR = frozenset({"QGemm", "QAttention", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                           "DynamicQuantizeLSTM", "QEmbedLayerNormalization", _Q, _DQ})
_ACTIVATIONS = frozenset({"BatchNormalization", "Relu", "LeakyRelu", "Clip", "PRelu"})
_EPILOGUE = frozenset({"BatchNormalization", "Identity", "Add", "Mul"})  # Add/Mul: with a constant operand
_BACKBONE_PATH = _EPILOGUE | {"Relu"}
_OUTPUT_PATH = _BACKBONE_PATH | {"LeakyRelu", "Clip"}
_QUANTIZABLE = _WEIGHTED | {"AveragePool", "GlobalAveragePool", "Add", _Q}
_COMMUTING = frozenset({"MaxPool", "Relu", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Pad",
                        "Slice", "Identity"})
_FUSIBLE = frozenset({"AveragePool", "GlobalAveragePool", "Add"})
_FLOAT_ISLAND = frozenset({"Softmax", "LayerNormalization", "Resize", "Sigmoid"})


# --- public types ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Finding:
    """One problem (or remark) about the model.

    Attributes:
        severity: ``error`` (parse/build fails or ORT and TensorRT disagree), ``warning`` (INT8
            fusion or speed lost) or ``info``.
        rule: stable id, checklist number + slug, e.g. ``C20-residual-add``.
        nodes: the ONNX nodes concerned (``<op_type>#<index>`` for unnamed ones); empty for
            graph-level findings.
        message: what is wrong, with the bad values, and why TensorRT cares.
        fix: one concrete change.
    """

    severity: Severity
    rule: str
    nodes: tuple[str, ...]
    message: str
    fix: str

    def to_dict(self) -> dict[str, Any]:
        return {"severity": self.severity, "rule": self.rule, "nodes": list(self.nodes),
                "message": self.message, "fix": self.fix}


@dataclass(frozen=True)
class CheckReport:
    """Findings of :func:`check_onnx` plus summary statistics of the graph."""

    findings: tuple[Finding, ...]
    target: Target
    strongly_typed: bool | None = None
    stats: dict[str, int | None] = field(default_factory=dict)

    def _of(self, severity: Severity) -> list[Finding]:
        return [f for f in self.findings if f.severity == severity]

    @property
    def errors(self) -> list[Finding]:
        return self._of("error")

    @property
    def warnings(self) -> list[Finding]:
        return self._of("warning")

    @property
    def infos(self) -> list[Finding]:
        return self._of("info")

    @property
    def ok(self) -> bool:
        """No errors: TensorRT should parse the model and ORT/TensorRT should agree."""
        return not self.errors

    @property
    def fusion_ok(self) -> bool:
        """No errors and no warnings from the Q/DQ pairing (B15-B16) and placement (C17-C26) rules."""
        return self.ok and not any(f.rule.startswith(FUSION_RULE_PREFIXES) for f in self.warnings)

    def rules(self, severity: Severity | None = None) -> set[str]:
        """Rule ids reported (optionally of one severity)."""
        return {f.rule for f in self.findings if severity is None or f.severity == severity}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "target": self.target,
            "strongly_typed": self.strongly_typed,
            "ok": self.ok,
            "fusion_ok": self.fusion_ok,
            "counts": {s: len(self._of(s)) for s in get_args(Severity)},
            "stats": dict(self.stats),
            "findings": [f.to_dict() for f in self.findings],
        }

    def summary(self) -> str:
        s = self.stats
        counts = ", ".join(f"{len(self._of(sev))} {sev}s" for sev in get_args(Severity))
        return (f"{counts} | target {self.target} | Q {s.get('quantize_linear', 0)}, "
                f"DQ {s.get('dequantize_linear', 0)} | weighted ops {s.get('weighted_ops', 0)}, "
                f"{s.get('weighted_ops_quantized', 0)} with both inputs behind DequantizeLinear")

    def format_table(self, width: int = 120) -> str:
        """Human-readable table: severity, rule, nodes, message and fix, wrapped to ``width``."""
        cols = (7, 26, 24)
        detail = max(width - sum(cols) - 2 * len(cols), 30)
        lines = [_row(("SEV", "RULE", "NODES", "DETAILS"), (*cols, detail)),
                 _row(tuple("-" * w for w in (*cols, detail)), (*cols, detail))]
        order = {s: i for i, s in enumerate(get_args(Severity))}
        for f in sorted(self.findings, key=lambda f: order[f.severity]):
            nodes = [n if len(n) <= cols[2] else n[: cols[2] - 1] + "~" for n in f.nodes[:6]] or ["(graph)"]
            if len(f.nodes) > 6:
                nodes.append(f"+{len(f.nodes) - 6} more")
            text = textwrap.wrap(f.message, detail) + textwrap.wrap("fix: " + f.fix, detail)
            rule = textwrap.wrap(f.rule, cols[1]) or [""]
            for i in range(max(len(nodes), len(text), len(rule))):
                cells = (f.severity.upper() if i == 0 else "", _at(rule, i), _at(nodes, i), _at(text, i))
                lines.append(_row(cells, (*cols, detail)))
        lines.append(self.summary())
        return "\n".join(line.rstrip() for line in lines)

    def __str__(self) -> str:
        return self.format_table()


def _at(items: list[str], i: int) -> str:
    return items[i] if i < len(items) else ""


def _row(cells: tuple[str, ...], widths: tuple[int, ...]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths))


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
        return self.node.op_type == _Q

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
class _Ctx:
    g: GraphIndex
    target: Target
    strongly_typed: bool | None
    qdq: dict[int, QDQ]
    units: list[QDQ]  # Q/DQ nodes to check once: a DQ identical to its Q is folded into the Q
    dtypes: frozenset[int] = frozenset()  # every element type in the graph
    shapes_ok: bool = True  # checker and strict shape inference passed

    @property
    def half(self) -> bool:
        """The graph has float16/bfloat16 tensors (an FP16 export)."""
        return bool(self.dtypes & _HALF)
    _parents: dict[int | str, list[int | str]] = field(default_factory=dict)

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
        ops = "/".join(dict.fromkeys(self.g.nodes[i].op_type for i in members))
        return f"{ops} {', '.join(repr(self.g.names[i]) for i in members)}"

    def dq_of(self, tensor: str) -> QDQ | None:
        """The DequantizeLinear behind ``tensor``, looking through Identity/Cast/Transpose/Reshape/...."""
        for _ in range(16):
            idx = self.g.producer.get(tensor)
            if idx is None or not is_default_domain(node := self.g.nodes[idx]):
                return None
            if node.op_type == _DQ:
                return self.qdq.get(idx)
            if node.op_type not in PASSTHROUGH_OPS:
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
            if node.op_type in PASSTHROUGH_OPS and is_default_domain(node) and slot == 0 and depth < 16:
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
            if node.op_type in _WEIGHTED and is_default_domain(node):
                yield i, node

    def root(self, q: QDQ) -> str:
        """The float tensor a Q/DQ quantizes (for a DQ fed by a Q: the Q's input)."""
        return self.qdq[q.partner].x if q.partner is not None else q.x


_Rule = Callable[[_Ctx], Iterable[Finding]]
#: The rules, in checklist order; append to extend.
RULES: list[_Rule] = []


def _rule(fn: _Rule) -> _Rule:
    RULES.append(fn)
    return fn


# --- helpers ---------------------------------------------------------------------------------
def _dt(dtype: int | None) -> str:
    if dtype is None:
        return "unknown"
    try:
        return onnx.helper.tensor_dtype_to_string(dtype).removeprefix("TensorProto.").lower()
    except Exception:
        return f"dtype {dtype}"


def _fmt(values: np.ndarray | None, k: int = 4) -> str:
    if values is None:
        return "non-constant"
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    shown = ", ".join(f"{v:.6g}" for v in flat[:k])
    if values.ndim == 0:
        return shown
    return f"[{shown}, ...] ({flat.size} values)" if flat.size > k else f"[{shown}]"


def _same(a: np.ndarray | None, b: np.ndarray | None, none_is_zero: bool = False) -> bool:
    if a is None and b is None:
        return True
    if a is None or b is None:
        other = b if a is None else a
        return none_is_zero and bool(np.all(np.asarray(other, dtype=np.float64) == 0))
    return a.shape == b.shape and bool(np.array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                                      equal_nan=True))


def _param_diffs(q: QDQ, dq: QDQ) -> list[str]:
    """How a DequantizeLinear's parameters differ from the QuantizeLinear feeding it."""
    diffs = []
    if not (_same(q.scale, dq.scale) if q.scale is not None or dq.scale is not None
            else q.scale_name == dq.scale_name):
        diffs.append(f"scale {_fmt(q.scale)} vs {_fmt(dq.scale)}")
    if not _same(q.zp, dq.zp, none_is_zero=True):
        diffs.append(f"zero point {_fmt(q.zp)} vs {_fmt(dq.zp)}")
    axes = [1 if a is None else a for a in (q.axis, dq.axis)]  # ONNX default axis 1
    if "tensor" not in (q.granularity, dq.granularity) and axes[0] != axes[1]:
        diffs.append(f"axis {q.axis} vs {dq.axis}")
    if q.block_size != dq.block_size:
        diffs.append(f"block_size {q.block_size} vs {dq.block_size}")
    return diffs


def _collect_qdq(g: GraphIndex) -> dict[int, QDQ]:
    out: dict[int, QDQ] = {}
    for i, node in enumerate(g.nodes):
        if node.op_type not in _QDQ_OPS or not is_default_domain(node):
            continue
        x = node.input[0] if node.input else ""
        scale_name = node.input[1] if len(node.input) > 1 else ""
        zp_name = node.input[2] if len(node.input) > 2 else ""
        scale = g.const(scale_name)
        is_q = node.op_type == _Q
        if is_q:
            qdtype = g.attr(node, "output_dtype", 0) or (g.dtype(zp_name) if zp_name else TP.UINT8)
            fdtype = g.dtype(x)
        else:
            qdtype, fdtype = g.dtype(x), g.dtype(scale_name)
        partner = g.producer.get(x) if not is_q and g.op_of(x) == _Q else None
        if qdtype is None and partner is not None and partner in out:
            qdtype = out[partner].qdtype
        out[i] = QDQ(i, node, scale, tuple(scale.shape) if scale is not None else g.shape(scale_name),
                     g.const(zp_name) if zp_name else None, g.attr(node, "axis"), g.attr(node, "block_size", 0),
                     qdtype, fdtype, g.shape(x), partner, members=(i,))
    for q in out.values():
        if q.partner is not None and q.partner in out and not _param_diffs(out[q.partner], q):
            head = out[q.partner]
            q.merged_into = head.idx
            head.members = (*head.members, q.idx)
    for q in out.values():
        q.names = names_of(g, q.members)
    return out


def _walk_back(ctx: _Ctx, tensor: str, through: frozenset[str], targets: frozenset[str],
               skip_qdq: bool = False) -> int | None:
    """Index of the first ``targets`` node above ``tensor``, passing only ``through`` ops.

    Add/Mul are passed only when one operand is constant (bias add, scale); Q/DQ when ``skip_qdq``.
    """
    g = ctx.g
    for _ in range(64):
        idx = g.producer.get(tensor)
        if idx is None or not is_default_domain(g.nodes[idx]):
            return None
        node = g.nodes[idx]
        if node.op_type in targets:
            return idx
        if (skip_qdq and node.op_type in _QDQ_OPS) or node.op_type in through - {"Add", "Mul"}:
            tensor = node.input[0]
        elif node.op_type in through & {"Add", "Mul"} and len(node.input) == 2:
            const = [g.is_const_rooted(t) for t in node.input]
            if const.count(True) != 1:
                return None
            tensor = node.input[const.index(False)]
        else:
            return None
    return None


def _float_src(g: GraphIndex, tensor: str) -> int | str | None:
    """Producer of ``tensor`` with Q/DQ looked through: node index, ``input:<name>``, or None (constant)."""
    for _ in range(64):
        idx = g.producer.get(tensor)
        if idx is None:
            return None if not tensor or tensor in g.initializers else f"input:{tensor}"
        node = g.nodes[idx]
        if node.op_type == "Constant" or not any(node.input):
            return None
        if node.op_type in _QDQ_OPS and is_default_domain(node):
            tensor = node.input[0]
            continue
        return idx
    return None


def _ancestors(ctx: _Ctx, key: int | str, limit: int = 128) -> dict[int | str, int]:
    """Shortest distance (in float nodes) from ``key`` to each of its ancestors, Q/DQ looked through."""
    dist: dict[int | str, int] = {key: 0}
    frontier = [key]
    for d in range(1, limit):
        nxt = []
        for k in frontier:
            if k not in ctx._parents:
                inputs = ctx.g.nodes[k].input if isinstance(k, int) else ()
                ctx._parents[k] = [s for t in inputs if t and (s := _float_src(ctx.g, t)) is not None]
            for p in ctx._parents[k]:
                if p not in dist:
                    dist[p] = d
                    nxt.append(p)
        if not nxt:
            break
        frontier = nxt
    return dist


def _residual_split(ctx: _Ctx, idx: int) -> tuple[int, int, int] | None:
    """(conv-branch slot, skip slot, backbone Conv index) of a residual Add, None if it is not one.

    ModelOpt's ``build_non_residual_input_map`` rule: an input reaching a Conv through
    BN/Relu/bias-add is a conv branch; if both do, the conv branch is the input with the longer
    path to the lowest common ancestor of the two inputs.
    """
    g = ctx.g
    node = g.nodes[idx]
    if len(node.input) != 2 or any(g.is_const_rooted(t) for t in node.input):
        return None
    src0, src1 = (_float_src(g, t) for t in node.input)
    if src0 is None or src1 is None:
        return None
    bbs = [_walk_back(ctx, t, _BACKBONE_PATH, frozenset({"Conv", "ConvTranspose"}), skip_qdq=True)
           for t in node.input]
    if bbs[0] is None and bbs[1] is None:
        return None
    up = [_ancestors(ctx, src0), _ancestors(ctx, src1)]
    common = up[0].keys() & up[1].keys()
    lca = min(common, key=lambda k: (up[0][k] + up[1][k], max(up[0][k], up[1][k]), str(k))) if common else None
    if bbs[0] is not None and bbs[1] is not None:
        if lca is None or bbs[0] == bbs[1] or g.nodes[bbs[0]].op_type != g.nodes[bbs[1]].op_type:
            return None
        conv = 0 if up[0][lca] > up[1][lca] else 1
    else:
        conv = 0 if bbs[0] is not None else 1
        if lca == bbs[conv]:  # ConvNeXt-like: the Conv feeds both inputs, not a residual block
            return None
    backbone = bbs[conv]
    assert backbone is not None
    return conv, 1 - conv, backbone


def _channel_axis(g: GraphIndex, node: onnx.NodeProto, rank: int) -> int | None:
    """Output-channel axis of the weight (input 1) of a weighted op."""
    op = node.op_type
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1
    if op == "Gemm":
        return 0 if g.attr(node, "transB", 0) else 1
    if op == "MatMul":
        return rank - 1 if rank >= 1 else None
    return None


def _feeds_quantizable(ctx: _Ctx, tensor: str, depth: int = 0) -> bool:
    for _, _, node in ctx.g.consumer_nodes(tensor):
        if node.op_type in _QUANTIZABLE:
            return True
        if node.op_type in _COMMUTING and depth < 16 and any(
                _feeds_quantizable(ctx, t, depth + 1) for t in node.output):
            return True
    return False


def _consumers_of(ctx: _Ctx, tensor: str, ops: frozenset[str] | None = None) -> list[int]:
    return [i for i, _, n in ctx.g.consumer_nodes(tensor) if ops is None or n.op_type in ops]


def _clip(text: object, n: int = 400) -> str:
    text = re.sub(r"\s+", " ", str(text)).strip()
    return text if len(text) <= n else text[: n - 3] + "..."


# --- A. model ------------------------------------------------------------------------------
@_rule
def _a0_no_qdq(ctx: _Ctx) -> Iterator[Finding]:
    if ctx.qdq or any(n.op_type in _QOPERATOR | _MS_QOPERATOR or n.domain == "trt" for n in ctx.g.nodes):
        return
    weighted = names_of(ctx.g, [i for i, _ in ctx.weighted()])
    yield Finding("info", "A0-no-qdq", weighted,
                  "no Q/DQ nodes: TensorRT will build this in float (FP32/TF32, or FP16 from an FP16 export)",
                  "quantize and calibrate the model, then export with Q/DQ on the Conv/Gemm/MatMul inputs")


@_rule
def _a1_unknown_rank(ctx: _Ctx) -> Iterator[Finding]:
    if not ctx.shapes_ok:
        return  # the A1 finding already explains why shapes are missing
    for q in ctx.units:
        if q.x and q.rank is None:
            yield Finding("error", "A1-unknown-rank", q.names,
                          f"{ctx.desc(q.idx)}: the rank of input {q.x!r} is unknown after shape inference; "
                          "TensorRT needs it to place the per-tensor/per-channel scale",
                          "give the graph inputs static ranks (export with example inputs) and rerun shape inference")


@_rule
def _a2_opset(ctx: _Ctx) -> Iterator[Finding]:
    opset, top = ctx.g.opset, MAX_OPSET[ctx.target]
    if opset is None:
        yield Finding("error", "A2-opset", (), "the model imports no default-domain (ai.onnx) opset",
                      "export with an explicit opset (13-20 for TensorRT 10.x)")
        return
    if opset > top:
        yield Finding("error", "A2-opset", (),
                      f"opset {opset} is above {top}, the highest default-domain opset the TensorRT ONNX parser is "
                      f"known to accept for target {ctx.target} (10.0 accepts 9-20; later limits unconfirmed)",
                      f"export with opset_version={min(top, 17)} (e.g. torch.onnx.export(..., opset_version=17))")
    groups: list[tuple[int, Callable[[QDQ], bool], str]] = [
        (13, lambda q: q.granularity in ("channel", "block"), "per-channel scales (the axis attribute)"),
        (19, lambda q: ctx.g.dtype(q.scale_name) in _HALF or q.qdtype in _FP8, "FP16/BF16 scales or FP8 data"),
        (21, lambda q: q.qdtype in _INT4 | {TP.FLOAT4E2M1} or bool(q.block_size)
         or ctx.g.has_attr(q.node, "output_dtype"), "INT4/FP4 data, block_size or output_dtype"),
    ]
    for need, pred, what in groups:
        hit = [q.idx for q in ctx.qdq.values() if opset < need and pred(q)]
        if hit:
            yield Finding("error", "A2-opset", names_of(ctx.g, hit),
                          f"opset {opset} < {need}, but {len(hit)} Q/DQ node(s) use {what}, which ONNX defines "
                          f"only from opset {need}", f"export with opset {need} or later (at most {top})")
    mixed = [q.idx for q in ctx.qdq.values()
             if q.is_q and q.fdtype and ctx.g.dtype(q.scale_name) not in (None, q.fdtype)]
    if opset >= 19 and mixed:
        yield Finding("error", "A2-opset", names_of(ctx.g, mixed),
                      f"from opset 19 a QuantizeLinear scale must have its input's dtype, but {len(mixed)} Q node(s) "
                      "mix them (e.g. a float32 scale on a float16 tensor); strongly typed TensorRT needs them equal",
                      "export the scales in the dtype of the tensors they quantize")


@_rule
def _a3_qoperator(ctx: _Ctx) -> Iterator[Finding]:
    for i, node in enumerate(ctx.g.nodes):
        default, ms = is_default_domain(node), node.domain == "com.microsoft"
        if (default and node.op_type in _QOPERATOR) or (ms and (node.op_type.startswith("QLinear")
                                                                or node.op_type in _MS_QOPERATOR)):
            yield Finding("error", "A3-qoperator", (ctx.g.names[i],),
                          f"{node.domain + '::' if node.domain else ''}{node.op_type} {ctx.g.names[i]!r} is a "
                          "QOperator-format (or onnxruntime contrib) op; TensorRT's ONNX parser rejects them and "
                          "only supports explicit quantization with ai.onnx QuantizeLinear/DequantizeLinear",
                          "re-export in QDQ format (onnxruntime quantize_static(quant_format=QuantFormat.QDQ), "
                          "ModelOpt, or PyTorch fake-quant export)")


@_rule
def _a4_trt_domain(ctx: _Ctx) -> Iterator[Finding]:
    hit = [i for i, n in enumerate(ctx.g.nodes) if n.domain == "trt"]
    if hit:
        yield Finding("info", "A4-trt-domain", names_of(ctx.g, hit),
                      f"{len(hit)} trt:: node(s) (e.g. TRT_FP8QuantizeLinear, INT4 trt::DequantizeLinear): TensorRT "
                      "parses them but onnxruntime cannot run them, so there is no ORT parity check",
                      "validate these layers on TensorRT itself (engine outputs vs the PyTorch fake-quant model)")


@_rule
def _a5_fp32_graph(ctx: _Ctx) -> Iterator[Finding]:
    typed = ctx.strongly_typed
    if ctx.target == "dla" or typed is False or ctx.half or TP.FLOAT not in ctx.dtypes:
        return
    yield Finding("warning" if typed else "info", "A5-fp32-graph", (),
                  "the graph is FP32 (no float16/bfloat16 tensor): "
                  + ("on a strongly typed network (always in TensorRT 11) " if typed else
                     "if built strongly typed (unknown here), ")
                  + "every layer that is not quantized runs in FP32/TF32, never FP16",
                  "export the float parts in FP16 (model.half() before export, or ModelOpt "
                  "--high_precision_dtype fp16); weakly typed TensorRT 10.x can use --int8 --fp16 instead")


# --- B. each Q/DQ --------------------------------------------------------------------------
@_rule
def _b6_dtype(ctx: _Ctx) -> Iterator[Finding]:
    g = ctx.g
    for q in ctx.qdq.values():
        if q.is_q and q.fdtype is not None and q.fdtype not in _FLOAT_IN:
            yield Finding("error", "B6-dtype", (g.names[q.idx],),
                          f"QuantizeLinear {g.names[q.idx]!r} quantizes {q.x!r} of dtype {_dt(q.fdtype)}; TensorRT "
                          "quantizes only float32/float16/bfloat16 tensors",
                          f"quantize the float tensor before it is cast to {_dt(q.fdtype)}")
        if q.partner is not None or (q.is_q and not q.zp_name and not g.attr(q.node, "output_dtype", 0)):
            continue  # a DQ fed by a Q: the Q reports the dtype; a Q without zero point: B8
        dt = q.qdtype
        if dt is None or dt in _QUANT_OK:
            continue
        if dt == TP.INT32 and not q.is_q and all(
                s == 2 and n.op_type in {"Conv", "ConvTranspose", "Gemm"} for _, s, n, _ in ctx.uses(q.y)):
            continue  # a quantized bias: C25
        what = "output (zero-point dtype)" if q.is_q else "input"
        if dt == TP.UINT8:
            dla = (" DLA can take uint8/asymmetric data only with OnnxParserFlag."
                   "ENABLE_UINT8_AND_ASYMMETRIC_QUANTIZATION_DLA (TensorRT 10.11+)." if ctx.target == "dla" else "")
            msg = (f"{ctx.desc(q.idx)} has a uint8 {what}: TensorRT only supports symmetric int8 quantization; "
                   f"the parser treats uint8 as int8, so TensorRT and onnxruntime disagree.{dla}")
            fix = "export int8 with zero point 0 (quant_min=-128, quant_max=127, int8 zero-point initializer)"
        elif dt == TP.FLOAT8E5M2:
            msg = f"{ctx.desc(q.idx)} uses FP8 E5M2; TensorRT supports only FP8 E4M3FN"
            fix = "quantize to float8e4m3fn (scale = amax/448)"
        else:
            msg = (f"{ctx.desc(q.idx)} has a {_dt(dt)} {what}; the TensorRT parser only allows int8, fp8 (e4m3fn), "
                   "int4 and fp4 (e2m1) quantized data")
            fix = "quantize to int8 (zero point 0, [-128, 127])"
        yield Finding("error", "B6-dtype", ctx.names(q.idx), msg, fix)


@_rule
def _b7_scale(ctx: _Ctx) -> Iterator[Finding]:
    g = ctx.g
    for q in ctx.units:
        d = ctx.desc(q.idx)
        if not q.scale_name:
            yield Finding("error", "B7-scale", q.names, f"{d} has no scale input",
                          "add a constant float scale (amax/127)")
            continue
        if q.scale is None:
            src = g.producer_of(q.scale_name)
            if src is not None and g.is_foldable(q.scale_name):
                yield Finding("error", "B7-scale", q.names,
                              f"{d}: scale {q.scale_name!r} is computed from constants by {src.op_type} but not "
                              "folded; TensorRT needs the scale as an initializer or Constant",
                              "fold constants (polygraphy surgeon sanitize --fold-constants, or compute the scale "
                              "outside forward() so it exports as an initializer)")
                continue
            origin = f"produced by {src.op_type}" if src is not None else "a graph input"
            yield Finding("error", "B7-scale", q.names,
                          f"{d}: scale {q.scale_name!r} is not a constant ({origin}); TensorRT needs build-time "
                          "constant scales", "store the calibrated scale as an initializer (fold it into the export)")
            continue
        s = np.asarray(q.scale, dtype=np.float64)
        if s.size == 0:
            yield Finding("error", "B7-scale", q.names, f"{d}: scale {q.scale_name!r} is empty",
                          "export one scale per tensor (scalar) or per output channel")
            continue
        bad = ~np.isfinite(s) | (s <= 0)
        if bad.any():
            yield Finding("error", "B7-scale", q.names,
                          f"{d}: scale {q.scale_name!r} has {int(bad.sum())} non-finite or <= 0 value(s) "
                          f"({_fmt(s[bad])}); TensorRT requires finite scales > 0",
                          "recalibrate (amax must be finite); export a zero amax as scale 1.0")
            continue
        if q.qdtype == TP.INT32:
            continue  # a bias scale (input scale x weight scale) is tiny by design; C25 reports the bias
        tiny = s < _TINY_SCALE
        if tiny.any():
            yield Finding("warning", "B7-scale", q.names,
                          f"{d}: {int(tiny.sum())} scale value(s) below 2^-24*127 ~ 7.6e-6 (min {s.min():.3g}): "
                          "amax is ~1e-3 or less, and dequantized values and fused rescales approach FP16 underflow",
                          "check the calibration of this tensor; skip quantizing (nearly) dead channels/tensors")
        elif (q.fdtype in _HALF or ctx.half) and (s < _FP16_MIN_NORMAL).any():
            yield Finding("warning", "B7-scale", q.names,
                          f"{d}: scale min {s.min():.3g} is below the FP16 minimum normal 6.1e-5 in an FP16 graph",
                          "keep this scale in float32 or raise amax; check the calibration of this tensor")
        if q.granularity == "channel" and (s == 1.0).any():
            yield Finding("warning", "B7-scale", q.names,
                          f"{d}: {int((s == 1.0).sum())} per-channel scale(s) are exactly 1.0, the export fallback "
                          "for amax 0 (all-zero or uncalibrated channels)",
                          "check that those channels are really zero; otherwise recalibrate the weights")


@_rule
def _b8_zero_point(ctx: _Ctx) -> Iterator[Finding]:
    g = ctx.g
    for q in ctx.units:
        d = ctx.desc(q.idx)
        if not q.zp_name:
            if q.is_q and not g.attr(q.node, "output_dtype", 0):
                yield Finding("error", "B8-zero-point", q.names,
                              f"{d} has no zero point: ONNX then outputs uint8 (onnxruntime clips negative values "
                              "to 0) while TensorRT assumes symmetric int8",
                              "add an int8 zero-point initializer of 0 with the scale's shape")
            continue
        if q.zp is None:
            yield Finding("error", "B8-zero-point", q.names,
                          f"{d}: zero point {q.zp_name!r} is not a constant; TensorRT needs constant zero points of 0",
                          "use an int8 zero-point initializer of 0")
            continue
        nz = np.asarray(q.zp, dtype=np.float64) != 0
        if nz.any():
            yield Finding("error", "B8-zero-point", q.names,
                          f"{d}: zero point {q.zp_name!r} = {_fmt(q.zp)} is not 0; TensorRT only supports "
                          "symmetric quantization (zero point 0)",
                          "calibrate symmetrically (amax = max|x|, scale = amax/127) and export zero point 0")
        if q.scale is not None and q.zp.shape != q.scale.shape and not q.zp.size == q.scale.size == 1:
            yield Finding("error", "B8-zero-point", q.names,
                          f"{d}: zero point shape {tuple(q.zp.shape)} differs from scale shape "
                          f"{tuple(q.scale.shape)}", "give the zero point exactly the scale's shape")
        out_dt = g.attr(q.node, "output_dtype", 0)
        zdt = g.dtype(q.zp_name)
        if out_dt and zdt and out_dt != zdt:
            yield Finding("error", "B8-zero-point", q.names,
                          f"{d}: output_dtype {_dt(out_dt)} differs from the zero-point dtype {_dt(zdt)}",
                          "make output_dtype and the zero-point dtype the same (int8)")


@_rule
def _b9_scale_rank(ctx: _Ctx) -> Iterator[Finding]:
    for q in ctx.units:
        if q.scale_shape is None or q.rank is None or len(q.scale_shape) <= 1:
            continue
        d, rs, r = ctx.desc(q.idx), len(q.scale_shape), q.rank
        if rs != r:
            yield Finding("error", "B9-scale-rank", q.names,
                          f"{d}: scale rank {rs} is neither 0 (per-tensor), 1 (per-channel) nor the input rank {r} "
                          "(block)", "use a scalar scale for activations and a 1-D scale for weights")
        elif not q.block_size:
            yield Finding("error", "B9-scale-rank", q.names,
                          f"{d}: scale has the input rank {r} (block quantization) but no block_size attribute",
                          "set block_size (opset 21) or use a 1-D per-channel scale")
        elif q.qdtype == TP.INT8:
            yield Finding("warning", "B9-scale-rank", q.names,
                          f"{d}: INT8 block quantization; TensorRT supports block scales for INT4/FP8/FP4, INT8 "
                          "depends on the TensorRT version", "use per-channel INT8 scales for weights")


@_rule
def _b10_per_channel_activation(ctx: _Ctx) -> Iterator[Finding]:
    for q in ctx.units:
        root = ctx.root(q)
        if q.granularity == "channel" and root and not ctx.g.is_const_rooted(root):
            yield Finding("error", "B10-per-channel-activation", q.names,
                          f"{ctx.desc(q.idx)} quantizes activation {root!r} per channel ({_fmt(q.scale)}): TensorRT "
                          "has no per-channel activation quantization; per-channel scales are only accepted on "
                          "constant weights", "use a per-tensor (scalar) scale for activations")


@_rule
def _b11_axis(ctx: _Ctx) -> Iterator[Finding]:
    opset = ctx.g.opset or 0
    for q in ctx.units:
        if q.granularity not in ("channel", "block"):
            continue
        d = ctx.desc(q.idx)
        if q.axis is None:
            if opset >= 13 and q.granularity == "channel":
                yield Finding("error", "B11-axis", q.names,
                              f"{d} is per-channel ({_fmt(q.scale)}) without an explicit axis: ONNX defaults to "
                              "axis=1 but the TensorRT parser assumes axis 0 (KCRS), so ORT and TensorRT differ",
                              "always write the axis attribute (0 for Conv and Gemm transB=1 weights)")
            continue
        if q.rank is None:
            continue
        if not -q.rank <= q.axis < q.rank:
            yield Finding("error", "B11-axis", q.names,
                          f"{d}: axis {q.axis} is out of range for input rank {q.rank}",
                          f"use an axis in [{-q.rank}, {q.rank - 1}] (the output-channel axis)")
            continue
        assert q.shape is not None and q.scale_shape is not None
        n, k = q.shape[q.axis], q.scale_shape[0]
        if q.granularity == "channel" and n is not None and k is not None and n != k:
            yield Finding("error", "B11-axis", q.names,
                          f"{d}: {k} scales but input {ctx.root(q)!r} has {n} entries along axis {q.axis} "
                          f"(shape {q.shape}); TensorRT: 'number of scales is not equal to the number of output "
                          "channels'", "export one scale per output channel along the channel axis")


@_rule
def _b12_channel_axis(ctx: _Ctx) -> Iterator[Finding]:
    g = ctx.g
    for q in ctx.qdq.values():
        if q.is_q or q.granularity != "channel" or q.axis is None or not q.rank or not -q.rank <= q.axis < q.rank:
            continue
        for ci, slot, node, axis in ctx.uses(q.y, q.axis % q.rank):
            rank = g.rank(node.input[slot])
            if slot != 1 or node.op_type not in _WEIGHTED or axis is None or rank is None:
                continue
            want = _channel_axis(g, node, rank)
            if want is None or axis == want:
                continue
            grouped = node.op_type == "ConvTranspose" and g.attr(node, "group", 1) > 1
            extra = f" (transB={g.attr(node, 'transB', 0)})" if node.op_type == "Gemm" else ""
            yield Finding("warning" if grouped else "error", "B12-channel-axis", (*ctx.names(q.idx), g.names[ci]),
                          f"{ctx.desc(q.idx)} scales weight {ctx.root(q)!r} along axis {q.axis}"
                          + (f" (axis {axis} after transposes)" if axis != q.axis % q.rank else "")
                          + f", but the output channels of {node.op_type} {g.names[ci]!r}{extra} are on axis {want}"
                          + (" (grouped ConvTranspose: layout unconfirmed)" if grouped else "")
                          + "; TensorRT scales output channels, so the weights are dequantized wrongly",
                          f"quantize the weight per output channel: axis={want}")


@_rule
def _b13_scalar(ctx: _Ctx) -> Iterator[Finding]:
    for q in ctx.units:
        if q.rank == 0:
            extra = " and sets an axis attribute" if q.axis is not None else ""
            yield Finding("error", "B13-scalar", q.names,
                          f"{ctx.desc(q.idx)} quantizes the scalar (rank-0) tensor {q.x!r}{extra}; TensorRT does "
                          "not accept scalar Q/DQ inputs", "do not quantize scalars (or reshape to rank >= 1)")


@_rule
def _b14_int4(ctx: _Ctx) -> Iterator[Finding]:
    for q in ctx.units:
        if q.qdtype not in _INT4:
            continue
        d, problems = ctx.desc(q.idx), []
        if not ctx.g.is_const_rooted(ctx.root(q)):
            problems.append("INT4 is weight-only but the input is an activation")
        if q.shape and q.shape[-1] is not None and q.shape[-1] % 2:
            problems.append(f"the last dimension {q.shape[-1]} is odd")
        if q.block_size and q.rank and q.axis is not None and q.axis % q.rank < q.rank - 2:
            problems.append(f"the block axis {q.axis} is not one of the last two dimensions")
        if problems:
            yield Finding("error", "B14-int4", q.names, f"{d}: " + "; ".join(problems),
                          "use INT4 only for constant 2-D weights with an even last dimension, blocked along "
                          "one of the last two axes")


@_rule
def _b15_pairing(ctx: _Ctx) -> Iterator[Finding]:
    g = ctx.g
    for q in ctx.qdq.values():
        name = g.names[q.idx]
        if q.is_q:
            other = [i for i, _, n in g.consumer_nodes(q.y) if n.op_type != _DQ]
            if other or q.y in g.outputs:
                where = ", ".join(repr(g.names[i]) for i in other) or "the graph output"
                yield Finding("warning", "B15-qdq-pairing", (name, *names_of(g, other)),
                              f"QuantizeLinear {name!r} feeds {where}, not a DequantizeLinear: TensorRT expects "
                              "Q -> DQ pairs and cannot fuse the quantized tensor",
                              f"insert a DequantizeLinear after {name!r} (or remove the Q)")
        elif q.partner is None and not g.is_const_rooted(q.x):
            yield Finding("warning", "B15-qdq-pairing", (name,),
                          f"DequantizeLinear {name!r} dequantizes activation {q.x!r}, which no QuantizeLinear "
                          "produced (an integer graph input?); TensorRT expects Q -> DQ pairs on activations",
                          "feed float data and quantize it with a QuantizeLinear in the graph")
        elif q.partner is not None and q.merged_into is None:
            diffs = _param_diffs(ctx.qdq[q.partner], q)
            yield Finding("warning", "B15-qdq-pairing", (g.names[q.partner], name),
                          f"QuantizeLinear {g.names[q.partner]!r} and DequantizeLinear {name!r} disagree: "
                          + "; ".join(diffs) + "; the pair no longer round-trips and TensorRT results differ",
                          "export each Q/DQ pair from one quantizer with identical scale, zero point and axis")


@_rule
def _b16_double_qdq(ctx: _Ctx) -> Iterator[Finding]:
    g = ctx.g
    by_input: dict[str, list[QDQ]] = defaultdict(list)
    for q in ctx.qdq.values():
        if q.is_q and q.x:
            by_input[q.x].append(q)
    for x, qs in by_input.items():
        if len(qs) > 1 and not g.is_const_rooted(x):
            yield Finding("warning", "B16-double-qdq", tuple(g.names[q.idx] for q in qs),
                          f"tensor {x!r} is quantized {len(qs)} times (scales {', '.join(_fmt(q.scale) for q in qs)}): "
                          "per-consumer scales block TensorRT from sharing one INT8 tensor",
                          "quantize the tensor once and share its DequantizeLinear between the consumers")
    for q in ctx.qdq.values():
        if q.is_q and g.op_of(q.x) == _DQ:
            dq = g.producer[q.x]
            yield Finding("warning", "B16-double-qdq", (g.names[dq], g.names[q.idx]),
                          f"DequantizeLinear {g.names[dq]!r} feeds QuantizeLinear {g.names[q.idx]!r} directly: the "
                          "tensor is requantized (double Q/DQ) and TensorRT adds a needless rescale",
                          "drop the second Q/DQ pair (keep a single quantizer per tensor)")


# --- C. placement --------------------------------------------------------------------------
@_rule
def _c17_partial(ctx: _Ctx) -> Iterator[Finding]:
    for i, node in ctx.weighted():
        if len(node.input) < 2:
            continue
        act, wt = ctx.behind_dq(node.input[0]), ctx.behind_dq(node.input[1])
        if act != wt:
            have, miss = ("weight", "activation") if wt else ("activation", "weight")
            missing = node.input[0] if wt else node.input[1]
            yield Finding("warning", "C17-partial-quant", (ctx.g.names[i],),
                          f"only the {have} input of {node.op_type} {ctx.g.names[i]!r} is behind DequantizeLinear; "
                          f"the {miss} {missing!r} is float, so TensorRT runs it in float",
                          f"add a Q/DQ pair on the {miss} input {missing!r} (or remove the other one)")


@_rule
def _c18_output_qdq(ctx: _Ctx) -> Iterator[Finding]:
    g = ctx.g
    for q in ctx.qdq.values():
        if not q.is_q:
            continue
        src = _walk_back(ctx, q.x, _OUTPUT_PATH, _WEIGHTED)
        dqs = _consumers_of(ctx, q.y, frozenset({_DQ}))
        if src is None or not dqs:
            continue
        if _walk_back(ctx, q.x, _EPILOGUE, _WEIGHTED) is not None and any(
                _consumers_of(ctx, g.nodes[d].output[0], _ACTIVATIONS) for d in dqs):
            continue  # C19
        if any(_feeds_quantizable(ctx, g.nodes[d].output[0]) for d in dqs):
            continue
        yield Finding("warning", "C18-output-qdq", (g.names[src], *ctx.names(q.idx)),
                      f"{ctx.desc(q.idx)} quantizes the output of {g.nodes[src].op_type} {g.names[src]!r}, but no "
                      "quantizable op (Conv/Gemm/MatMul/Pool/Add) consumes it: TensorRT gains nothing and adds a "
                      "reformat", f"remove the Q/DQ after {g.names[src]!r}; quantize inputs of weighted ops only")


@_rule
def _c19_conv_activation(ctx: _Ctx) -> Iterator[Finding]:
    g = ctx.g
    for q in ctx.qdq.values():
        if not q.is_q:
            continue
        src = _walk_back(ctx, q.x, _EPILOGUE, _WEIGHTED)
        if src is None:
            continue
        for d in _consumers_of(ctx, q.y, frozenset({_DQ})):
            acts = _consumers_of(ctx, g.nodes[d].output[0], _ACTIVATIONS)
            if acts:
                act = g.nodes[acts[0]].op_type
                yield Finding("warning", "C19-conv-act-qdq", names_of(g, [src, q.idx, d, *acts]),
                              f"Q/DQ {g.names[q.idx]!r} -> {g.names[d]!r} sits between {g.nodes[src].op_type} "
                              f"{g.names[src]!r} and {act} {g.names[acts[0]]!r}: TensorRT cannot fuse "
                              f"{g.nodes[src].op_type}+{act} (Conv+BN+ReLU) across it",
                              f"move the Q/DQ after {g.names[acts[0]]!r} (onto the next weighted op's input)")


@_rule
def _c20_residual_add(ctx: _Ctx) -> Iterator[Finding]:
    g = ctx.g
    for i, node in enumerate(g.nodes):
        if node.op_type != "Add" or not is_default_domain(node):
            continue
        split = _residual_split(ctx, i)
        if split is None:
            continue
        c, s, conv = split
        cq, sq = ctx.behind_dq(node.input[c]), ctx.behind_dq(node.input[s])
        add, cv = g.names[i], g.names[conv]
        where = (f"residual Add {add!r} (conv branch: input {c} {node.input[c]!r} from Conv {cv!r}; identity: "
                 f"input {s} {node.input[s]!r})")
        if sq and not cq:
            continue
        dq_nodes = [dq.idx for k in (c, s) if (dq := ctx.dq_of(node.input[k])) is not None]
        nodes = names_of(g, [i, conv, *dq_nodes])
        if cq and sq:
            yield Finding("warning", "C20-residual-add", nodes,
                          f"both Add inputs quantized in {where}: TensorRT cannot fuse the Add into the Conv "
                          "epilogue (suboptimal)",
                          f"remove the Q/DQ on the conv-branch input {node.input[c]!r}; keep the one on the identity")
        elif cq:
            yield Finding("warning", "C20-residual-add", nodes,
                          f"conv branch quantized but identity float in {where}: the Conv+Add fusion cannot run in "
                          "INT8 ('the precision of the first input to the element-wise addition determines the "
                          "precision of the output of the fusion')",
                          f"move the quantizer from {node.input[c]!r} to the identity input {node.input[s]!r}")
        elif ctx.quantized_weighted(conv):
            yield Finding("warning", "C20-residual-add", nodes,
                          f"no quantized input in {where} while Conv {cv!r} is quantized: the identity input is "
                          "float, so TensorRT cannot fuse Conv+Add in INT8",
                          f"add a quantizer on the identity input {node.input[s]!r} so Conv+Add fuses in INT8")


@_rule
def _c21_concat(ctx: _Ctx) -> Iterator[Finding]:
    g = ctx.g
    for i, node in enumerate(g.nodes):
        if node.op_type != "Concat" or not is_default_domain(node):
            continue
        ins = [t for t in node.input if t and not g.is_const_rooted(t)]
        dqs = [ctx.dq_of(t) for t in ins]
        if len(ins) < 2 or not any(dqs):
            continue
        if not all(dqs):
            floats = [t for t, d in zip(ins, dqs) if d is None]
            yield Finding("warning", "C21-concat", (g.names[i],),
                          f"Concat {g.names[i]!r} mixes quantized and float inputs (float: {', '.join(floats)}): "
                          "TensorRT cannot produce one INT8 output tensor and inserts reformats",
                          "quantize every Concat input with the same scale, or none")
            continue
        scales = [d.scale for d in dqs if d is not None]
        if any(s is None for s in scales) or all(_same(scales[0], s) for s in scales[1:]):
            continue
        yield Finding("warning", "C21-concat", (g.names[i], *names_of(g, [d.idx for d in dqs if d])),
                      f"Concat {g.names[i]!r} inputs have different scales ({'; '.join(_fmt(s) for s in scales)}): "
                      "TensorRT needs one scale for a concatenated INT8 tensor and requantizes the inputs",
                      "share one quantizer (one amax) between all Concat inputs")


@_rule
def _c22_infos(ctx: _Ctx) -> Iterator[Finding]:
    g = ctx.g
    redundant = frozenset({"MaxPool", "Relu", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Pad",
                           "Slice"})
    for i, node in enumerate(g.nodes):
        if not is_default_domain(node) or node.op_type not in redundant | _FUSIBLE or not node.input:
            continue
        outs = [c for t in node.output[:1] for c in g.consumer_nodes(t)]
        src = ctx.dq_of(node.input[0])
        if src is None or not outs or any(n.op_type != _Q for _, _, n in outs):
            continue
        dq, qs = src.idx, [c[0] for c in outs]
        if node.op_type in redundant:
            yield Finding("info", "C22-redundant-qdq", names_of(g, [dq, i, *qs]),
                          f"{node.op_type} {g.names[i]!r} is wrapped in Q/DQ: TensorRT moves Q/DQ across "
                          f"{node.op_type}, so one of the two pairs is redundant",
                          f"keep one pair: drop the Q/DQ before {g.names[i]!r} unless another consumer needs it")
        else:
            yield Finding("info", "C22-fusible", names_of(g, [dq, i, *qs]),
                          f"{node.op_type} {g.names[i]!r} has a quantized input and a quantized output: TensorRT "
                          "can run it in INT8", "no change needed")
    for q in ctx.qdq.values():
        cons = [c for d in _consumers_of(ctx, q.y, frozenset({_DQ})) for c in _consumers_of(ctx, g.nodes[d].output[0])]
        if q.is_q and cons and all(g.nodes[c].op_type in _FLOAT_ISLAND for c in cons):
            yield Finding("info", "C22-float-island", (*ctx.names(q.idx), *names_of(g, cons)),
                          f"{ctx.desc(q.idx)} feeds only {', '.join(sorted({g.nodes[c].op_type for c in cons}))}, "
                          "which TensorRT runs in float: the Q/DQ only adds a quantize/dequantize",
                          "remove this Q/DQ unless it is there for accuracy parity")


@_rule
def _c23_small_channel_conv(ctx: _Ctx) -> Iterator[Finding]:
    g = ctx.g
    for i, node in ctx.weighted():
        if node.op_type != "Conv" or not ctx.quantized_weighted(i):
            continue
        name, w = g.names[i], node.input[1]
        shape = g.shape(w)
        if not g.is_const_rooted(w) or shape is None or len(shape) < 3 or None in shape[:2]:
            yield Finding("warning", "C23-small-channel-conv", (name,),
                          f"quantized Conv {name!r} has non-constant weights {w!r}; TensorRT's INT8 Conv kernels "
                          "need constant (folded) weights", "feed the Conv constant weights (initializer + Q/DQ)")
            continue
        oc, ic = shape[0], shape[1]
        assert oc is not None and ic is not None
        group = g.attr(node, "group", 1)
        kernel = list(g.attr(node, "kernel_shape", None) or shape[2:])
        if oc < 16 or ic < 16:
            first = isinstance(_float_src(g, node.input[0]), str)
            fine = (group == 1 and (oc % 8 == 0 or ic % 8 == 0) and (first or oc >= 16 or ic >= 16)
                    and len(set(kernel)) == 1) or (group > 1 and oc % 8 == 0 and all(k >= 3 for k in kernel if k))
            if not fine:
                yield Finding("warning", "C23-small-channel-conv", (name,),
                              f"quantized Conv {name!r} has {ic} input / {oc} output channels (group {group}, kernel "
                              f"{kernel}): TensorRT has no fast INT8 kernel for so few channels",
                              f"leave {name!r} in float (remove its Q/DQ), or pad channels to a multiple of 8")
        dq = ctx.dq_of(w)
        if dq is not None and dq.qdtype in _FP8 and int(np.prod([k for k in kernel if k])) > 32:
            yield Finding("warning", "C23-small-channel-conv", (name,),
                          f"FP8 Conv {name!r} has a {kernel} kernel (> 32 taps); TensorRT FP8 conv kernels are slow "
                          "for large filters", f"quantize {name!r} to INT8 or leave it in FP16")


@_rule
def _c24_gemv(ctx: _Ctx) -> Iterator[Finding]:
    g = ctx.g
    for i, node in ctx.weighted():
        if node.op_type not in ("Gemm", "MatMul") or not ctx.quantized_weighted(i):
            continue
        out = g.shape(node.output[0]) if node.output else None
        if not out:
            continue
        variable = not any(g.is_const_rooted(t) for t in node.input[:2])
        gemv = (len(out) < 2 or 1 in out[-2:]) if variable else (len(out) < 3 and 1 in out)
        if gemv:
            yield Finding("warning", "C24-gemv", (g.names[i],),
                          f"quantized {node.op_type} {g.names[i]!r} is a GEMV (output shape {out}): INT8 Q/DQ on "
                          "a matrix-vector product is slower than FP16 in TensorRT",
                          f"leave {g.names[i]!r} in float, or benchmark with a larger batch")


@_rule
def _c25_quantized_bias(ctx: _Ctx) -> Iterator[Finding]:
    g = ctx.g
    for i, node in enumerate(g.nodes):
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.input) < 3:
            continue
        dq = ctx.dq_of(node.input[2])
        if dq is None:
            continue
        int32 = dq.qdtype == TP.INT32
        yield Finding("error" if int32 else "warning", "C25-quantized-bias", (*ctx.names(dq.idx), g.names[i]),
                      f"the bias of {node.op_type} {g.names[i]!r} is quantized ({ctx.desc(dq.idx)}, "
                      f"{_dt(dq.qdtype)}): "
                      + ("TensorRT cannot dequantize INT32 data (QOperator-style bias)" if int32 else
                         "TensorRT keeps biases in float and fuses them into the Conv; quantizing them loses accuracy"),
                      f"feed {g.names[i]!r} a float bias initializer (no Q/DQ on the bias)")


@_rule
def _c26_dla(ctx: _Ctx) -> Iterator[Finding]:
    if ctx.target != "dla":
        return
    g = ctx.g
    for name in g.inputs:
        shape = g.shape(name)
        users = names_of(g, [i for i, _ in g.consumers.get(name, ())])
        if shape is None or None in shape:
            yield Finding("error", "C26-dla", users,
                          f"graph input {name!r} has dynamic or unknown dims {shape}: DLA needs static shapes",
                          "export with fixed input shapes (no dynamic_axes)")
            continue
        if shape and shape[0] is not None and shape[0] > _DLA_MAX_BATCH:
            yield Finding("error", "C26-dla", users, f"graph input {name!r}: batch {shape[0]} > 4096 (DLA limit)",
                          "use a batch of at most 4096")
        big = [d for d in shape[1:] if d is not None and d > _DLA_MAX_DIM]
        if big:
            yield Finding("error", "C26-dla", users,
                          f"graph input {name!r}: non-batch dims {big} > 8192 (DLA limit)", "tile or resize the input")
    if not ctx.qdq:
        return
    yield Finding("info", "C26-dla", (),
                  "DLA runs implicit INT8 only: the Q/DQ scales must be translated into a calibration cache "
                  "(qdq-translator: Q/DQ-free ONNX + cache, TensorRT 10.x); TensorRT 11 reads no caches",
                  "run qdq-translator and build with the cache (--int8 --calib), DLA core, GPU fallback")
    covered = {q.x for q in ctx.qdq.values() if q.is_q} | {q.y for q in ctx.qdq.values() if not q.is_q}
    bare = [i for i, n in enumerate(g.nodes) if n.op_type not in _QDQ_OPS | {"Constant"}
            and any(t and t not in covered and not _consumers_of(ctx, t, frozenset({_Q})) for t in n.output)]
    if bare:
        yield Finding("info", "C26-dla", names_of(g, bare),
                      f"{len(bare)} node output(s) have no Q/DQ scale: in implicit INT8 every tensor needs a dynamic "
                      "range, so these run in FP16 (or fall back to the GPU, silently)",
                      "add scales for these tensors (calibrate the whole network for DLA)")


# --- entry point ---------------------------------------------------------------------------
def _validate(model: onnx.ModelProto, path: str | None) -> tuple[onnx.ModelProto, list[Finding]]:
    """onnx.checker + strict shape inference (= check_model(full_check=True), reported separately)."""
    found: list[Finding] = []
    if model.ByteSize() > _PROTO_LIMIT:
        if path is None:
            found.append(Finding("info", "A1-too-large", (),
                                 "the model is over 2 GiB in memory: checker and shape inference were skipped",
                                 "pass the file path so onnx.checker.check_model can read the external data"))
            return model, found
        try:
            onnx.checker.check_model(path, full_check=True)
        except Exception as exc:
            found.append(Finding("error", "A1-onnx-checker", (), f"onnx.checker failed: {_clip(exc)}",
                                 "fix the export so that onnx.checker.check_model(path, full_check=True) passes"))
        return model, found
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        found.append(Finding("error", "A1-onnx-checker", (), f"onnx.checker failed: {_clip(exc)}",
                             "fix the export so that onnx.checker.check_model(model, full_check=True) passes"))
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True), found
    except Exception as exc:
        found.append(Finding("error", "A1-shape-inference", (), f"ONNX shape inference failed: {_clip(exc)}",
                             "fix the shapes/dtypes named above (onnx.shape_inference.infer_shapes(strict_mode=True))"))
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True), found
    except Exception:
        return model, found


def _stats(ctx: _Ctx) -> dict[str, int | None]:
    weighted = [i for i, _ in ctx.weighted()]
    nq = sum(q.is_q for q in ctx.qdq.values())
    return {"opset": ctx.g.opset, "nodes": len(ctx.g.nodes), "qdq_nodes": len(ctx.qdq), "quantize_linear": nq,
            "dequantize_linear": len(ctx.qdq) - nq, "weighted_ops": len(weighted),
            "weighted_ops_quantized": sum(ctx.quantized_weighted(i) for i in weighted)}


def check_onnx(model: str | os.PathLike[str] | onnx.ModelProto, target: Target = "trt10",
               strongly_typed: bool | None = None) -> CheckReport:
    """Check a Q/DQ ONNX model against TensorRT's explicit-quantization rules (static part).

    Args:
        model: a path (external data is loaded relative to the file) or a loaded ``ModelProto``.
        target: ``trt10`` (TensorRT 10.x), ``trt11`` (always strongly typed) or ``dla`` (implicit
            INT8 through a calibration cache, static shapes).
        strongly_typed: whether a ``trt10`` build is strongly typed; None (unknown) reports an
            FP32 graph as info, True as a warning. ``trt11`` is always strongly typed.

    Returns:
        A :class:`CheckReport`; it never raises for a bad model, only for bad arguments.

    Raises:
        ValueError: unknown ``target``.
        TypeError: ``model`` is neither a path nor a ``ModelProto``.
        FileNotFoundError: ``model`` is a path to no file.
    """
    if target not in get_args(Target):
        raise ValueError(f"unknown target {target!r}; known: {', '.join(get_args(Target))}")
    typed = {"trt10": strongly_typed, "trt11": True, "dla": None}[target]
    path: str | None = None
    if isinstance(model, onnx.ModelProto):
        proto = model
    elif isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no ONNX file at {path!r}")
        try:
            proto = onnx.load(path)
        except Exception as exc:
            bad = Finding("error", "A1-load", (), f"{path} cannot be loaded as ONNX: {_clip(exc)}",
                          "re-export the model (the file is truncated, not ONNX, or its external data is missing)")
            return CheckReport((bad,), target, typed, {})
    else:
        raise TypeError(f"model must be a path or onnx.ModelProto, not {type(model).__name__}")
    if path is None and any(t.data_location == TP.EXTERNAL for t in proto.graph.initializer):
        raise ValueError("the model's external data is not loaded; pass the .onnx path (its data is read relative "
                         "to the file) or load it with onnx.load(path) first")
    inferred, findings = _validate(proto, path)
    g = GraphIndex(inferred, os.path.dirname(os.path.abspath(path)) if path else "")
    qdq = _collect_qdq(g)
    ctx = _Ctx(g, target, typed, qdq, [q for q in qdq.values() if q.merged_into is None],
               dtypes=frozenset(g.all_dtypes()), shapes_ok=not findings)
    for rule in RULES:
        try:
            findings.extend(rule(ctx))
        except Exception as exc:  # a checker must report on odd graphs, not die on them
            findings.append(Finding("warning", "internal-error", (), f"rule {rule.__name__} crashed ({exc!r}); "
                                    "the check is incomplete", "report this model to the trtquant maintainers"))
    return CheckReport(tuple(findings), target, typed, _stats(ctx))
