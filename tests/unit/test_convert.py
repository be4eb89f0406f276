"""trtquant.quantize: in-place module swap, include/exclude by glob and type, partial quantization."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import trtquant
from trtquant import QuantConfig, QuantDescriptor
from trtquant.functional import fake_quant
from trtquant.nn import QuantAdaptiveAvgPool2d, QuantConv2d, QuantMaxPool2d
from trtquant.nn.base import QuantInputMixin, QuantMixin

from _models import SmallNet, TinyCNN, WithLSTM, images, randomize_bn


def _quant_layers(model: nn.Module) -> dict:
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, QuantInputMixin)}


def _leaf_outputs(model: nn.Module, x: torch.Tensor, replace: dict | None = None) -> dict:
    """Output of every leaf (non-quantizer) module; ``replace`` name -> tensor substitutes an output."""
    outs, hooks = {}, []
    for name, m in model.named_modules():
        if name and not isinstance(m, trtquant.TensorQuantizer) and not any(
                not isinstance(c, trtquant.TensorQuantizer) for c in m.children()):
            def hook(mod, inp, out, name=name):
                if replace and name in replace:
                    out = replace[name]
                outs[name] = out
                return out
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            outs["<output>"] = model(x)
    finally:
        for h in hooks:
            h.remove()
    return outs


def _check_only_layer_quantized(model_cls, layer: str, include) -> None:
    """Quantize only ``layer``: its input and weight go through INT8, every other layer is float bit for bit."""
    float_model = randomize_bn(model_cls()).eval()
    model = copy.deepcopy(float_model)
    trtquant.quantize(model, include=include)
    assert _quant_layers(model) == {layer: "QuantConv2d"}
    # (an observe-only quantizer for the ONNX Runtime graph may sit on the float layer after it)
    assert sorted(n for n, q in trtquant.quantizers(model).items() if not q.ort_only) == [
        f"{layer}.input_quantizer", f"{layer}.weight_quantizer"]
    trtquant.calibrate(model, images(2, 2), method="max", progress=False)
    qlayer = model.get_submodule(layer)
    a_in, a_w = qlayer.input_quantizer.amax, qlayer.weight_quantizer.amax
    assert a_in.dim() == 0 and a_w.shape == (qlayer.out_channels, 1, 1, 1)

    x = images(1, 2, seed=9)[0]
    q_outs = _leaf_outputs(model, x)
    f_outs = _leaf_outputs(float_model, x)
    # The quantized layer: conv(fake_quant(input), fake_quant(weight)), not the float conv.
    layer_in = {}
    h = model.get_submodule(layer).register_forward_pre_hook(lambda m, inp: layer_in.setdefault("x", inp[0]))
    with torch.no_grad():
        model(x)
    h.remove()
    expected = qlayer._conv_forward(fake_quant(layer_in["x"], a_in), fake_quant(qlayer.weight, a_w), qlayer.bias)
    assert torch.equal(q_outs[layer], expected)
    assert not torch.equal(q_outs[layer], f_outs[layer])
    # Every other layer: bit-identical to the float model fed the quantized layer's output.
    f_outs = _leaf_outputs(float_model, x, replace={layer: q_outs[layer]})
    assert sorted(q_outs) == sorted(f_outs)
    for name in q_outs:
        assert torch.equal(q_outs[name], f_outs[name]), f"{name} differs from float"


def test_include_first_conv_only():
    _check_only_layer_quantized(TinyCNN, "features.0", ["features.0"])


def test_include_first_conv_only_in_residual_model():
    """conv1 of a ResNet-style model: nothing else (no residual Add quantizer either) may change."""
    _check_only_layer_quantized(SmallNet, "conv1", ["conv1"])


def test_include_by_type():
    model = trtquant.quantize(TinyCNN(), include=[nn.Linear])
    assert _quant_layers(model) == {"classifier": "QuantLinear"}
    model = trtquant.quantize(TinyCNN(), include=nn.Conv2d)
    assert _quant_layers(model) == {"features.0": "QuantConv2d", "features.3": "QuantConv2d", "features.6": "QuantConv2d"}


def test_include_glob_skips_batchnorm_and_activations():
    model = trtquant.quantize(torchvision.models.resnet18(), include=["layer1.*"])
    assert _quant_layers(model) == {f"layer1.{b}.conv{c}": "QuantConv2d" for b in (0, 1) for c in (1, 2)}


def test_exclude_globs_and_types():
    model = trtquant.quantize(TinyCNN(), exclude=["features.*"])
    assert _quant_layers(model) == {"pool": "QuantAdaptiveAvgPool2d", "classifier": "QuantLinear"}
    model = trtquant.quantize(TinyCNN(), exclude=["features.[03]", nn.AdaptiveAvgPool2d])
    assert _quant_layers(model) == {"features.5": "QuantMaxPool2d", "features.6": "QuantConv2d", "classifier": "QuantLinear"}
    model = trtquant.quantize(TinyCNN(), include=[nn.Conv2d], exclude="features.6")
    assert _quant_layers(model) == {"features.0": "QuantConv2d", "features.3": "QuantConv2d"}


def test_include_matching_nothing_lists_names():
    with pytest.raises(ValueError, match="matched no quantizable layer") as info:
        trtquant.quantize(TinyCNN(), include=["feature.0", "conv1"])
    msg = str(info.value)
    assert "features.0" in msg and "classifier" in msg and "'feature.0'" in msg
    with pytest.raises(ValueError, match="matched no quantizable layer"):
        trtquant.quantize(TinyCNN(), include=[nn.LSTM])


def test_include_unsupported_layer_is_named():
    with pytest.raises(ValueError, match=r"lstm \(LSTM\)") as info:
        trtquant.quantize(WithLSTM(), include=["lstm"])
    assert "Supported:" in str(info.value) and "Conv2d" in str(info.value)
    with pytest.raises(ValueError, match=r"lstm \(LSTM\)"):
        trtquant.quantize(WithLSTM(), include=["proj", nn.LSTM])
    with pytest.raises(ValueError, match=r"features\.1 \(BatchNorm2d\)"):
        trtquant.quantize(TinyCNN(), include=["features.0", "features.1"])
    # Nothing was swapped by a call that raised.
    model = WithLSTM()
    with pytest.raises(ValueError):
        trtquant.quantize(model, include=["proj", "lstm"])
    assert type(model.proj) is nn.Linear


def test_quantize_in_place_idempotent_and_named():
    model = TinyCNN().train()
    params = list(model.parameters())
    assert trtquant.quantize(model) is model
    qs = trtquant.quantizers(model)
    assert "features.0.input_quantizer" in qs and "classifier.weight_quantizer" in qs
    assert all(q.name == n for n, q in qs.items())
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert model.training and model.features[0].training
    trtquant.quantize(model)
    qs2 = trtquant.quantizers(model)
    assert list(qs2) == list(qs) and all(qs2[n] is qs[n] for n in qs)
    assert type(model.features[0]) is QuantConv2d


def test_default_descriptors_and_placement():
    model = trtquant.quantize(TinyCNN())
    conv, fc = model.features[0], model.classifier
    assert conv.input_quantizer.quant_desc.axis is None and conv.input_quantizer.quant_desc.calib_method == "histogram"
    assert conv.weight_quantizer.quant_desc.axis == (0,) and conv.weight_quantizer.quant_desc.calib_method == "max"
    assert fc.weight_quantizer.quant_desc.axis == (0,)
    assert isinstance(model.features[5], QuantMaxPool2d) and not model.features[5].input_quantizer.is_enabled
    assert isinstance(model.pool, QuantAdaptiveAvgPool2d) and model.pool.input_quantizer.is_enabled
    unplaced = trtquant.quantize(TinyCNN(), placement=None)
    assert unplaced.features[5].input_quantizer.is_enabled


def test_config_overrides_and_dict_config():
    unsigned = QuantDescriptor(unsigned=True, calib_method="max")
    per_tensor_w = QuantDescriptor()
    cfg = QuantConfig(input=QuantDescriptor(calib_method="max"),
                      overrides={"features.[36]": {"input": unsigned}, "classifier": {"weight": per_tensor_w}})
    model = trtquant.quantize(TinyCNN(), config=cfg)
    assert model.features[0].input_quantizer.quant_desc == QuantDescriptor(calib_method="max")
    assert model.features[3].input_quantizer.quant_desc is unsigned
    assert model.features[6].input_quantizer.quant_desc is unsigned
    assert model.classifier.weight_quantizer.quant_desc is per_tensor_w
    assert model.features[0].weight_quantizer.quant_desc.axis == (0,)
    model2 = trtquant.quantize(TinyCNN(), config={"input": unsigned})
    assert model2.features[0].input_quantizer.quant_desc is unsigned
    with pytest.raises(ValueError, match="unknown QuantConfig keys"):
        trtquant.quantize(TinyCNN(), config={"inputs": unsigned})
    with pytest.raises(TypeError):
        trtquant.quantize(TinyCNN(), config=[unsigned])


def test_subclass_without_own_forward_is_quantized():
    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(MyConv(3, 4, 3), nn.ReLU())
    trtquant.quantize(model)
    assert type(model[0]) is QuantConv2d


def test_subclass_with_own_forward_is_quantized_at_its_call():
    class SamePadConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(F.pad(x, (1, 1, 1, 1)))

    model = nn.Sequential(SamePadConv(3, 4, 3), nn.Conv2d(4, 4, 1))
    trtquant.quantize(model)
    assert isinstance(model[0], SamePadConv) and isinstance(model[0], QuantMixin) and type(model[1]) is QuantConv2d
    model[0].input_quantizer.disable()
    model[0].weight_quantizer.disable()
    model[1].input_quantizer.disable()
    model[1].weight_quantizer.disable()
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 4, 8, 8)


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        trtquant.quantize("resnet50")
    with pytest.raises(ValueError, match="placement"):
        trtquant.quantize(TinyCNN(), placement="onnx")
    with pytest.raises(TypeError, match="globs or module types"):
        trtquant.quantize(TinyCNN(), include=[3])
    with pytest.raises(ValueError, match="nn.Sequential"):
        trtquant.quantize(nn.Conv2d(3, 4, 3))


def test_quantize_then_calibrate_end_to_end_close_to_float():
    float_model = randomize_bn(TinyCNN()).eval()
    model = trtquant.quantize(copy.deepcopy(float_model))
    trtquant.calibrate(model, images(2, 4), method="max", progress=False)
    x = images(1, 4, seed=3)[0]
    with torch.no_grad():
        yq, yf = model(x), float_model(x)
    assert not torch.equal(yq, yf)
    rel = float((yq - yf).norm() / yf.norm())
    assert rel < 0.05, rel
