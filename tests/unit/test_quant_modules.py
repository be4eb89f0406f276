"""quant_modules: pytorch-quantization's monkey patching, undone by deactivate() and by enabled() on exit."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch.nn.modules.conv import Conv2d as FloatConv2d
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.linear import Linear as FloatLinear

import trtquant
from trtquant import quant_modules
from trtquant.nn import QuantAdaptiveAvgPool2d, QuantConv2d, QuantLinear, QuantMaxPool2d
from trtquant.nn.base import QuantInputMixin

from _models import TinyCNN, images

ORIGINAL = {name: getattr(torch.nn, name) for name in ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d", "Linear",
                                                       "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d")}


def _conv_linear_types(model: torch.nn.Module) -> dict:
    counts: dict = {}
    for m in model.modules():
        if isinstance(m, (_ConvNd, FloatLinear)):
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    return counts


def _assert_torch_nn_restored() -> None:
    for name, cls in ORIGINAL.items():
        assert getattr(torch.nn, name) is cls, name
    assert quant_modules._originals == {}


def test_initialize_resnet50_then_deactivate():
    quant_modules.initialize()
    try:
        assert torch.nn.Conv2d is QuantConv2d and torch.nn.Linear is QuantLinear
        model = torchvision.models.resnet50()
    finally:
        quant_modules.deactivate()
    assert _conv_linear_types(model) == {"QuantConv2d": 53, "QuantLinear": 1}
    assert isinstance(model.maxpool, QuantMaxPool2d) and isinstance(model.avgpool, QuantAdaptiveAvgPool2d)
    assert isinstance(model.conv1, FloatConv2d)  # still a Conv2d for isinstance checks
    _assert_torch_nn_restored()
    plain = torchvision.models.resnet50()
    assert _conv_linear_types(plain) == {"Conv2d": 53, "Linear": 1}
    assert not any(isinstance(m, QuantInputMixin) for m in plain.modules())
    # The quantized model made earlier stays quantized and works once calibrated.
    model.eval()
    trtquant.calibrate(model, images(1, 1), method="max", progress=False)
    with torch.no_grad():
        assert model(images(1, 1)[0]).shape == (1, 1000)


def test_enabled_context_manager_restores_on_exit():
    with quant_modules.enabled():
        model = TinyCNN()
    _assert_torch_nn_restored()
    assert _conv_linear_types(model) == {"QuantConv2d": 3, "QuantLinear": 1}
    assert _conv_linear_types(TinyCNN()) == {"Conv2d": 3, "Linear": 1}


def test_enabled_context_manager_restores_when_body_raises():
    with pytest.raises(ZeroDivisionError):
        with quant_modules.enabled():
            assert torch.nn.Conv2d is QuantConv2d
            1 / 0
    _assert_torch_nn_restored()


def test_enabled_inside_initialize_keeps_outer_patch():
    quant_modules.initialize()
    try:
        with quant_modules.enabled():
            pass
        assert torch.nn.Conv2d is QuantConv2d  # the outer initialize() is still in force
    finally:
        quant_modules.deactivate()
    _assert_torch_nn_restored()


def test_float_module_list_and_idempotence():
    quant_modules.initialize(float_module_list=["Linear"])
    quant_modules.initialize(float_module_list=["Linear"])  # twice: originals are not overwritten
    try:
        model = TinyCNN()
    finally:
        quant_modules.deactivate()
    assert _conv_linear_types(model) == {"QuantConv2d": 3, "Linear": 1}
    _assert_torch_nn_restored()
    quant_modules.deactivate()  # no-op when not active
    _assert_torch_nn_restored()


def test_custom_quant_modules():
    class Holder:
        Layer = FloatLinear

    quant_modules.initialize(custom_quant_modules=[(Holder, "Layer", QuantLinear)])
    try:
        assert Holder.Layer is QuantLinear
    finally:
        quant_modules.deactivate()
    assert Holder.Layer is FloatLinear
    _assert_torch_nn_restored()
