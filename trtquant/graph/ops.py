"""The op vocabulary, in ONNX op names, shared by placement, the checker and the ONNX Runtime graph.

Each set answers one question; a rule that needs a set imports it from here instead of keeping its
own copy. The torch.fx adapter (``trtquant.placement.fx_dag``) maps PyTorch modules and functions
onto these names, the ONNX adapter (:mod:`trtquant.graph.onnx_dag`) maps ONNX nodes, including the
two virtual ops below that stand for a small pattern of ONNX nodes.

Sources: TensorRT developer guide, "Explicit Quantization" (Q/DQ layer placement, commuting ops,
Conv+BN+activation and Conv+Add fusions); ``shared/reference/tensorrt.md`` sections 2-3.
"""

from __future__ import annotations

#: Virtual op: Add/Sub/Mul/Div with exactly one constant operand (a bias add or a per-channel scale).
AFFINE = "Affine"
#: Virtual op: ``x * f(x)`` with ``f`` elementwise on ``x`` alone (SiLU = x*sigmoid(x), GELU's erf form,
#: HardSwish as x*hardsigmoid(x), Mish) - one activation, however the exporter spelled it.
SELF_GATED = "SelfGated"

Q, DQ = "QuantizeLinear", "DequantizeLinear"
QDQ = frozenset({Q, DQ})

#: Ops that keep a tensor constant when their data input is constant (the TensorRT parser folds them).
PASSTHROUGH = frozenset({"Identity", "Cast", "Transpose", "Reshape", "Unsqueeze", "Squeeze", "Flatten"})

#: Layers with a weight operand whose inputs TensorRT quantizes (MatMul/Gemm with a constant operand
#: are Linear layers).
WEIGHTED = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: Weighted layers whose epilogue TensorRT fuses an elementwise Add into in INT8 (the residual rule's
#: sources): convolutions. A Linear (Gemm, or MatMul with a constant operand) is not one: the residual Adds
#: of transformer blocks (ViT, Swin, BERT) feed a LayerNorm, which TensorRT runs with the Add in FP16, and
#: their residual stream carries outlier channels - an INT8 identity input costs accuracy for no fusion
#: (MiniLM, every Linear and attention matmul INT8: mean cosine 0.9889 without, 0.9813 with; docs/transformers.md).
RESIDUAL_SOURCES = frozenset({"Conv", "ConvTranspose"})

#: Ops TensorRT fuses into the preceding weighted layer (Conv+BN+activation, bias add, scale): walking
#: back through them from an Add input still lands on "the conv branch". One set for placement and the
#: checker, so a SiLU/GELU/HardSwish block is a conv branch for both.
CONV_EPILOGUE = frozenset({
    "BatchNormalization", "Relu", "Clip", "LeakyRelu", "PRelu", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh",
    "Gelu", "Mish", "Elu", "Selu", "Softplus", "Identity", "Dropout", AFFINE, SELF_GATED,
})

#: Pointwise activations TensorRT fuses after Conv+BN (checker C18/C19: a Q/DQ between them breaks it).
ACTIVATIONS = frozenset({"BatchNormalization", "Relu", "LeakyRelu", "Clip", "PRelu"})

#: Ops that commute with quantization onto one grid: data movement, zero padding, and monotone ops
#: that keep 0 at 0, so ``Q(f(y)) == Q(f(Q(y)))``. TensorRT moves Q/DQ across them; a Q/DQ pair on
#: both sides of one is redundant (checker C22); the ONNX Runtime graph copies an output Q up through
#: the subset :data:`ORT_OUTPUT_COPY`.
COMMUTING = frozenset({"MaxPool", "Relu", "Clip", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
                       "Pad", "Slice", "Identity"})
#: Where the ONNX Runtime graph copies a layer's output quantizer up to the producing op: single-input
#: ops that ONNX Runtime's QDQ fusions see through or delete (ReluQuantFusion, ClipQuantFusion, the
#: DQ->MaxPool/Reshape->Q propagation), so the producer gets its output Q.
ORT_OUTPUT_COPY = frozenset({"Relu", "Clip", "MaxPool", "Flatten", "Reshape", "Identity"})

#: Data movement the ONNX Runtime graph also copies an output Q through (exact for any scale and zero
#: point: each output value is one input value, and a constant zero pad quantizes to the zero point,
#: which dequantizes to 0). Concat copies it to every input; Pad only in constant mode with value 0.
ORT_OUTPUT_COPY_MOVES = frozenset({"Transpose", "Squeeze", "Unsqueeze", "Concat", "Pad", "Slice"})
#: Ops ONNX Runtime's CPU QDQ fusions (qdq_selector_action_transformer.cc: Conv/MatMul/Gemm,
#: binary Add/Mul, variadic Concat, unary AveragePool/GlobalAveragePool, drop-Q/DQ data movement,
#: ReluQuantFusion/ClipQuantFusion) run on INT8 codes between a DQ and a Q. Any other op reading a
#: dequantized activation stays float there (HardSigmoid, HardSwish, the Sigmoid and Mul of a SiLU
#: gate, LayerNormalization, ...); the graph records which in its metadata.
ORT_INT8_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "AveragePool",
                          "GlobalAveragePool", "MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze",
                          "Unsqueeze", "Relu", "Clip", "Identity", "Pad", "Slice", "Gather", "Resize", Q, DQ})

#: Ops with an INT8 implementation in TensorRT when input and output are quantized (checker C22).
INT8_FUSIBLE = frozenset({"AveragePool", "GlobalAveragePool", "Add"})
#: Ops that consume a quantized tensor usefully (a Q/DQ in front of anything else only adds work).
QUANTIZABLE = WEIGHTED | INT8_FUSIBLE | {Q}
#: Ops TensorRT runs in float whatever their inputs: a Q/DQ that feeds only these is a float island.
FLOAT_ISLAND = frozenset({"Softmax", "LayerNormalization", "Resize", "Sigmoid"})

#: Elementwise ops with one input that ``f`` of a self-gated activation may be built from (plus
#: :data:`AFFINE` steps): sigmoid, erf, hard sigmoid, tanh/softplus (Mish).
GATE_FUNCTIONS = frozenset({"Sigmoid", "Erf", "HardSigmoid", "Tanh", "Softplus", "Relu", "Clip"})

__all__ = [
    "ACTIVATIONS", "AFFINE", "COMMUTING", "CONV_EPILOGUE", "DQ", "FLOAT_ISLAND", "GATE_FUNCTIONS", "INT8_FUSIBLE",
    "ORT_INT8_OPS", "ORT_OUTPUT_COPY", "ORT_OUTPUT_COPY_MOVES", "PASSTHROUGH", "Q", "QDQ", "QUANTIZABLE", "RESIDUAL_SOURCES", "SELF_GATED", "WEIGHTED",
]
