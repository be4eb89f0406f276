"""A. Model-level rules (A0, A1-unknown-rank, A2-A5): opset, op formats, domains, precision."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from onnx import TensorProto as TP

from trtquant.graph import ops
from trtquant.graph.index import is_default_domain, names_of

from .context import FP8, HALF, INT4, QDQ, Ctx, rule
from .report import Finding

#: Highest default-domain opset per target (TensorRT 10.0 parses 9-20; later limits unconfirmed).
#: trt10: 10.0's parser accepts opsets 9-20 (onnx-tensorrt docs/operators.md); its INT4 needed trt::DequantizeLinear.
#: trt11: the parser builds with ONNX 1.17 (opset 22) since 10.6 (onnx-tensorrt changelog), and ModelOpt
#: exports FP8/INT4 Q/DQ at opset 21 for it.
MAX_OPSET: dict[str, int] = {"trt10": 20, "trt11": 22, "dla": 20}

#: QOperator-format ops (the TensorRT parser rejects them; it reads only Q/DQ).
_QOPERATOR = frozenset({"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"})
_MS_QOPERATOR = frozenset({"QGemm", "QAttention", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                           "DynamicQuantizeLSTM", "QEmbedLayerNormalization", ops.Q, ops.DQ})


@rule("A0-no-qdq")
def _a0_no_qdq(ctx: Ctx) -> Iterator[Finding]:
    if ctx.qdq or any(n.op_type in _QOPERATOR | _MS_QOPERATOR or n.domain == "trt" for n in ctx.g.nodes):
        return
    weighted = names_of(ctx.g, [i for i, _ in ctx.weighted()])
    yield Finding("info", "A0-no-qdq", weighted,
                  "no Q/DQ nodes: TensorRT will build this in float (FP32/TF32, or FP16 from an FP16 export)",
                  "quantize and calibrate the model, then export with Q/DQ on the Conv/Gemm/MatMul inputs")


@rule("A1-unknown-rank")
def _a1_unknown_rank(ctx: Ctx) -> Iterator[Finding]:
    if not ctx.shapes_ok:
        return  # the A1 finding already explains why shapes are missing
    for q in ctx.units:
        if q.x and q.rank is None:
            yield Finding("error", "A1-unknown-rank", q.names,
                          f"{ctx.desc(q.idx)}: the rank of input {q.x!r} is unknown after shape inference; "
                          "TensorRT needs it to place the per-tensor/per-channel scale",
                          "give the graph inputs static ranks (export with example inputs) and rerun shape inference")


@rule("A2-opset")
def _a2_opset(ctx: Ctx) -> Iterator[Finding]:
    opset, top = ctx.g.opset, MAX_OPSET[ctx.target]
    if opset is None:
        yield Finding("error", "A2-opset", (), "the model imports no default-domain (ai.onnx) opset",
                      "export with an explicit opset (13-20 for TensorRT 10.x)")
        return
    if opset > top:
        yield Finding("error", "A2-opset", (),
                      f"opset {opset} is above {top}, the highest default-domain opset the TensorRT ONNX parser is "
                      f"known to accept for target {ctx.target} (10.0 accepts 9-20; parsers built with ONNX 1.17, 10.6 "
                      "and later, read up to 22: use target 'trt11' for them)",
                      f"export with opset_version={min(top, 17)} (e.g. torch.onnx.export(..., opset_version=17))")
    groups: list[tuple[int, Callable[[QDQ], bool], str]] = [
        (13, lambda q: q.granularity in ("channel", "block"), "per-channel scales (the axis attribute)"),
        (19, lambda q: ctx.g.dtype(q.scale_name) in HALF or q.qdtype in FP8, "FP16/BF16 scales or FP8 data"),
        (21, lambda q: q.qdtype in INT4 | {TP.FLOAT4E2M1} or bool(q.block_size)
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


@rule("A3-qoperator")
def _a3_qoperator(ctx: Ctx) -> Iterator[Finding]:
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


@rule("A4-trt-domain")
def _a4_trt_domain(ctx: Ctx) -> Iterator[Finding]:
    hit = [i for i, n in enumerate(ctx.g.nodes) if n.domain == "trt"]
    if hit:
        yield Finding("info", "A4-trt-domain", names_of(ctx.g, hit),
                      f"{len(hit)} trt:: node(s) (e.g. TRT_FP8QuantizeLinear, INT4 trt::DequantizeLinear): TensorRT "
                      "parses them but onnxruntime cannot run them, so there is no ORT parity check",
                      "validate these layers on TensorRT itself (engine outputs vs the PyTorch fake-quant model)")


@rule("A5-fp32-graph")
def _a5_fp32_graph(ctx: Ctx) -> Iterator[Finding]:
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
