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
from ..outputs import flatten_outputs, onnx_output_names
from ..quantizer import ExportMode, TensorQuantizer
from .lower_formats import FP8_OPSET, INT4_OPSET, lower_trtquant_qdq
from .ort_flavor import ort_flavor_

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
    """Each active quantizer gets an :class:`~trtquant.quantizer.ExportMode` (it then emits
    torch.ops.trtquant.qdq with constant scales); every one is reset on exit, also after an error."""
    name_quantizers(model)
    active = [q for q in model.modules() if isinstance(q, TensorQuantizer) and q.is_enabled and q._if_quant]
    missing = [q.name or "?" for q in active if q.amax is None]
    if missing:
        raise ExportError(
            f"{len(missing)} quantizer(s) have no amax: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}; "
            "run trtquant.calibrate (or load a calibrated checkpoint) before export, or disable them"
        )
    unsupported = [p for p in (q.export_format_problem() for q in active) if p]
    if unsupported:  # num_bits other than 8 (fake-quant only): name every such layer at once
        raise ExportError(f"{len(unsupported)} quantizer(s) cannot be exported: " + "; ".join(unsupported[:10]))
    scale_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
    # Narrow range is exported as the full int8 range with the same scale (exporters reject [-127, 127]).
    modes = {q: ExportMode.of(q, scale_dtype) for q in active}  # all computed before any is set
    try:
        for q, mode in modes.items():
            q.export_mode = mode
        yield
    finally:
        for q in active:
            q.export_mode = None


def _formats(model: nn.Module) -> set:
    """The export formats of the active quantizers: 'int8', 'fp8', 'int4' (blocked weights)."""
    out = set()
    for q in model.modules():
        if isinstance(q, TensorQuantizer) and q.is_enabled and q._if_quant:
            d = q.quant_desc
            out.add("fp8" if d.is_fp8 else "int4" if d.block_size is not None else "int8")
    return out


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
    ort_weights: str = "auto",
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
        input_names: ONNX input names; default 'input' (one input) or 'input_0', 'input_1', ...
        output_names: one ONNX output name per tensor leaf of the model's output, in
            :func:`trtquant.outputs.flatten_outputs` order; default the leaf names ('output' for one
            tensor, 'out'/'aux' for a segmentation dict, 'output_0', 'output_1' for a tuple).
        target: 'tensorrt' (Q/DQ on layer inputs, the TensorRT artifact) or 'onnxruntime' (the graph
            ONNX Runtime's CPU provider runs with INT8 kernels, from the same calibration; fp32 only).
        ort_weights: weight codes of the ONNX Runtime graph: 'int8' (zero point 0; fastest where the
            CPU has VNNI), 'uint8' (zero point 128, the same grid; exact on every CPU) or 'auto' (uint8
            on an x86-64 CPU without VNNI, whose u8s8 kernels saturate, else int8). See
            :func:`trtquant.export.ort_graph.host_weight_dtype`.
    """
    if target not in ("tensorrt", "onnxruntime"):
        raise ValueError(f"target must be 'tensorrt' or 'onnxruntime', got {target!r}")
    if ort_weights not in ("auto", "int8", "uint8"):
        raise ValueError(f"ort_weights must be 'auto', 'int8' or 'uint8', got {ort_weights!r}")
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
    formats = _formats(model)
    if target == "onnxruntime" and formats - {"int8"}:
        raise ValueError(f"target='onnxruntime' writes ONNX Runtime's INT8 kernel graph, but the model also quantizes to "
                         f"{', '.join(sorted(formats - {'int8'}))}: export FP8/INT4 with target='tensorrt' (ONNX "
                         "Runtime runs that graph's Q/DQ too; trtquant.compare checks it)")
    want = opset
    if dtype != "fp32":
        opset = max(opset, 19)
    if exporter == "dynamo":
        opset = max(opset, 18)
    if "fp8" in formats:
        opset = max(opset, FP8_OPSET)
    if "int4" in formats:
        opset = max(opset, INT4_OPSET)
    if opset != want:
        logger.info("opset raised from %d to %d (%s)", want, opset, "fp16/bf16 scales, FP8/INT4 or the dynamo exporter")

    path = Path(path)
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in _as_tuple(example_inputs))
    work = copy.deepcopy(model).eval()
    if target == "onnxruntime":
        ort_flavor_(work, args)
    if torch_dtype != torch.float32:
        work = work.to(torch_dtype)
        args = tuple(a.to(torch_dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    if dynamic_batch:
        args = tuple(_at_least_batch2(a) for a in args)
    with torch.no_grad():
        outputs = work(*args)
    in_names = list(input_names) if input_names else (["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))])
    out_names = _output_names(model, outputs, output_names)

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

    if len(proto.graph.output) != len(out_names):
        raise ExportError(f"torch.onnx ({exporter}) wrote {len(proto.graph.output)} output(s) for the {len(out_names)} "
                          f"tensor(s) {type(model).__name__} returns ({', '.join(out_names)}); return each tensor once")
    lower_trtquant_qdq(proto)  # FP8 / blocked INT4 placeholders -> standard Q/DQ
    dedupe_qdq(proto)
    reduce_mean_to_global_pool(proto)  # rewrites only inputs shape inference proves 4-D
    if target == "onnxruntime":
        from .ort_graph import WEIGHTS_KEY, host_weight_dtype, to_onnxruntime_graph

        weight_dtype = host_weight_dtype() if ort_weights == "auto" else ort_weights
        to_onnxruntime_graph(proto, weight_dtype=weight_dtype)
        proto.metadata_props.add(key=WEIGHTS_KEY, value=weight_dtype)
    name_qdq_nodes(proto)
    from .compare import TARGET_KEY

    proto.metadata_props.add(key=TARGET_KEY, value=target)
    if weights == "dq_only":
        fold_weight_quantize(proto)
    data = proto.SerializeToString()
    if len(data) > 2_000_000_000:
        raise ExportError(f"{path}: model exceeds the 2 GB protobuf limit; external data export is not supported yet")
    atomic_write_bytes(path, data)
    n_qdq = sum(1 for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    return ExportResult(path, opset, exporter, dtype, n_qdq, in_names, out_names)


def _output_names(model: nn.Module, outputs: Any, given: Optional[Sequence[str]]) -> List[str]:
    """One ONNX output name per tensor leaf of ``outputs`` (torch.onnx flattens them in the same
    order): ``given`` when passed, else the leaf names ('out'/'aux' for a segmentation dict)."""
    try:
        leaves = [name for name, _ in flatten_outputs(outputs)]
    except TypeError as e:
        raise ExportError(f"{type(model).__name__}: {e}") from e
    if not leaves:
        raise ExportError(f"{type(model).__name__} returned no tensor ({type(outputs).__name__}): nothing to export")
    if not given:
        return onnx_output_names(outputs)
    if len(given) != len(leaves):
        raise ValueError(f"output_names has {len(given)} name(s) but {type(model).__name__} returns {len(leaves)} "
                         f"tensor(s) ({', '.join(leaves)}); pass one name per tensor, in that order, or none")
    return list(given)


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
