"""TensorRT placement rules as data: the fx sites placement rewrites, and the rule names it reports.

Which ops belong to a conv epilogue or commute with quantization is the shared vocabulary of
:mod:`trtquant.graph.ops` (mapped from torch in :mod:`.fx_dag`); which Add input is the identity is
:func:`trtquant.graph.dag.residual_split`.
"""

from __future__ import annotations

import torch.nn.functional as F

AVGPOOL_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                     F.adaptive_avg_pool3d}

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
