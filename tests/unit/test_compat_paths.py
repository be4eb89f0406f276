"""pytorch-quantization's module paths and helpers: same names, same objects, closed-form results."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import trtquant
from trtquant import cuda_ext, quant_modules
from trtquant.optim import helper
from trtquant.utils import reduce_amax


@pytest.mark.parametrize("path, names", [
    ("trtquant.nn.modules.tensor_quantizer", ["TensorQuantizer"]),
    ("trtquant.nn.modules.quant_conv", ["QuantConv2d", "Conv2d", "QuantConvTranspose3d"]),
    ("trtquant.nn.modules.quant_linear", ["QuantLinear", "Linear"]),
    ("trtquant.nn.modules.quant_pooling", ["QuantAvgPool2d", "QuantAdaptiveAvgPool1d", "MaxPool3d"]),
    ("trtquant.nn.modules.clip", ["Clip"]),
    ("trtquant.nn.modules.quant_instancenorm", ["QuantInstanceNorm1d", "QuantInstanceNorm2d", "QuantInstanceNorm3d"]),
    ("trtquant.nn.modules.quant_rnn", ["QuantLSTM", "QuantLSTMCell", "LSTM", "LSTMCell"]),
    ("trtquant.nn.modules._utils", ["QuantMixin", "QuantInputMixin", "pop_quant_desc_in_kwargs"]),
    ("trtquant.nn.functional", ["ClipFunction", "clip"]),
    ("trtquant.tensor_quant", ["legacy_fake_tensor_quant", "fake_affine_tensor_quant", "scaled_e4m3",
                               "TensorQuantFunction", "FakeTensorQuantFunction"]),
    ("trtquant.calib", ["calibrate_weights", "MaxCalibrator", "HistogramCalibrator"]),
    ("trtquant.quant_modules", ["QuantModuleReplacementHelper", "initialize", "deactivate", "enable_onnx_export"]),
    ("trtquant.cuda_ext", ["fake_tensor_quant", "fake_tensor_quant_", "fake_tensor_quant_with_axis", "fake_e4m3fy"]),
])
def test_module_paths_export_the_names(path, names):
    mod = importlib.import_module(path)
    for name in names:
        assert hasattr(mod, name), f"{path}.{name}"


def test_paths_are_the_same_objects():
    from trtquant.nn.modules import quant_conv, tensor_quantizer

    assert tensor_quantizer.TensorQuantizer is trtquant.TensorQuantizer is trtquant.nn.TensorQuantizer
    assert quant_conv.QuantConv2d is trtquant.nn.QuantConv2d
    assert trtquant.enable_onnx_export is quant_modules.enable_onnx_export


def test_reduce_amax_reduces_the_given_axes():
    x = torch.tensor([[1.0, -5.0, 2.0], [-3.0, 4.0, 0.5]])
    assert float(reduce_amax(x)) == 5.0 and reduce_amax(x).dim() == 0
    assert reduce_amax(x, axis=0).tolist() == [[3.0, 5.0, 2.0]]
    assert reduce_amax(x, axis=1, keepdims=False).tolist() == [5.0, 4.0]
    assert reduce_amax(x, axis=(1,)).tolist() == [[5.0], [4.0]]
    assert reduce_amax(x, axis=(0, 1)).shape == ()  # one element: squeezed
    with pytest.raises(ValueError, match="Cannot reduce more axes"):
        reduce_amax(x, axis=(0, 1, 2))


def test_replacement_helper_patches_and_restores_including_lstm():
    originals = (nn.Linear, nn.Conv2d, nn.LSTM)
    helper_ = quant_modules.QuantModuleReplacementHelper()
    helper_.prepare_state(["Linear"], [(nn, "Linear", trtquant.nn.QuantLinear)])
    helper_.apply_quant_modules()
    try:
        assert nn.Linear is trtquant.nn.QuantLinear  # the custom entry wins over the float list
        assert nn.Conv2d is trtquant.nn.QuantConv2d and nn.LSTM is trtquant.nn.QuantLSTM
    finally:
        helper_.restore_float_modules()
    assert (nn.Linear, nn.Conv2d, nn.LSTM) == originals


def test_optim_helper_groups_and_freezes():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    groups = helper.group_parameters(model, [["^0\\."], ["^1\\."]], lrs=[0.1, 0.2], weight_decays=[0.0, 1e-4])
    assert [len(list(g["params"])) for g in groups] == [2, 2]
    assert [g["lr"] for g in groups] == [0.1, 0.2] and groups[1]["weight_decay"] == 1e-4
    with pytest.raises(TypeError, match="must match"):
        helper.group_parameters(model, [["0"]], lrs=[0.1, 0.2])
    with pytest.raises(TypeError, match="list of list"):
        helper.group_parameters(model, ["0"])
    helper.freeze_parameters(model, ["bias"])
    assert [p.requires_grad for p in model.parameters()] == [True, False, True, False]


def test_quant_weight_inplace_writes_the_quantized_weight():
    layer = trtquant.nn.QuantLinear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.3], [-0.26, 0.0]]))
    layer.weight_quantizer.amax = torch.tensor([[1.27], [1.27]])  # scale 0.01 per row
    helper.quant_weight_inplace(nn.Sequential(layer))
    assert torch.allclose(layer.weight, torch.tensor([[1.0, 0.3], [-0.26, 0.0]]), atol=0, rtol=1e-6)
    layer.weight_quantizer.amax = torch.tensor([[2.54], [2.54]])  # scale 0.02: 0.3 -> 0.3 (15), -0.26 -> -0.26
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.31, 0.29], [0.0, 1.0]]))
    helper.quant_weight_inplace(layer)
    assert torch.allclose(layer.weight, torch.tensor([[0.32, 0.28], [0.0, 1.0]]), rtol=1e-6)


def test_cuda_ext_functions_closed_form():
    x = torch.tensor([0.0, 0.26, -0.74, 1.5])
    # amax 1.27, narrow 8-bit by default: step 0.01, 1.5 clips to 1.27
    assert torch.allclose(cuda_ext.fake_tensor_quant(x, torch.tensor(1.27)), torch.tensor([0.0, 0.26, -0.74, 1.27]))
    # 4-bit unsigned-off, amax 7: step 1
    assert cuda_ext.fake_tensor_quant(torch.tensor([2.4, -9.0]), torch.tensor(7.0), 4).tolist() == [2.0, -7.0]
    y = torch.tensor([[0.6, 2.6], [0.6, 2.6]])
    out = cuda_ext.fake_tensor_quant_with_axis(y, torch.tensor([127.0, 12.7]), 0)
    assert out.flatten().tolist() == pytest.approx([1.0, 3.0, 0.6, 2.6])
    z = torch.tensor([0.3, 0.4])
    assert cuda_ext.fake_tensor_quant_(z, torch.tensor(1e-30)) is z and z.tolist() == [0.0, 0.0]  # tiny amax -> 0
    assert cuda_ext.fake_e4m3fy(torch.tensor([0.1, 3.3, 1000.0])).tolist() == [0.1015625, 3.25, 448.0]
