"""export_onnx(): a calibrated model -> Q/DQ ONNX that TensorRT fuses.

Weights: initializer -> QuantizeLinear -> DequantizeLinear (or int8 initializer -> DequantizeLinear
with ``weights='dq_only'``); activations: Q -> DQ per tensor; ``axis`` always written on per-channel
nodes; zero points int8 0. ``dtype='fp16'`` writes FP16 weights, scales and float math, because
strongly typed TensorRT takes precision from the graph (FP16 scales need opset 19, so the opset is
raised to 19 there).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..calib_cache import atomic_write_bytes
from ..convert import name_quantizers
from ..errors import ExportError
from ..quantizer import TensorQuantizer

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ExportResult:
    path: Path
    opset: int
    exporter: str
    dtype: str
    num_qdq: int
    input_names: List[str] = field(default_factory=list)
    output_names: List[str] = field(default_factory=list)


@contextlib.contextmanager
def export_mode(model: nn.Module, dtype: torch.dtype = torch.float32) -> Iterator[None]:
    """Quantizers emit torch.ops.trtquant.qdq with constant scales; restored on exit."""
    name_quantizers(model)
    active = [q for q in model.modules() if isinstance(q, TensorQuantizer) and q.is_enabled and q._if_quant]
    missing = [q.name or "?" for q in active if q.amax is None]
    if missing:
        raise ExportError(
            f"{len(missing)} quantizer(s) have no amax: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}; "
            "run trtquant.calibrate (or load a calibrated checkpoint) before export, or disable them"
        )
    scale_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
    try:
        for q in active:
            scale, zp, axis = q.export_constants(scale_dtype)
            info = torch.iinfo(zp.dtype)
            # Narrow range is exported as the full int8 range with the same scale (exporters reject [-127, 127]).
            q._export = (scale, zp, axis, info.min, info.max, scale_dtype)
        yield
    finally:
        for q in active:
            q._export = None


def ort_flavor_(model: nn.Module) -> nn.Module:
    """Turn on the observe-only quantizers that the ONNX Runtime INT8 graph also quantizes (in place)."""
    missing = []
    for name, q in model.named_modules():
        if isinstance(q, TensorQuantizer) and q.ort_only and q.is_enabled:
            if q.amax is None:
                missing.append(name)
            q.enable_quant()
    if missing:
        raise ExportError(f"the ONNX Runtime graph needs amax for {', '.join(missing[:10])}: calibrate the model "
                          "after trtquant.quantize (these observe-only quantizers calibrate with the others)")
    _emulate_int32_bias_(model)
    return model


def _emulate_int32_bias_(model: nn.Module) -> None:
    """Make this (exported) copy compute what the ONNX Runtime INT8 graph computes, op for op.

    That graph folds BatchNorm into the int8 weight codes (codes * sign(g), scale * |g|) and adds
    biases as int32 codes of s_in * s_w. Here each Conv+BN becomes one conv with those folded weights
    and the rounded bias (BN -> Identity), and Linear biases are rounded the same way.

    export_onnx(target='onnxruntime') exports this copy, so the folded weight must stay a per-channel
    weight Q/DQ: the weight quantizer stays enabled with an amax whose scale is the folded one, and the
    weight is codes * that scale (fake quant returns it unchanged). The graph rewrite then finds no BN
    and re-derives the same int8 codes and int32 bias codes, exactly; with the weight quantizer
    disabled the graph would carry float weights, which ONNX Runtime re-quantizes per tensor itself.
    """
    import numpy as np

    from ..functional import amax_to_scale, quant_bounds
    from ..nn.base import QuantMixin
    from ..placement.fx_pass import _QuantTracer
    from .ort_graph import fold_bn_scale, int32_bias

    try:
        graph = _QuantTracer().trace(model)
    except Exception:
        return
    modules = dict(model.named_modules())
    for n in graph.nodes:
        layer = modules.get(str(n.target)) if n.op == "call_module" else None
        if not isinstance(layer, QuantMixin) or not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        iq, wq = layer.input_quantizer, layer.weight_quantizer
        if not (iq.is_enabled and iq._if_quant and wq.is_enabled and wq._if_quant) or iq.amax is None or wq.amax is None \
                or not wq.quant_desc.per_channel or iq.quant_desc.per_channel:
            continue
        s_in = float(amax_to_scale(iq.amax, quant_bounds(8, iq.unsigned)[2]).reshape(()))
        s_w = amax_to_scale(wq.amax, 127).reshape(-1).cpu().numpy()
        users = list(n.users)
        bn_name = str(users[0].target) if len(users) == 1 and users[0].op == "call_module" else None
        bn = modules.get(bn_name) if bn_name else None
        w = layer.weight.detach().cpu().float()
        if isinstance(bn, nn.BatchNorm2d) and isinstance(layer, nn.Conv2d):
            qmin, qmax, bound = quant_bounds(wq.num_bits, wq.unsigned, wq.narrow_range)
            shape = [-1] + [1] * (w.dim() - 1)
            with torch.no_grad():
                w_fq = wq(layer.weight.detach()).cpu().float()  # the fake-quant weight the model uses
                codes = torch.round(w_fq / torch.from_numpy(s_w).reshape(shape))
            bias0 = None if layer.bias is None else layer.bias.detach().cpu().numpy()
            s_f, b_f, sign = fold_bn_scale(s_w, bn.weight.detach().cpu().numpy(), bn.bias.detach().cpu().numpy(),
                                           bn.running_mean.cpu().numpy(), bn.running_var.cpu().numpy(), bn.eps, bias0)
            # amax whose float32 scale (amax / bound) is s_f; where no float32 amax hits s_f exactly, the
            # nearest reachable scale is used on both sides (the graph exports this quantizer's scale).
            amax_f = _amax_for_scales(torch.from_numpy(s_f), bound)
            s_f = amax_to_scale(amax_f, bound).numpy()
            folded_codes = (codes * torch.from_numpy(sign.astype(np.float32)).reshape(shape)).clamp_(qmin, qmax)
            folded = folded_codes * torch.from_numpy(s_f).reshape(shape)
            b_codes, s_b = int32_bias(b_f, s_in, s_f)
            with torch.no_grad():
                layer.weight.data = folded.to(layer.weight.device)
                bias = torch.from_numpy(b_codes.astype(np.float32) * s_b).to(layer.weight.device)
                if layer.bias is None:
                    layer.bias = nn.Parameter(bias)
                else:
                    layer.bias.data = bias
                wq.amax = amax_f.reshape(wq.amax.shape)
            layer._wq_cache = None
            parent, _, child = bn_name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
        elif layer.bias is not None and isinstance(layer, nn.Linear):
            b_codes, s_b = int32_bias(layer.bias.detach().cpu().numpy(), s_in, s_w)
            with torch.no_grad():
                layer.bias.copy_(torch.from_numpy(b_codes.astype(np.float32) * s_b))


def _amax_for_scales(scale: torch.Tensor, bound: int) -> torch.Tensor:
    """float32 amax per element with amax_to_scale(amax, bound) == scale where one exists, else the nearest."""
    from ..functional import amax_to_scale

    target = scale.to(torch.float32)
    amax = target * bound
    for _ in range(4):
        got = amax_to_scale(amax, bound)
        step = torch.where(got < target, torch.full_like(amax, float("inf")), torch.full_like(amax, -float("inf")))
        amax = torch.where(got == target, amax, torch.nextafter(amax, step))
    # Among the candidates around the target keep the one whose scale is closest (exact where reachable).
    cands = torch.stack([torch.nextafter(amax, torch.full_like(amax, -float("inf"))), amax,
                         torch.nextafter(amax, torch.full_like(amax, float("inf")))])
    err = (amax_to_scale(cands, bound).double() - target.double()).abs()
    return cands.gather(0, err.argmin(0, keepdim=True)).squeeze(0)


def _as_tuple(example_inputs: Any) -> Tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: Union[str, os.PathLike],
    opset: int = 17,
    dtype: str = "fp32",
    dynamic_batch: bool = True,
    exporter: str = "dynamo",
    weights: str = "qdq",
    input_names: Optional[Sequence[str]] = None,
    output_names: Optional[Sequence[str]] = None,
    target: str = "tensorrt",
) -> ExportResult:
    """Export a calibrated, quantized model to Q/DQ ONNX for TensorRT.

    Args:
        model: the quantized model (left untouched: a copy is exported).
        example_inputs: a tensor or tuple of tensors with the deployment shape.
        path: where to write the .onnx (atomically).
        opset: ONNX opset, >= 13; 'dynamo' raises it to 18, fp16/bf16 to 19.
        dtype: 'fp32', 'fp16' or 'bf16' for weights, scales and non-quantized math.
        dynamic_batch: make dimension 0 of every input and output dynamic.
        exporter: 'dynamo' (torch.export based, PyTorch's default) or 'legacy' (TorchScript).
        weights: 'qdq' (float initializer -> Q -> DQ) or 'dq_only' (int8 initializer -> DQ).
        target: 'tensorrt' (Q/DQ on layer inputs, the TensorRT artifact) or 'onnxruntime' (the graph
            ONNX Runtime's CPU provider runs with INT8 kernels, from the same calibration; fp32 only).
    """
    if target not in ("tensorrt", "onnxruntime"):
        raise ValueError(f"target must be 'tensorrt' or 'onnxruntime', got {target!r}")
    if target == "onnxruntime" and dtype != "fp32":
        raise ValueError("target='onnxruntime' writes an fp32 graph with INT8 kernels; use dtype='fp32'")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if exporter not in ("dynamo", "legacy"):
        raise ValueError(f"exporter must be 'dynamo' or 'legacy', got {exporter!r}")
    if weights not in ("qdq", "dq_only"):
        raise ValueError(f"weights must be 'qdq' or 'dq_only', got {weights!r}")
    if opset < 13:
        raise ValueError(f"opset {opset} is too old: per-channel QuantizeLinear needs opset >= 13")
    torch_dtype = _DTYPES[dtype]
    want = opset
    if dtype != "fp32":
        opset = max(opset, 19)
    if exporter == "dynamo":
        opset = max(opset, 18)
    if opset != want:
        logger.info("opset raised from %d to %d (%s)", want, opset, "fp16/bf16 scales" if dtype != "fp32" else "dynamo exporter")

    path = Path(path)
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in _as_tuple(example_inputs))
    work = copy.deepcopy(model).eval()
    if target == "onnxruntime":
        ort_flavor_(work)
    if torch_dtype != torch.float32:
        work = work.to(torch_dtype)
        args = tuple(a.to(torch_dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    if dynamic_batch:
        args = tuple(_at_least_batch2(a) for a in args)
    with torch.no_grad():
        outputs = work(*args)
    outs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    in_names = list(input_names) if input_names else (["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))])
    out_names = list(output_names) if output_names else (["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))])

    try:
        with export_mode(work, torch_dtype), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "legacy":
                proto = _export_legacy(work, args, opset, dynamic_batch, in_names, out_names)
            else:
                proto = _export_dynamo(work, args, opset, dynamic_batch, in_names, out_names)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"torch.onnx export ({exporter}) of {type(model).__name__} failed: {e}") from e

    from .graph_passes import dedupe_qdq, fold_weight_quantize, name_qdq_nodes, reduce_mean_to_global_pool

    dedupe_qdq(proto)
    reduce_mean_to_global_pool(proto)  # rewrites only inputs shape inference proves 4-D
    if target == "onnxruntime":
        from .ort_graph import to_onnxruntime_graph

        to_onnxruntime_graph(proto)
    name_qdq_nodes(proto)
    if weights == "dq_only":
        fold_weight_quantize(proto)
    data = proto.SerializeToString()
    if len(data) > 2_000_000_000:
        raise ExportError(f"{path}: model exceeds the 2 GB protobuf limit; external data export is not supported yet")
    atomic_write_bytes(path, data)
    n_qdq = sum(1 for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    return ExportResult(path, opset, exporter, dtype, n_qdq, in_names, out_names)


def _at_least_batch2(a: Any) -> Any:
    # torch.export specialises a dimension of size 1; a batch of 2 keeps it symbolic.
    if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == 1:
        return a.expand(2, *a.shape[1:]).contiguous()
    return a


def _export_legacy(model, args, opset, dynamic_batch, in_names, out_names):
    import io

    import onnx

    from .qdq_op import register_legacy_symbolic

    register_legacy_symbolic(opset)
    axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic_batch else None
    buf = io.BytesIO()
    torch.onnx.export(model, args, buf, dynamo=False, opset_version=opset, input_names=in_names,
                      output_names=out_names, dynamic_axes=axes, do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


def _export_dynamo(model, args, opset, dynamic_batch, in_names, out_names):
    from .qdq_op import dynamo_translation_table

    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=65536)
        shapes = tuple({0: batch} if isinstance(a, torch.Tensor) else None for a in args)
    program = torch.onnx.export(model, args, dynamo=True, opset_version=opset, input_names=in_names,
                                output_names=out_names, dynamic_shapes=shapes,
                                custom_translation_table=dynamo_translation_table(), optimize=True, verbose=False)
    return program.model_proto
