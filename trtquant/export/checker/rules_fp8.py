"""FP8 E4M3 rules (A6, B17, C28): what TensorRT's FP8 kernels need beyond the INT8 rules.

Sources: TensorRT "Quantization Schemes" (FP8 ``castToFp8(clip(x / s, -448, 448))`` with a scalar
FP16/FP32 scale; INT4 per-block only, block sizes 64 and 128), "Working with Quantized Types" (FP8
for activations and weights, Ada/Hopper and later), TensorRT-RTX's "FP8 is only supported for
matrix multiplications", ModelOpt's ONNX FP8 recipe (Q/DQ on Conv/Gemm/MatMul inputs only,
``--high_precision_dtype fp16`` by default). See docs/formats.md.
"""

from __future__ import annotations

from collections.abc import Iterator

from onnx import TensorProto as TP

from .context import FP8, Ctx, rule
from .report import Finding

#: Ops TensorRT runs with FP8 inputs (GEMM and convolution kernels; attention BMMs are MatMuls).
FP8_KERNEL_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})


def _fp8_dqs(ctx: Ctx):
    return [q for q in ctx.qdq.values() if not q.is_q and q.qdtype in FP8]


@rule("A6-fp8-fp32-graph")
def _a6_fp8_fp32_graph(ctx: Ctx) -> Iterator[Finding]:
    if not _fp8_dqs(ctx) or ctx.half:
        return
    yield Finding("warning", "A6-fp8-fp32-graph", (),
                  "the graph has FP8 Q/DQ but no float16/bfloat16 tensor: TensorRT's FP8 GEMM/conv kernels produce "
                  "FP16/BF16, and a strongly typed FP32 graph keeps every other layer (and the dequantized outputs) "
                  "in FP32, which costs most of FP8's speed",
                  "export with dtype='fp16' (or 'bf16'): the high-precision type ModelOpt uses for FP8 by default")


@rule("B17-fp8-scale")
def _b17_fp8_scale(ctx: Ctx) -> Iterator[Finding]:
    for q in ctx.units:
        if q.qdtype not in FP8 or q.granularity in (None, "tensor"):
            continue
        const = ctx.g.is_const_rooted(ctx.root(q))
        yield Finding("warning" if const else "error", "B17-fp8-scale", q.names,
                      f"{ctx.desc(q.idx)}: FP8 with {q.granularity} scales; TensorRT's FP8 scheme takes one scalar "
                      f"scale per tensor{'' if const else ' and never per-channel activations'}",
                      "quantize FP8 per tensor (QuantDescriptor(num_bits=(4, 3)) with axis=None)")


@rule("C28-fp8-fusion", "C28-fp8-mixed")
def _c28_fp8_fusion(ctx: Ctx) -> Iterator[Finding]:
    g = ctx.g
    for dq in _fp8_dqs(ctx):
        for i, slot, node, _ in ctx.uses(dq.y):
            if node.op_type in FP8_KERNEL_OPS:
                if slot > 1:
                    continue
                other = ctx.dq_of(node.input[1 - slot]) if len(node.input) > 1 else None
                if other is not None and other.qdtype not in FP8:
                    yield Finding("error", "C28-fp8-mixed", (g.names[dq.idx], g.names[other.idx], g.names[i]),
                                  f"{node.op_type} {g.names[i]!r} reads FP8 and {'INT4' if other.qdtype in (TP.INT4,) else 'INT8'} "
                                  "inputs; TensorRT has no kernel mixing them",
                                  "quantize both inputs of the layer to the same format (FP8 E4M3 or INT8)")
                continue
            yield Finding("warning", "C28-fp8-fusion", (g.names[dq.idx], g.names[i]),
                          f"FP8 DequantizeLinear {g.names[dq.idx]!r} feeds {node.op_type} {g.names[i]!r}: TensorRT runs "
                          "FP8 only in GEMM/convolution (and fused attention) kernels, so this Q/DQ is a float round "
                          "trip that costs precision and time",
                          f"quantize only the inputs of Conv/MatMul/Gemm to FP8 (leave the input of {node.op_type} in "
                          "FP16)")
