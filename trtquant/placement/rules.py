"""TensorRT placement rules as data: the fx sites placement rewrites, and the rule names it reports.

Which ops belong to a conv epilogue or commute with quantization is the shared vocabulary of
:mod:`trtquant.graph.ops` (mapped from torch in :mod:`.fx_dag`); which Add input is the identity is
:func:`trtquant.graph.dag.residual_split`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

AVGPOOL_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                     F.adaptive_avg_pool3d}

#: Functional weighted calls placement quantizes when their weight is a parameter (a tied head,
#: a block reusing another layer's weight), with the torch layer whose quantized class gives the
#: default weight descriptor (per output channel; ConvTranspose: axis 1).
WEIGHTED_FUNCTIONS = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d,
                      F.conv_transpose1d: nn.ConvTranspose1d, F.conv_transpose2d: nn.ConvTranspose2d,
                      F.conv_transpose3d: nn.ConvTranspose3d, F.linear: nn.Linear}

# Rule names shown by placement_report().
RULE_WEIGHTED_INPUT = "weighted-op input (Conv/Linear fuse DQ on inputs)"
RULE_WEIGHT = "weight (per output channel)"
RULE_POOL_INPUT = "AvgPool input (INT8 AvgPool)"
RULE_MAXPOOL = "MaxPool input disabled (Q/DQ commute across MaxPool)"
RULE_RESIDUAL = "residual Add identity input (Conv+Add fuses in INT8)"
RULE_CONCAT = "Concat input, amax shared with the other Concat inputs"
RULE_FUNCTIONAL_POOL = "functional avg-pool input"
RULE_USER_DISABLED = "disabled"
RULE_ORT_BRANCH = "residual Add conv branch, observe-only (scale for the ONNX Runtime INT8 graph)"
RULE_ORT_OUTPUT = "conv output, observe-only (output scale of its ONNX Runtime INT8 kernel where no later quantizer gives one)"
RULE_CALL_INPUT = "input of the conv/linear call in the layer's own forward (forward kept, quantized at the call)"
RULE_CALL_WEIGHT = "weight as it enters the conv/linear call in the layer's own forward (per output channel)"
RULE_FUNCTIONAL_INPUT = "input of an F.conv*d/F.linear call on a parameter (owner's forward rewritten)"
RULE_FUNCTIONAL_WEIGHT = "weight of an F.conv*d/F.linear call on a parameter (per output channel)"


def fp8_skips(kind: str, desc) -> bool:
    """FP8 placement rule: with FP8 E4M3 activations only weighted layers (Conv/Linear, functional calls) and
    attention BMMs get quantizers. TensorRT runs FP8 in GEMM, convolution and fused-attention kernels only
    (ModelOpt's FP8 recipe quantizes Conv/Gemm/MatMul inputs alone); an FP8 Q/DQ on a residual Add or a
    pooling input is a float round trip there (checker C28-fp8-fusion)."""
    return kind in ("add", "pool") and desc is not None and getattr(desc, "is_fp8", False)
