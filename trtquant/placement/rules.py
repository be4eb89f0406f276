"""TensorRT placement rules as data: which ops fuse, commute, or end a conv branch."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

# Elementwise ops whose second tensor input may be a residual identity.
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_"}
CAT_FUNCTIONS = {torch.cat, torch.concat}
AVGPOOL_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                     F.adaptive_avg_pool3d}

# Layers TensorRT fuses into the preceding Conv (Conv+BN+act): walking back through them from an
# Add input still lands on "the conv branch".
CONV_EPILOGUE_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU,
                         nn.Hardswish, nn.GELU, nn.Identity, nn.Dropout)
CONV_EPILOGUE_FUNCTIONS = {F.relu, F.relu6, torch.relu, F.silu, F.hardswish, F.leaky_relu, F.gelu, F.dropout,
                           F.batch_norm}
CONV_EPILOGUE_METHODS = {"relu", "relu_"}

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
