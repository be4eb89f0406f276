"""C. Placement rules on kernels and targets (C23-C26): small or GEMV layers that INT8 makes slower,
quantized biases, DLA limits."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from onnx import TensorProto as TP

from trtquant.graph import ops
from trtquant.graph.index import names_of

from .context import BIASED, FP8, Ctx, consumers_of, dtype_name, rule
from .report import Finding

_DLA_MAX_BATCH, _DLA_MAX_DIM = 4096, 8192


@rule("C23-small-channel-conv")
def _c23_small_channel_conv(ctx: Ctx) -> Iterator[Finding]:
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
            first = isinstance(ctx.dag.source(node.input[0])[0], str)  # reads a graph input
            fine = (group == 1 and (oc % 8 == 0 or ic % 8 == 0) and (first or oc >= 16 or ic >= 16)
                    and len(set(kernel)) == 1) or (group > 1 and oc % 8 == 0 and all(k >= 3 for k in kernel if k))
            if not fine:
                yield Finding("warning", "C23-small-channel-conv", (name,),
                              f"quantized Conv {name!r} has {ic} input / {oc} output channels (group {group}, kernel "
                              f"{kernel}): TensorRT has no fast INT8 kernel for so few channels",
                              f"leave {name!r} in float (remove its Q/DQ), or pad channels to a multiple of 8")
        dq = ctx.dq_of(w)
        if dq is not None and dq.qdtype in FP8 and int(np.prod([k for k in kernel if k])) > 32:
            yield Finding("warning", "C23-small-channel-conv", (name,),
                          f"FP8 Conv {name!r} has a {kernel} kernel (> 32 taps); TensorRT FP8 conv kernels are slow "
                          "for large filters", f"quantize {name!r} to INT8 or leave it in FP16")


@rule("C24-gemv")
def _c24_gemv(ctx: Ctx) -> Iterator[Finding]:
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


@rule("C25-quantized-bias")
def _c25_quantized_bias(ctx: Ctx) -> Iterator[Finding]:
    g = ctx.g
    for i, node in enumerate(g.nodes):
        if node.op_type not in BIASED or len(node.input) < 3:
            continue
        dq = ctx.dq_of(node.input[2])
        if dq is None:
            continue
        int32 = dq.qdtype == TP.INT32
        yield Finding("error" if int32 else "warning", "C25-quantized-bias", (*ctx.names(dq.idx), g.names[i]),
                      f"the bias of {node.op_type} {g.names[i]!r} is quantized ({ctx.desc(dq.idx)}, "
                      f"{dtype_name(dq.qdtype)}): "
                      + ("TensorRT cannot dequantize INT32 data (QOperator-style bias)" if int32 else
                         "TensorRT keeps biases in float and fuses them into the Conv; quantizing them loses accuracy"),
                      f"feed {g.names[i]!r} a float bias initializer (no Q/DQ on the bias)")


@rule("C26-dla")
def _c26_dla(ctx: Ctx) -> Iterator[Finding]:
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
    bare = [i for i, n in enumerate(g.nodes) if n.op_type not in ops.QDQ | {"Constant"}
            and any(t and t not in covered and not consumers_of(ctx, t, frozenset({ops.Q})) for t in n.output)]
    if bare:
        yield Finding("info", "C26-dla", names_of(g, bare),
                      f"{len(bare)} node output(s) have no Q/DQ scale: in implicit INT8 every tensor needs a dynamic "
                      "range, so these run in FP16 (or fall back to the GPU, silently)",
                      "add scales for these tensors (calibrate the whole network for DLA)")
