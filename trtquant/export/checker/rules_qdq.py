"""B. Rules on each Q/DQ node (B6-B16): dtypes, scales, zero points, axes, pairing."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto as TP

from trtquant.graph import ops
from trtquant.graph.index import GraphIndex, names_of

from .context import BIASED, HALF, INT4, QDQ, Ctx, dtype_name, fmt, param_diffs, rule
from .report import Finding

_FLOAT_IN = frozenset({TP.FLOAT, TP.FLOAT16, TP.BFLOAT16})
_QUANT_OK = frozenset({TP.INT8, TP.FLOAT8E4M3FN, TP.INT4, TP.FLOAT4E2M1})
_TINY_SCALE = 2.0**-24 * 127
_FP16_MIN_NORMAL = 2.0**-14


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


@rule("B6-dtype")
def _b6_dtype(ctx: Ctx) -> Iterator[Finding]:
    g = ctx.g
    for q in ctx.qdq.values():
        if q.is_q and q.fdtype is not None and q.fdtype not in _FLOAT_IN:
            yield Finding("error", "B6-dtype", (g.names[q.idx],),
                          f"QuantizeLinear {g.names[q.idx]!r} quantizes {q.x!r} of dtype {dtype_name(q.fdtype)}; "
                          "TensorRT quantizes only float32/float16/bfloat16 tensors",
                          f"quantize the float tensor before it is cast to {dtype_name(q.fdtype)}")
        if q.partner is not None or (q.is_q and not q.zp_name and not g.attr(q.node, "output_dtype", 0)):
            continue  # a DQ fed by a Q: the Q reports the dtype; a Q without zero point: B8
        dt = q.qdtype
        if dt is None or dt in _QUANT_OK:
            continue
        if dt == TP.INT32 and not q.is_q and all(
                s == 2 and n.op_type in BIASED for _, s, n, _ in ctx.uses(q.y)):
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
            msg = (f"{ctx.desc(q.idx)} has a {dtype_name(dt)} {what}; the TensorRT parser only allows int8, "
                   "fp8 (e4m3fn), int4 and fp4 (e2m1) quantized data")
            fix = "quantize to int8 (zero point 0, [-128, 127])"
        yield Finding("error", "B6-dtype", ctx.names(q.idx), msg, fix)


@rule("B7-scale")
def _b7_scale(ctx: Ctx) -> Iterator[Finding]:
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
                          f"({fmt(s[bad])}); TensorRT requires finite scales > 0",
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
        elif (q.fdtype in HALF or ctx.half) and (s < _FP16_MIN_NORMAL).any():
            yield Finding("warning", "B7-scale", q.names,
                          f"{d}: scale min {s.min():.3g} is below the FP16 minimum normal 6.1e-5 in an FP16 graph",
                          "keep this scale in float32 or raise amax; check the calibration of this tensor")
        if q.granularity == "channel" and (s == 1.0).any():
            yield Finding("warning", "B7-scale", q.names,
                          f"{d}: {int((s == 1.0).sum())} per-channel scale(s) are exactly 1.0, the export fallback "
                          "for amax 0 (all-zero or uncalibrated channels)",
                          "check that those channels are really zero; otherwise recalibrate the weights")


@rule("B8-zero-point")
def _b8_zero_point(ctx: Ctx) -> Iterator[Finding]:
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
                          f"{d}: zero point {q.zp_name!r} = {fmt(q.zp)} is not 0; TensorRT only supports "
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
                          f"{d}: output_dtype {dtype_name(out_dt)} differs from the zero-point dtype {dtype_name(zdt)}",
                          "make output_dtype and the zero-point dtype the same (int8)")


@rule("B9-scale-rank")
def _b9_scale_rank(ctx: Ctx) -> Iterator[Finding]:
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


@rule("B10-per-channel-activation")
def _b10_per_channel_activation(ctx: Ctx) -> Iterator[Finding]:
    for q in ctx.units:
        root = ctx.root(q)
        if q.granularity == "channel" and root and not ctx.g.is_const_rooted(root):
            yield Finding("error", "B10-per-channel-activation", q.names,
                          f"{ctx.desc(q.idx)} quantizes activation {root!r} per channel ({fmt(q.scale)}): TensorRT "
                          "has no per-channel activation quantization; per-channel scales are only accepted on "
                          "constant weights", "use a per-tensor (scalar) scale for activations")


@rule("B11-axis")
def _b11_axis(ctx: Ctx) -> Iterator[Finding]:
    opset = ctx.g.opset or 0
    for q in ctx.units:
        if q.granularity not in ("channel", "block"):
            continue
        d = ctx.desc(q.idx)
        if q.axis is None:
            if opset >= 13 and q.granularity == "channel":
                yield Finding("error", "B11-axis", q.names,
                              f"{d} is per-channel ({fmt(q.scale)}) without an explicit axis: ONNX defaults to "
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


@rule("B12-channel-axis")
def _b12_channel_axis(ctx: Ctx) -> Iterator[Finding]:
    g = ctx.g
    for q in ctx.qdq.values():
        if q.is_q or q.granularity != "channel" or q.axis is None or not q.rank or not -q.rank <= q.axis < q.rank:
            continue
        for ci, slot, node, axis in ctx.uses(q.y, q.axis % q.rank):
            rank = g.rank(node.input[slot])
            if slot != 1 or node.op_type not in ops.WEIGHTED or axis is None or rank is None:
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


@rule("B13-scalar")
def _b13_scalar(ctx: Ctx) -> Iterator[Finding]:
    for q in ctx.units:
        if q.rank == 0:
            extra = " and sets an axis attribute" if q.axis is not None else ""
            yield Finding("error", "B13-scalar", q.names,
                          f"{ctx.desc(q.idx)} quantizes the scalar (rank-0) tensor {q.x!r}{extra}; TensorRT does "
                          "not accept scalar Q/DQ inputs", "do not quantize scalars (or reshape to rank >= 1)")


@rule("B14-int4")
def _b14_int4(ctx: Ctx) -> Iterator[Finding]:
    for q in ctx.units:
        if q.qdtype not in INT4:
            continue
        d, problems = ctx.desc(q.idx), []
        if not ctx.g.is_const_rooted(ctx.root(q)):
            problems.append("INT4 is weight-only but the input is an activation")
        if q.shape and q.shape[-1] is not None and q.shape[-1] % 2:
            problems.append(f"the last dimension {q.shape[-1]} is odd")
        if q.block_size and q.rank and q.axis is not None and q.axis % q.rank < q.rank - 2:
            problems.append(f"the block axis {q.axis} is not one of the last two dimensions")
        if q.granularity != "block":
            problems.append(f"{q.granularity or 'unknown'} scales; TensorRT's INT4 needs per-block scales")
        elif q.block_size not in (64, 128):
            problems.append(f"block_size {q.block_size}; TensorRT supports INT4 blocks of 64 and 128")
        if problems:
            yield Finding("error", "B14-int4", q.names, f"{d}: " + "; ".join(problems),
                          "use INT4 only for constant 2-D weights with an even last dimension, blocked along "
                          "one of the last two axes")


@rule("B15-qdq-pairing")
def _b15_pairing(ctx: Ctx) -> Iterator[Finding]:
    g = ctx.g
    for q in ctx.qdq.values():
        name = g.names[q.idx]
        if q.is_q:
            other = [i for i, _, n in g.consumer_nodes(q.y) if n.op_type != ops.DQ]
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
            diffs = param_diffs(ctx.qdq[q.partner], q)
            yield Finding("warning", "B15-qdq-pairing", (g.names[q.partner], name),
                          f"QuantizeLinear {g.names[q.partner]!r} and DequantizeLinear {name!r} disagree: "
                          + "; ".join(diffs) + "; the pair no longer round-trips and TensorRT results differ",
                          "export each Q/DQ pair from one quantizer with identical scale, zero point and axis")


@rule("B16-double-qdq")
def _b16_double_qdq(ctx: Ctx) -> Iterator[Finding]:
    g = ctx.g
    by_input: dict[str, list[QDQ]] = defaultdict(list)
    for q in ctx.qdq.values():
        if q.is_q and q.x:
            by_input[q.x].append(q)
    for x, qs in by_input.items():
        if len(qs) > 1 and not g.is_const_rooted(x):
            yield Finding("warning", "B16-double-qdq", tuple(g.names[q.idx] for q in qs),
                          f"tensor {x!r} is quantized {len(qs)} times (scales {', '.join(fmt(q.scale) for q in qs)}): "
                          "per-consumer scales block TensorRT from sharing one INT8 tensor",
                          "quantize the tensor once and share its DequantizeLinear between the consumers")
    for q in ctx.qdq.values():
        if q.is_q and g.op_of(q.x) == ops.DQ:
            dq = g.producer[q.x]
            yield Finding("warning", "B16-double-qdq", (g.names[dq], g.names[q.idx]),
                          f"DequantizeLinear {g.names[dq]!r} feeds QuantizeLinear {g.names[q.idx]!r} directly: the "
                          "tensor is requantized (double Q/DQ) and TensorRT adds a needless rescale",
                          "drop the second Q/DQ pair (keep a single quantizer per tensor)")
