"""Lower trtquant's FP8 and blocked-INT4 export placeholders to standard ONNX Q/DQ.

The exporters write ``trtquant::FP8QDQ(x, scale)`` and ``trtquant::BlockQDQ(w, scale)`` (see
:mod:`trtquant.export.qdq_op`); this pass turns them into what TensorRT's ONNX parser and ONNX
Runtime both read:

* FP8 E4M3: ``QuantizeLinear(x, scale, zp) -> DequantizeLinear`` with a float8e4m3fn zero point 0
  (opset 19; TensorRT's FP8 scheme ``castToFp8(clip(x / s, -448, 448))``, ONNX's saturating cast).
* INT4 weights: the weight is quantized here (round half to even, as the placeholder computes it)
  into an int4 initializer read by a blocked ``DequantizeLinear`` (opset 21, ``block_size``, int4 zero
  point 0), the pre-quantized weight-only form ModelOpt exports and TensorRT parses (INT4 needs
  DQ-only weights). A weight read through ``Transpose -> MatMul`` (or ``Gemm(transB=1)``) is stored
  transposed, ``[K, N]`` with blocks along axis 0, feeding ``MatMul`` directly: the pattern ONNX
  Runtime fuses into its 4-bit ``MatMulNBits`` kernel.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import ExportError
from ..graph.index import GraphIndex
from .qdq_op import BLOCK_OP, DOMAIN, FP8_OP

__all__ = ["lower_trtquant_qdq", "FP8_OPSET", "INT4_OPSET"]

FP8_OPSET = 19  # float8 QuantizeLinear/DequantizeLinear
INT4_OPSET = 21  # int4, block_size


def lower_trtquant_qdq(model: onnx.ModelProto) -> Dict[str, int]:
    """Rewrite every placeholder in place; returns ``{'fp8': n, 'int4': n}`` and raises the opset as needed."""
    g = GraphIndex(model)
    counts = {"fp8": 0, "int4": 0}
    for i, node in list(enumerate(g.nodes)):
        if node.domain != DOMAIN:
            continue
        if node.op_type == FP8_OP:
            _lower_fp8(g, i, node)
            counts["fp8"] += 1
        elif node.op_type == BLOCK_OP:
            _lower_block(g, i, node)
            counts["int4"] += 1
    g.commit()
    if counts["fp8"] or counts["int4"]:
        g.toposort_()
    need = max([FP8_OPSET] * bool(counts["fp8"]) + [INT4_OPSET] * bool(counts["int4"]) + [0])
    for imp in list(model.opset_import):
        if imp.domain in ("", "ai.onnx") and imp.version < need:
            imp.version = need
        if imp.domain == DOMAIN:
            model.opset_import.remove(imp)
    for f in list(model.functions):  # the dynamo exporter may declare the placeholders' domain as functions
        if f.domain == DOMAIN:
            model.functions.remove(f)
    return counts


def _qdq_names(node: onnx.NodeProto) -> tuple:
    """Q/DQ node names in the placeholder's scope ('/fc/input_quantizer/QuantizeLinear'), which
    teacher-forced parity maps back to the quantizer."""
    scope = node.name.rsplit("/", 1)[0] if "/" in node.name else node.name
    return (f"{scope}/QuantizeLinear", f"{scope}/DequantizeLinear") if scope else ("", "")


def _lower_fp8(g: GraphIndex, i: int, node: onnx.NodeProto) -> None:
    x, scale = node.input[0], node.input[1]
    zp = g.add_initializer(helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0]), hint=f"{x}_fp8_zero_point")
    q_out = g.fresh(f"{x}_fp8")
    qn, dqn = _qdq_names(node)
    g.remove_node(i)
    for new in (helper.make_node("QuantizeLinear", [x, scale, zp], [q_out], name=qn),
                helper.make_node("DequantizeLinear", [q_out, scale, zp], [node.output[0]], name=dqn)):
        new.metadata_props.extend(node.metadata_props)  # the exporter's module scopes (parity maps by them)
        g.add_node(new)


def _int4(values: np.ndarray, name: str) -> TensorProto:
    return helper.make_tensor(name, TensorProto.INT4, list(values.shape), values.reshape(-1).astype(np.int8).tolist())


def _lower_block(g: GraphIndex, i: int, node: onnx.NodeProto) -> None:
    w_name, s_name = node.input[0], node.input[1]
    w, scale = g.const(w_name), g.const(s_name)
    label = node.name or node.output[0]
    if w is None or scale is None:
        raise ExportError(f"{label}: a blocked (INT4) quantizer must quantize a constant weight and have a constant "
                          "scale; TensorRT runs INT4 weight-only. Keep block_size for weight quantizers only")
    bs, qmin, qmax = (int(GraphIndex.attr(node, k)) for k in ("block_size", "qmin", "qmax"))
    if w.ndim != 2 or scale.ndim != 2 or w.shape[1] != scale.shape[1] * bs:
        raise ExportError(f"{label}: weight {w.shape} and block scale {scale.shape} do not match block_size {bs}")
    s32 = np.repeat(scale.astype(np.float32), bs, axis=1)
    codes = np.clip(np.rint(w.astype(np.float32) / s32), qmin, qmax).astype(np.int8)  # half to even
    out = node.output[0]
    uses = list(g.consumer_nodes(out))
    transposed = bool(uses) and not g.is_graph_output(out) and all(_reads_transposed(g, j, slot, n) for j, slot, n in uses)
    g.remove_node(i)
    scale_out = scale.T.copy() if transposed else scale
    codes_out = codes.T.copy() if transposed else codes
    q_name = g.add_initializer(_int4(codes_out, "w"), hint=f"{w_name}_int4")
    s_new = g.add_initializer(scale_out, hint=f"{s_name}_block")
    zp = g.add_initializer(_int4(np.zeros(scale_out.shape, np.int8), "zp"), hint=f"{w_name}_int4_zero_point")
    _, dqn = _qdq_names(node)
    dq_out = g.fresh(f"{w_name}_dq") if transposed else out
    dq = helper.make_node("DequantizeLinear", [q_name, s_new, zp], [dq_out], name=dqn,
                          axis=0 if transposed else 1, block_size=bs)
    dq.metadata_props.extend(node.metadata_props)
    g.add_node(dq)
    if transposed:
        for j, slot, n in uses:
            if n.op_type == "Transpose":
                g.replace_uses(n.output[0], dq_out)
                g.remove_node(j)
            else:  # Gemm(transB=1): read the [K, N] weight as is
                g.set_input(j, slot, dq_out)
                for a in n.attribute:
                    if a.name == "transB":
                        a.i = 0
    for name in (w_name, s_name):
        if name in g.initializers and not g.consumers.get(name):
            g.remove_initializer(name)


def _reads_transposed(g: GraphIndex, j: int, slot: int, n: onnx.NodeProto) -> bool:
    """Does this use read the weight as W^T (a [K, N] MatMul/Gemm operand)?"""
    if n.op_type == "Gemm" and slot == 1:
        return bool(g.attr(n, "transB", 0)) and not g.attr(n, "transA", 0)
    if n.op_type == "Transpose" and list(g.attr(n, "perm", [1, 0])) == [1, 0]:
        readers: List = list(g.consumer_nodes(n.output[0]))
        return bool(readers) and all(r.op_type == "MatMul" and s == 1 for _, s, r in readers)
    return False
