"""trtquant.nn layers: pytorch-quantization's classes, exact quantized math, shared parameters, weight cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trtquant.nn as qnn
from trtquant import QuantDescriptor
from trtquant.calib.max import reduce_amax
from trtquant.functional import fake_quant

import _qref as R

# (quant class, float class, ctor args, input shape, weight channel axis, functional forward)
WEIGHTED = [
    (qnn.QuantConv1d, nn.Conv1d, (3, 4, 3), (2, 3, 16), 0, F.conv1d),
    (qnn.QuantConv2d, nn.Conv2d, (3, 4, 3), (2, 3, 8, 8), 0, F.conv2d),
    (qnn.QuantConv3d, nn.Conv3d, (3, 4, 3), (1, 3, 5, 5, 5), 0, F.conv3d),
    (qnn.QuantConvTranspose1d, nn.ConvTranspose1d, (3, 4, 3), (2, 3, 16), 1, F.conv_transpose1d),
    (qnn.QuantConvTranspose2d, nn.ConvTranspose2d, (3, 4, 3), (2, 3, 8, 8), 1, F.conv_transpose2d),
    (qnn.QuantConvTranspose3d, nn.ConvTranspose3d, (3, 4, 3), (1, 3, 5, 5, 5), 1, F.conv_transpose3d),
    (qnn.QuantLinear, nn.Linear, (6, 5), (2, 6), 0, F.linear),
]
IDS = [c[0].__name__ for c in WEIGHTED]


def _set_amax(layer, x):
    layer.input_quantizer.amax = x.abs().max()
    layer.weight_quantizer.amax = reduce_amax(layer.weight, layer.weight_quantizer.axis)


def _reference(layer, fn, x):
    """The layer's float op on inputs and weights quantized by the numpy reference (not by trtquant)."""
    xq = R.fake_quant(x, layer.input_quantizer.amax)
    wq = R.fake_quant(layer.weight, layer.weight_quantizer.amax)
    if fn is F.linear:
        return fn(xq, wq, layer.bias)
    if layer.transposed:
        return fn(xq, wq, layer.bias, layer.stride, layer.padding, layer.output_padding, layer.groups, layer.dilation)
    return fn(xq, wq, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


@pytest.mark.parametrize("qcls,fcls,args,shape,axis,fn", WEIGHTED, ids=IDS)
def test_weighted_layer_defaults_and_exact_forward(qcls, fcls, args, shape, axis, fn):
    layer = qcls(*args)
    assert isinstance(layer, fcls)
    assert layer.input_quantizer.quant_desc.axis is None
    assert layer.weight_quantizer.quant_desc.axis == (axis,)
    assert layer._input_quantizer is layer.input_quantizer and layer._weight_quantizer is layer.weight_quantizer
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    x = torch.randn(shape)
    _set_amax(layer, x)
    assert layer.weight_quantizer.amax.shape[axis] == layer.weight.shape[axis]
    assert layer.weight_quantizer.amax.numel() == layer.weight.shape[axis]
    out = layer(x)
    assert torch.equal(out, _reference(layer, fn, x))
    float_layer = fcls(*args)
    float_layer.load_state_dict({k: v for k, v in layer.state_dict().items() if "quantizer" not in k})
    assert not torch.equal(out, float_layer(x))
    layer.input_quantizer.disable()
    layer.weight_quantizer.disable()
    assert torch.equal(layer(x), float_layer(x))


@pytest.mark.parametrize("qcls,fcls,args,shape,axis,fn", WEIGHTED, ids=IDS)
def test_from_float_shares_parameters_and_leaves_float_untouched(qcls, fcls, args, shape, axis, fn):
    float_layer = fcls(*args)
    x = torch.randn(shape)
    ref = float_layer(x)
    q = qcls.from_float(float_layer)
    assert type(q) is qcls and q.weight is float_layer.weight and q.bias is float_layer.bias
    assert not hasattr(float_layer, "input_quantizer") and list(float_layer.children()) == []
    assert list(float_layer.state_dict()) == ["weight", "bias"]
    assert torch.equal(float_layer(x), ref)
    _set_amax(q, x)
    assert torch.equal(q(x), _reference(q, fn, x))
    with pytest.raises(TypeError, match="expects"):
        qcls.from_float(nn.ReLU())


def test_conv_groups_dilation_stride_padding():
    layer = qnn.QuantConv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2)
    x = torch.randn(2, 4, 9, 9)
    _set_amax(layer, x)
    assert torch.equal(layer(x), _reference(layer, F.conv2d, x))


def test_linear_closed_form_by_hand():
    """A QuantLinear whose every number is written down: scales 1/16 (input) and 1/8, 1/4 (weight rows)."""
    layer = qnn.QuantLinear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.3, -15.9, 1.0], [0.4, 0.2, -40.0]]))
        layer.bias.copy_(torch.tensor([0.5, -0.25]))
    layer.input_quantizer.amax = R.AMAX_SIXTEENTH  # scale 1/16
    layer.weight_quantizer.amax = torch.tensor([[127 / 8], [127 / 4]])  # scales 1/8 and 1/4 per row
    x = torch.tensor([[0.09375, -3.0, 100.0]])  # codes 2 (tie 1.5 -> 2), -48, 127 (saturated)
    # weight codes: row 0: 0.3*8=2.4 -> 2, -127.2 -> -127, 8; row 1: 0.4*4=1.6 -> 2, 0.8 -> 1, -160 -> -128
    xq = [2 / 16, -48 / 16, 127 / 16]
    wq = [[2 / 8, -127 / 8, 8 / 8], [2 / 4, 1 / 4, -128 / 4]]
    expected = [sum(a * b for a, b in zip(xq, row)) + bias for row, bias in zip(wq, (0.5, -0.25))]
    out = layer(x)
    assert out.shape == (1, 2)
    assert torch.allclose(out[0].double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-5), (out, expected)
    assert layer.quant_weight().tolist() == wq


def test_conv_transpose_output_size():
    layer = qnn.QuantConvTranspose2d(3, 4, 3, stride=2, padding=1)
    float_layer = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1)
    float_layer.load_state_dict({k: v for k, v in layer.state_dict().items() if "quantizer" not in k})
    x = torch.randn(1, 3, 5, 5)
    layer.input_quantizer.disable()
    layer.weight_quantizer.disable()
    assert layer(x, output_size=[10, 10]).shape == (1, 4, 10, 10)
    assert torch.equal(layer(x, output_size=[10, 10]), float_layer(x, output_size=[10, 10]))


POOLS = [
    (qnn.QuantMaxPool1d, nn.MaxPool1d, (2,), (2, 3, 8)),
    (qnn.QuantMaxPool2d, nn.MaxPool2d, (2,), (2, 3, 8, 8)),
    (qnn.QuantMaxPool3d, nn.MaxPool3d, (2,), (1, 2, 4, 4, 4)),
    (qnn.QuantAvgPool1d, nn.AvgPool1d, (2,), (2, 3, 8)),
    (qnn.QuantAvgPool2d, nn.AvgPool2d, (3, 2, 1), (2, 3, 8, 8)),
    (qnn.QuantAvgPool3d, nn.AvgPool3d, (2,), (1, 2, 4, 4, 4)),
    (qnn.QuantAdaptiveAvgPool1d, nn.AdaptiveAvgPool1d, (1,), (2, 3, 8)),
    (qnn.QuantAdaptiveAvgPool2d, nn.AdaptiveAvgPool2d, ((2, 3),), (2, 3, 8, 8)),
    (qnn.QuantAdaptiveAvgPool3d, nn.AdaptiveAvgPool3d, (1,), (1, 2, 4, 4, 4)),
]


@pytest.mark.parametrize("qcls,fcls,args,shape", POOLS, ids=[p[0].__name__ for p in POOLS])
def test_pools(qcls, fcls, args, shape):
    pool = qcls(*args)
    assert isinstance(pool, fcls) and not hasattr(pool, "weight_quantizer")
    x = torch.randn(shape)
    pool.input_quantizer.amax = 1.5
    assert torch.equal(pool(x), fcls(*args)(R.fake_quant(x, 1.5)))
    pool.input_quantizer.disable()
    assert torch.equal(pool(x), fcls(*args)(x))
    q2 = qcls.from_float(fcls(*args), QuantDescriptor(unsigned=True))
    assert q2.input_quantizer.quant_desc.unsigned


def test_constructor_descriptors_and_class_defaults():
    din, dw = QuantDescriptor(unsigned=True), QuantDescriptor(axis=(0,), narrow_range=True)
    layer = qnn.QuantConv2d(3, 4, 3, bias=False, quant_desc_input=din, quant_desc_weight=dw)
    assert layer.input_quantizer.quant_desc is din and layer.weight_quantizer.quant_desc is dw and layer.bias is None
    lin = qnn.QuantLinear(4, 2, bias=False, quant_desc_input=din)
    assert lin.input_quantizer.quant_desc is din and lin.bias is None
    with pytest.raises(TypeError, match="quant_desc_input must be a QuantDescriptor"):
        qnn.QuantConv2d(3, 4, 3, quant_desc_input={"num_bits": 8})

    old_in, old_w = qnn.QuantConv2d.default_quant_desc_input, qnn.QuantConv2d.default_quant_desc_weight
    try:
        qnn.QuantConv2d.set_default_quant_desc_input(QuantDescriptor(calib_method="histogram"))
        qnn.QuantConv2d.set_default_quant_desc_weight(QuantDescriptor(axis=(0,), narrow_range=True))
        conv = qnn.QuantConv2d(3, 4, 3)
        assert conv.input_quantizer.quant_desc.calib_method == "histogram"
        assert conv.weight_quantizer.quant_desc.narrow_range
        # Other classes keep theirs.
        assert qnn.QuantConv1d(3, 4, 3).input_quantizer.quant_desc.calib_method == "max"
        assert qnn.QuantLinear(3, 4).input_quantizer.quant_desc.calib_method == "max"
        with pytest.raises(TypeError):
            qnn.QuantConv2d.set_default_quant_desc_input("max")
    finally:
        qnn.QuantConv2d.default_quant_desc_input, qnn.QuantConv2d.default_quant_desc_weight = old_in, old_w
    assert qnn.QuantConv2d(3, 4, 3).input_quantizer.quant_desc.calib_method == "max"


def test_pytorch_quantization_aliases():
    assert qnn.Conv2d is qnn.QuantConv2d and qnn.Linear is qnn.QuantLinear
    assert qnn.ConvTranspose2d is qnn.QuantConvTranspose2d and qnn.MaxPool2d is qnn.QuantMaxPool2d
    assert qnn.AvgPool2d is qnn.QuantAvgPool2d and qnn.AdaptiveAvgPool2d is qnn.QuantAdaptiveAvgPool2d
    assert qnn.TensorQuantizer.__name__ == "TensorQuantizer"


def test_weight_cache_reuses_and_invalidates():
    layer = qnn.QuantConv2d(3, 4, 3).eval()
    x = torch.randn(1, 3, 6, 6)
    _set_amax(layer, x)
    with torch.no_grad():
        w1 = layer.quant_weight()
        assert layer.quant_weight() is w1  # cached
        y1 = layer(x)
        layer.weight.mul_(0.5)  # in-place change: version counter moves
        w2 = layer.quant_weight()
        assert w2 is not w1 and torch.equal(w2, R.fake_quant(layer.weight, layer.weight_quantizer.amax))
        assert not torch.equal(layer(x), y1)
        layer.weight_quantizer.amax = layer.weight_quantizer.amax * 0.5
        assert torch.equal(layer.quant_weight(), R.fake_quant(layer.weight, layer.weight_quantizer.amax))
        sd = {k: v.clone() for k, v in layer.state_dict().items()}
        sd["weight"] = sd["weight"] * 3
        layer.load_state_dict(sd)
        assert torch.equal(layer.quant_weight(), R.fake_quant(sd["weight"], layer.weight_quantizer.amax))
        layer.weight_quantizer.disable()
        assert layer.quant_weight() is layer.weight


def test_training_gradient_is_straight_through():
    layer = qnn.QuantConv2d(3, 4, 3).train()
    x = torch.randn(2, 3, 6, 6) * 2
    _set_amax(layer, x)
    layer.input_quantizer.amax = 1.0  # some inputs clipped
    xr = x.clone().requires_grad_()
    out = layer(xr)
    g = torch.randn_like(out)
    out.backward(g)
    w = layer.weight.detach().clone().requires_grad_()
    xr2 = x.clone().requires_grad_()
    ref = F.conv2d(fake_quant(xr2, torch.tensor(1.0)), fake_quant(w, layer.weight_quantizer.amax), layer.bias.detach())
    ref.backward(g)
    assert torch.equal(out, ref)
    assert torch.equal(out.detach(), F.conv2d(R.fake_quant(x, 1.0), R.fake_quant(w.detach(), layer.weight_quantizer.amax),
                                              layer.bias.detach()))
    assert torch.equal(layer.weight.grad, w.grad)
    assert torch.equal(xr.grad, xr2.grad)
    assert int((xr.grad == 0).sum()) > 0 and bool((xr.grad[x.abs() > 1.0] == 0).all())
