"""The export-time Q/DQ op: ``torch.ops.trtquant.qdq`` -> ONNX QuantizeLinear -> DequantizeLinear.

During export each quantizer calls this op with its constant float32 scale and zero point, so
both exporters write exactly the scale the fake-quant model used: the TorchScript exporter through
a registered symbolic, the dynamo exporter through a custom translation (the op's fake
implementation also lets torch.export keep a dynamic batch dimension).
"""

from __future__ import annotations

import torch
from torch import Tensor

_OPSET_MIN = 13  # per-channel axis


@torch.library.custom_op("trtquant::qdq", mutates_args=())
def qdq(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, qmin: int, qmax: int) -> Tensor:
    s = scale.to(torch.float32)
    if scale.dim() == 1:
        shape = [1] * x.dim()
        shape[axis] = -1
        s = s.reshape(shape)
    out = torch.div(x.float(), s).round_().clamp_(qmin, qmax).mul_(s)
    return out.to(x.dtype)


@qdq.register_fake
def _(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, qmin: int, qmax: int) -> Tensor:
    return torch.empty_like(x)


def _symbolic(g, x, scale, zero_point, axis, qmin, qmax):
    from torch.onnx.symbolic_helper import _get_const

    axis_v = _get_const(axis, "i", "axis")
    kwargs = {"axis_i": axis_v} if axis_v >= 0 else {}
    q = g.op("QuantizeLinear", x, scale, zero_point, **kwargs)
    return g.op("DequantizeLinear", q, scale, zero_point, **kwargs)


def register_legacy_symbolic(opset: int) -> None:
    """Register the TorchScript-exporter symbolic for every opset we export (idempotent, ~0.2 ms).

    Registered on every legacy export rather than remembered in a module flag: torch's symbolic
    registry is the one record of it, and re-registering the same function is harmless.
    """
    for v in range(_OPSET_MIN, 24):
        torch.onnx.register_custom_op_symbolic("trtquant::qdq", _symbolic, v)
    register_legacy_placeholders(opset)


def dynamo_translation_table() -> dict:
    """Custom translation for torch.onnx.export(dynamo=True); axis -1 marks a per-tensor quantizer."""
    from onnxscript import opset18 as op

    def translate(x, scale, zero_point, axis: int, qmin: int, qmax: int):
        if axis < 0:
            return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)
        q = op.QuantizeLinear(x, scale, zero_point, axis=axis)
        return op.DequantizeLinear(q, scale, zero_point, axis=axis)

    return {torch.ops.trtquant.qdq.default: translate, **dynamo_placeholder_table()}


# -- FP8 E4M3 and blocked INT4: custom-domain placeholders, lowered by graph_passes.lower_trtquant_qdq --------
#
# Both exporters write these as one ``trtquant::FP8QDQ`` / ``trtquant::BlockQDQ`` node; the lowering pass
# turns them into standard opset-19/21 QuantizeLinear/DequantizeLinear (FP8 zero point float8e4m3fn 0;
# INT4 weights pre-quantized to an int4 initializer with a blocked DequantizeLinear). One lowering for
# both exporters keeps float8/int4 tensor construction out of TorchScript and onnxscript.

DOMAIN = "trtquant"
FP8_OP = "FP8QDQ"
BLOCK_OP = "BlockQDQ"


@torch.library.custom_op("trtquant::qdq_fp8", mutates_args=())
def qdq_fp8(x: Tensor, scale: Tensor) -> Tensor:
    """FP8 E4M3 Q/DQ with a per-tensor scale: saturate(x / scale) cast to E4M3 (ties to even), times scale."""
    from ..functional import fp8_round

    s = scale.to(torch.float32)
    return (fp8_round(x.float() / s, (4, 3)) * s).to(x.dtype)


@qdq_fp8.register_fake
def _(x: Tensor, scale: Tensor) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("trtquant::qdq_block", mutates_args=())
def qdq_block(x: Tensor, scale: Tensor, block_size: int, qmin: int, qmax: int) -> Tensor:
    """Integer Q/DQ of a 2-D weight in blocks of ``block_size`` along its last dimension; scale (rows, blocks)."""
    s = scale.to(torch.float32).repeat_interleave(block_size, dim=1)
    return (torch.div(x.float(), s).round_().clamp_(qmin, qmax).mul_(s)).to(x.dtype)


@qdq_block.register_fake
def _(x: Tensor, scale: Tensor, block_size: int, qmin: int, qmax: int) -> Tensor:
    return torch.empty_like(x)


def _symbolic_fp8(g, x, scale):
    out = g.op(f"{DOMAIN}::{FP8_OP}", x, scale)
    out.setType(x.type())  # the exporter's shape inference cannot see into a custom-domain op
    return out


def _symbolic_block(g, x, scale, block_size, qmin, qmax):
    from torch.onnx.symbolic_helper import _get_const

    out = g.op(f"{DOMAIN}::{BLOCK_OP}", x, scale, block_size_i=_get_const(block_size, "i", "block_size"),
               qmin_i=_get_const(qmin, "i", "qmin"), qmax_i=_get_const(qmax, "i", "qmax"))
    out.setType(x.type())
    return out


def register_legacy_placeholders(opset: int) -> None:
    """TorchScript symbolics of the FP8 and blocked Q/DQ placeholders (idempotent)."""
    for v in range(_OPSET_MIN, 24):
        torch.onnx.register_custom_op_symbolic("trtquant::qdq_fp8", _symbolic_fp8, v)
        torch.onnx.register_custom_op_symbolic("trtquant::qdq_block", _symbolic_block, v)


def _schema(name: str, int_attrs: tuple):
    """An OpSchema for a placeholder (onnxscript builds custom-domain nodes only from a schema)."""
    from onnx.defs import OpSchema

    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    return OpSchema(
        name, DOMAIN, 1, doc="trtquant export placeholder, lowered to QuantizeLinear/DequantizeLinear",
        inputs=[OpSchema.FormalParameter("x", "T"), OpSchema.FormalParameter("scale", "S")],
        outputs=[OpSchema.FormalParameter("y", "T")],
        type_constraints=[("T", floats, "input and output"), ("S", floats, "scale")],
        attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, a) for a in int_attrs])


def dynamo_placeholder_table() -> dict:
    """Custom translations of the placeholders for torch.onnx.export(dynamo=True)."""
    from onnxscript import values

    custom = values.Opset(DOMAIN, 1)
    fp8_op = values.Op(custom, FP8_OP, _schema(FP8_OP, ()))
    block_op = values.Op(custom, BLOCK_OP, _schema(BLOCK_OP, ("block_size", "qmin", "qmax")))

    def fp8(x, scale):
        return fp8_op(x, scale)

    def block(x, scale, block_size: int, qmin: int, qmax: int):
        return block_op(x, scale, block_size=block_size, qmin=qmin, qmax=qmax)

    return {torch.ops.trtquant.qdq_fp8.default: fp8, torch.ops.trtquant.qdq_block.default: block}
