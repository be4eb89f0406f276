"""TensorQuantizer's pytorch-quantization semantics: dynamic amax, scale/step_size, pre_quant_scale, setters,
learned range via Clip - and trtquant's guards that still refuse uncalibrated quantizers where it matters."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch

import trtquant
from trtquant import QuantDescriptor, QuantizerNotCalibratedError, TensorQuantizer
from trtquant.errors import ExportError
from trtquant.export.onnx import export_mode
from trtquant.functional import fake_quant
from trtquant.quant_modules import enable_onnx_export

from _models import SmallNet, images


# -- dynamic amax (the original's semantics for a quantizer without amax) --------------------------------
def test_uncalibrated_quantizer_uses_the_inputs_amax():
    x = torch.tensor([0.5, -2.54, 1.0])
    out = TensorQuantizer()(x)  # amax 2.54 -> step 0.02
    assert torch.allclose(out, torch.tensor([0.5, -2.54, 1.0]), atol=1e-6)
    assert torch.equal(out, fake_quant(x, torch.tensor(2.54)))
    assert TensorQuantizer().amax is None  # nothing stored


def test_dynamic_amax_per_channel_and_multi_axis():
    x = torch.tensor([[[1.0, -4.0]], [[0.3, 0.1]]])  # (2, 1, 2)
    q = TensorQuantizer(QuantDescriptor(axis=0, num_bits=4))  # bound 7: channel amax 4.0 and 0.3
    expected = torch.stack([fake_quant(x[0], torch.tensor(4.0), 4), fake_quant(x[1], torch.tensor(0.3), 4)])
    assert torch.equal(q(x), expected)
    assert torch.equal(q._get_amax(x), torch.tensor([[[4.0]], [[0.3]]]))
    m = TensorQuantizer(QuantDescriptor(axis=(0, 2)))
    assert m._get_amax(x).shape == (2, 1, 2) and torch.equal(m._get_amax(x), x.abs())


def test_scale_amax_applies_to_dynamic_and_given_amax():
    x = torch.tensor([1.0, -2.0])
    q = TensorQuantizer(QuantDescriptor(scale_amax=0.5))
    assert float(q._get_amax(x)) == 1.0  # 2.0 * 0.5
    given = TensorQuantizer(QuantDescriptor(amax=4.0, scale_amax=0.5))
    assert float(given.amax) == 2.0 and torch.equal(given(x), fake_quant(x, torch.tensor(2.0)))
    assert torch.equal(given(x), given(x))  # applied once, not per call


def test_trtquant_quantize_keeps_the_guard():
    model = trtquant.quantize(SmallNet().eval())
    with pytest.raises(QuantizerNotCalibratedError, match=r"conv1\.input_quantizer"):
        model(images(1, 1)[0])
    assert all(not q.dynamic_amax for q in trtquant.quantizers(model).values() if q.is_enabled
               and type(q).__name__ == "TensorQuantizer" and q.name.endswith(("input_quantizer", "weight_quantizer"))
               and q.name.split(".")[0] in ("conv1", "fc"))


def test_export_refuses_dynamic_quantizers_and_names_them():
    layer = trtquant.nn.QuantLinear(3, 2)  # pytorch-quantization constructor: dynamic amax
    model = torch.nn.Sequential(OrderedDict(fc=layer))
    assert model(torch.ones(1, 3)).shape == (1, 2)  # runs dynamically
    with pytest.raises(ExportError, match=r"have no amax: fc\.input_quantizer, fc\.weight_quantizer"):
        with export_mode(model):
            pass
    with enable_onnx_export(), pytest.raises(QuantizerNotCalibratedError, match="ONNX export needs a calibrated"):
        layer(torch.ones(1, 3))
    assert not TensorQuantizer._enable_onnx_export  # reset after the error


# -- properties and setters ---------------------------------------------------------------------------
def test_step_size_scale_and_maxbound():
    q = TensorQuantizer(QuantDescriptor(amax=2.54))
    assert float(q.step_size) == pytest.approx(0.02) and q.maxbound == 127
    assert TensorQuantizer().step_size is None
    real = TensorQuantizer(QuantDescriptor(fake_quant=False, amax=2.54))
    codes = real(torch.tensor([0.5, -1.0]))
    assert codes.tolist() == [25.0, -50.0] and float(real.scale) == pytest.approx(50.0)
    assert TensorQuantizer(QuantDescriptor(num_bits=(4, 3))).maxbound == 448.0
    assert TensorQuantizer(QuantDescriptor(num_bits=4, unsigned=True)).maxbound == 15


def test_pre_quant_scale_multiplies_before_quantizing_and_checkpoints():
    q = TensorQuantizer(QuantDescriptor(amax=127.0))  # step 1
    x = torch.tensor([[0.0, 0.4, 1.1, 2.0]])
    assert q(x).tolist() == [[0.0, 0.0, 1.0, 2.0]]
    q.pre_quant_scale = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert q(x).tolist() == [[0.0, 1.0, 3.0, 8.0]]
    with pytest.raises(RuntimeError, match="changing the shape of pre_quant_scale"):
        q.pre_quant_scale = torch.ones(2)
    fresh = TensorQuantizer(QuantDescriptor(amax=127.0))
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.pre_quant_scale, q.pre_quant_scale)


def test_setters_replace_the_descriptor():
    q = TensorQuantizer()
    q.num_bits, q.unsigned, q.narrow_range = 7, True, True
    assert (q.num_bits, q.unsigned, q.narrow_range, q.maxbound) == (7, True, True, 127)
    assert q.quant_desc.num_bits == 7
    with pytest.raises(ValueError, match="num_bits=40"):
        q.num_bits = 40


def test_amax_setter_takes_lists_and_arrays():
    q = TensorQuantizer(QuantDescriptor(axis=0))
    q.amax = [3.0, 2.0]
    assert q.amax.tolist() == [3.0, 2.0]
    q.amax = np.array([1.5, 0.5], dtype=np.float32)
    assert q.amax.tolist() == [1.5, 0.5]
    d = QuantDescriptor(axis=0, amax=[1.0, 2.0])
    assert isinstance(d.amax, np.ndarray) and d.amax.dtype == np.float32
    assert TensorQuantizer(d).amax.tolist() == [1.0, 2.0]
    assert q.axis == (0,) and q.axis == 0 and q._axis == 0  # old code compares with the int


def test_learn_amax_descriptor_learns_through_clip():
    q = TensorQuantizer(QuantDescriptor(amax=0.5, learn_amax=True))
    assert float(q.clip.clip_value_max.detach()) == 0.5 and float(q.clip.clip_value_min.detach()) == -0.5
    x = torch.tensor([0.25, 1.0, -1.0], requires_grad=True)
    out = q(x)
    assert out.detach().tolist() == pytest.approx([0.25, 0.5, -0.5], abs=2e-3)
    out.sum().backward()
    # PACT: the clipped values' gradient flows to the bounds.
    assert float(q.clip.clip_value_max.grad) == 1.0 and float(q.clip.clip_value_min.grad) == 1.0
    q.amax = 0.8
    q.init_learn_amax()
    assert float(q.clip.clip_value_max.detach()) == pytest.approx(0.8)
    only_clip = TensorQuantizer(QuantDescriptor(amax=0.5, learn_amax=True), if_quant=False)
    assert only_clip(torch.tensor([0.7, 0.1])).tolist() == pytest.approx([0.5, 0.1])


def test_load_calib_amax_without_data_names_the_calibrator():
    q = TensorQuantizer(QuantDescriptor(axis=0))
    q.enable_calib()
    with pytest.raises(RuntimeError, match="Calibrator returned None"):
        q.load_calib_amax()


# -- layers ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda d: trtquant.nn.QuantLinear(2, 2, quant_desc_input=d),
    lambda d: trtquant.nn.QuantLinear(2, 2, quant_desc_weight=d),
    lambda d: trtquant.nn.QuantAvgPool2d(2, quant_desc_input=d),
    lambda d: trtquant.nn.QuantConv2d(1, 1, 1, quant_desc_input=d),
])
def test_layers_refuse_real_quantization(make):
    with pytest.raises(ValueError, match="Only fake quantization is supported"):
        make(QuantDescriptor(fake_quant=False))


def test_unknown_layer_keyword_is_unused_keys_type_error():
    with pytest.raises(TypeError, match="Unused keys: \\['descriptor'\\]"):
        trtquant.nn.QuantConv2d(1, 1, 3, descriptor="oops")
    with pytest.raises(ValueError, match="QuantDescriptor"):  # the original raises ValueError here
        trtquant.nn.QuantConv2d.set_default_quant_desc_input("oops")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="QuantDescriptor"):  # and trtquant TypeError: both hold
        trtquant.nn.QuantConv2d.set_default_quant_desc_input("oops")  # type: ignore[arg-type]
