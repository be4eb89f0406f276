"""Tiny models and data shared by the unit tests (64x64 inputs, a few thousand parameters)."""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np

import torch
from torch import nn

IMAGE = (3, 64, 64)


class TinyCNN(nn.Module):
    """torchvision-style names: ``features.N`` convs/pools, ``classifier`` Linear."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),  # features.0
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),  # features.3
            nn.ReLU(),
            nn.MaxPool2d(2),  # features.5
            nn.Conv2d(16, 16, 3, padding=1),  # features.6
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class SmallNet(nn.Module):
    """ResNet-style names: ``conv1``, ``bn1``, a residual block, ``fc``."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(x + self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class WithUnusedBranch(nn.Module):
    """``unused`` and ``unused_fc`` never run in forward: their quantizers see no calibration data."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.unused = nn.Conv2d(4, 4, 1)
        self.unused_fc = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


class WithLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(self.proj(x))[0]


def images(n_batches: int = 2, batch: int = 2, seed: int = 0, shape=IMAGE) -> List[torch.Tensor]:
    """Deterministic random image batches."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, generator=g) for _ in range(n_batches)]


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics/affine, so checkpoints with the wrong buffers give other outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def qdq_conv_onnx(path: Path, *, zero_point: int = 0, channels: int = 16) -> Path:
    """input (N, C, 8, 8) -> Q/DQ -> Conv CxC 3x3 (per-channel Q/DQ weights) -> Relu."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.1, (channels, channels, 3, 3)).astype(np.float32)
    w_scale = (np.abs(weight).reshape(channels, -1).max(axis=1) / 127).astype(np.float32)
    inits = [
        numpy_helper.from_array(weight, "conv.weight"),
        numpy_helper.from_array(np.zeros(channels, np.float32), "conv.bias"),
        numpy_helper.from_array(np.array(1 / 32, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(zero_point, np.int8), "x_zp"),
        numpy_helper.from_array(w_scale, "w_scale"),
        numpy_helper.from_array(np.zeros(channels, np.int8), "w_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "x_scale", "x_zp"], ["x_q"], name="/conv/input_quantizer/QuantizeLinear"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="/conv/input_quantizer/DequantizeLinear"),
        helper.make_node("QuantizeLinear", ["conv.weight", "w_scale", "w_zp"], ["w_q"], name="/conv/weight_quantizer/QuantizeLinear", axis=0),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], name="/conv/weight_quantizer/DequantizeLinear", axis=0),
        helper.make_node("Conv", ["x_dq", "w_dq", "conv.bias"], ["conv_out"], name="/conv/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv_out"], ["output"], name="/relu/Relu"),
    ]
    graph = helper.make_graph(
        nodes, "qdq_conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", channels, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", channels, 8, 8])],
        initializer=inits,
    )
    # IR 9 (onnx 1.15+): onnx's newest IR version can be ahead of what onnxruntime loads.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
