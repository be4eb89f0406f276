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
    for v in range(_OPSET_MIN, 22):
        torch.onnx.register_custom_op_symbolic("trtquant::qdq", _symbolic, v)


def dynamo_translation_table() -> dict:
    """Custom translation for torch.onnx.export(dynamo=True); axis -1 marks a per-tensor quantizer."""
    from onnxscript import opset18 as op

    def translate(x, scale, zero_point, axis: int, qmin: int, qmax: int):
        if axis < 0:
            return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)
        q = op.QuantizeLinear(x, scale, zero_point, axis=axis)
        return op.DequantizeLinear(q, scale, zero_point, axis=axis)

    return {torch.ops.trtquant.qdq.default: translate}
