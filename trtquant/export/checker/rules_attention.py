"""C27: attention blocks and TensorRT's fused (INT8) multi-head attention.

TensorRT fuses ``MatMul(Q, Kᵀ) -> [scale, mask/bias Add] -> Softmax -> MatMul(P, V)`` built from primitive
layers into one attention kernel (TensorRT developer guide, "Fused Attention", method 2), and requires Q or K
to be multiplied by the attention scale *before* the first MatMul. With explicit quantization the fused
kernel runs in INT8 when both inputs of both MatMuls come through Q/DQ (the four quantizers
:mod:`trtquant.nn.attention` places). Beyond the static checklist's rules 1-26; numbered after them.

Ids: ``C27-attention-fusable`` (I, one per attention block that has the fusable shape),
``C27-attention-float`` (W, an attention MatMul input is float: the block runs unfused or in float),
``C27-attention-scale`` (W, the scale sits between the first MatMul and the Softmax).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from trtquant.graph.index import is_default_domain

from .context import Ctx, rule
from .report import Finding

#: Ops between the Q·Kᵀ MatMul and the Softmax (scale, bias and mask adds, masking, reshapes) and between the
#: Softmax and the P·V MatMul (casts, reshapes, inference-mode dropout).
_BETWEEN = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Reshape", "Transpose", "Identity", "Cast", "Squeeze",
                      "Unsqueeze", "Dropout", "Expand", "QuantizeLinear", "DequantizeLinear"})
_SCALE = frozenset({"Mul", "Div"})
_WALK = 16


@dataclass(frozen=True)
class Attention:
    """One attention block in an ONNX graph: the two MatMuls and the Softmax (node indices)."""

    qk: int
    softmax: int
    pv: int
    scale_between: tuple[int, ...]  # constant Mul/Div nodes between the first MatMul and the Softmax


def _data_matmul(ctx: Ctx, i: int) -> bool:
    node = ctx.g.nodes[i]
    return node.op_type == "MatMul" and is_default_domain(node) and len(node.input) == 2 and \
        not any(ctx.g.is_const_rooted(t) for t in node.input)


def attention_blocks(ctx: Ctx) -> list[Attention]:
    """Every ``MatMul -> ... -> Softmax -> ... -> MatMul`` chain of data MatMuls (MatMuls with a constant operand
    are Linear layers, not attention)."""
    g = ctx.g
    found = []
    for i in range(len(g.nodes)):
        if not _data_matmul(ctx, i):
            continue
        frontier, seen, scales, softmax = [i], {i}, [], None
        for _ in range(_WALK):
            nxt = []
            for n in frontier:
                for c, _, node in g.consumer_nodes(g.nodes[n].output[0]):
                    if c in seen:
                        continue
                    seen.add(c)
                    if node.op_type == "Softmax":
                        softmax = c
                    elif node.op_type in _BETWEEN:
                        if node.op_type in _SCALE and any(g.is_const_rooted(t) for t in node.input):
                            scales.append(c)
                        nxt.append(c)
            if softmax is not None or not nxt:
                break
            frontier = nxt
        if softmax is None:
            continue
        pv = _consumer_matmul(ctx, softmax)
        if pv is not None:
            found.append(Attention(i, softmax, pv, tuple(scales)))
    return found


def _consumer_matmul(ctx: Ctx, softmax: int) -> int | None:
    g = ctx.g
    frontier = [softmax]
    for _ in range(_WALK):
        nxt = []
        for n in frontier:
            for c, slot, node in g.consumer_nodes(g.nodes[n].output[0]):
                if _data_matmul(ctx, c) and slot == 0:
                    return c
                if node.op_type in _BETWEEN - {"Add", "Sub", "Mul", "Div", "Where"}:
                    nxt.append(c)
        if not nxt:
            return None
        frontier = nxt
    return None


@rule("C27-attention-fusable", "C27-attention-float", "C27-attention-scale")
def _c27_attention(ctx: Ctx) -> Iterator[Finding]:
    g = ctx.g
    for a in attention_blocks(ctx):
        qk, pv = g.nodes[a.qk], g.nodes[a.pv]
        names = (g.names[a.qk], g.names[a.softmax], g.names[a.pv])
        where = f"attention {g.names[a.qk]!r} -> Softmax {g.names[a.softmax]!r} -> {g.names[a.pv]!r}"
        roles = (("Q", qk.input[0]), ("Kᵀ", qk.input[1]), ("softmax output", pv.input[0]), ("V", pv.input[1]))
        floats = [f"{role} ({t!r})" for role, t in roles if not ctx.behind_dq(t)]
        if floats:
            yield Finding("warning", "C27-attention-float", names,
                          f"{where}: float MatMul input(s) {', '.join(floats)}: TensorRT cannot run this attention "
                          "as a fused INT8 kernel",
                          "quantize both inputs of both attention MatMuls (trtquant.quantize does it for "
                          "nn.MultiheadAttention, scaled_dot_product_attention and matmul attention)")
        if a.scale_between:
            yield Finding("warning", "C27-attention-scale", names + tuple(g.names[s] for s in a.scale_between),
                          f"{where}: the attention scale is applied after the first MatMul; TensorRT's fused "
                          "attention needs Q (or K) scaled before it",
                          "scale Q before Q·Kᵀ (as nn.MultiheadAttention and scaled_dot_product_attention do)")
        if not floats and not a.scale_between:
            yield Finding("info", "C27-attention-fusable", names,
                          f"{where}: both inputs of both MatMuls are quantized and Q is scaled before the first "
                          "one: the shape TensorRT fuses into one INT8 attention kernel", "no change needed")
