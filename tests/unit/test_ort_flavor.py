"""Which activation quantizers the ONNX Runtime flavour makes unsigned (non-negative by construction)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trtquant
from trtquant.export.ort_flavor import nonnegative_input_quantizers, ort_flavor_, unsigned_nonnegative_inputs_


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.after_relu = nn.Conv2d(8, 8, 1)          # input: ReLU output -> unsigned
        self.after_conv = nn.Conv2d(8, 8, 1)          # input: a conv output -> signed
        self.after_pool = nn.Conv2d(8, 8, 1)          # input: MaxPool(ReLU6(.)) -> unsigned
        self.after_tanh = nn.Conv2d(8, 8, 1)          # input: Hardtanh(-1, 1) -> signed
        self.after_cat = nn.Conv2d(16, 8, 1)          # input: cat(ReLU, conv) -> signed
        self.after_clamp = nn.Conv2d(8, 8, 1)         # input: x.clamp(min=0) -> unsigned
        self.pool = nn.MaxPool2d(2)
        self.relu6 = nn.ReLU6()
        self.tanh = nn.Hardtanh(-1.0, 1.0)
        self.fc = nn.Linear(8, 4)                     # input: flatten(avgpool(ReLU)) -> unsigned

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        a = self.act(y)
        b = self.after_relu(a)
        c = self.after_conv(b)
        d = self.after_pool(self.pool(self.relu6(c)))
        e = self.after_tanh(self.tanh(d))
        f = self.after_cat(torch.cat([F.relu(e), e], 1))
        g = self.after_clamp(f.clamp(min=0))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(g), 1), 1))


def _calibrated(model: nn.Module) -> nn.Module:
    q = trtquant.quantize(model.eval())
    trtquant.calibrate(q, [torch.randn(2, 3, 16, 16) for _ in range(2)], method="max", progress=False)
    return q


def test_structure_decides_unsigned() -> None:
    q = _calibrated(_Mixed())
    names = nonnegative_input_quantizers(q)
    assert names is not None
    layers = {n.rsplit(".", 1)[0] for n in names if n.endswith(".input_quantizer")}
    assert {"after_relu", "after_pool", "after_clamp", "fc"} <= layers
    assert not {"stem", "after_conv", "after_tanh", "after_cat"} & layers
    # Weight quantizers are never candidates.
    assert not any(n.endswith("weight_quantizer") for n in names)


def test_unsigned_switch_keeps_amax_and_doubles_resolution() -> None:
    q = _calibrated(_Mixed())
    before = {n: (m.amax.clone(), m.unsigned) for n, m in trtquant.quantizers(q).items() if m.amax is not None}
    switched = unsigned_nonnegative_inputs_(q)
    after = trtquant.quantizers(q)
    assert switched == sum(1 for n in before if after[n].unsigned and not before[n][1]) >= 4
    for n, (amax, _) in before.items():
        assert torch.equal(after[n].amax, amax), n  # same clipping point
    qz = after["after_relu.input_quantizer"]
    x = torch.linspace(0, float(qz.amax), 1001)
    levels = torch.unique(qz(x)).numel()
    assert levels == 256, levels  # [0, 255] * amax / 255, where the signed grid had 128 non-negative levels


def test_ort_flavor_of_an_untraceable_model_stays_signed() -> None:
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.conv2 = nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu(self.conv(x))
            if float(y.sum()) > -1:  # data-dependent control flow: torch.fx cannot trace it
                y = self.conv2(y)
            return y

    q = _calibrated(Untraceable())
    assert nonnegative_input_quantizers(q) is None
    flavored = ort_flavor_(copy.deepcopy(q))
    assert not any(m.unsigned for m in trtquant.quantizers(flavored).values())


@pytest.mark.parametrize("name", ["resnet18"])
def test_torchvision_post_relu_quantizers(name: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    q = _calibrated(getattr(torchvision.models, name)())
    names = nonnegative_input_quantizers(q) or set()
    # Every conv input in a ResNet is a ReLU output except the stem (the image); the residual identity
    # quantizers read ReLU outputs too; the observe-only branch quantizers read BN outputs.
    convs = [n for n, m in q.named_modules() if isinstance(m, nn.Conv2d)]
    assert {f"{c}.input_quantizer" for c in convs if c != "conv1"} <= names
    assert "conv1.input_quantizer" not in names
    assert any(n.endswith("residual_quantizer") for n in names)
    assert not any(n.endswith("residual_branch_quantizer") for n in names)
    assert "fc.input_quantizer" in names
