"""Every integer width 1-16 (signed, unsigned, narrow) and FP8 E4M3/E5M2 in fake quant, training and
calibration; export names the layer and the formats TensorRT takes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trtquant
from trtquant import QuantDescriptor, TensorQuantizer
from trtquant.errors import ExportError
from trtquant.export.onnx import export_mode
from trtquant.functional import fake_fp8, fp8_round
from trtquant.tensor_quant import fake_affine_tensor_quant, fake_tensor_quant, scaled_e4m3, tensor_quant

X = torch.tensor([-300.0, -8.6, -7.5, -2.5, -0.4, 0.0, 0.5, 1.5, 6.6, 40000.0])


@pytest.mark.parametrize("bits", range(2, 17))
@pytest.mark.parametrize("unsigned, narrow", [(False, False), (False, True), (True, False)])
def test_integer_widths_closed_form(bits, unsigned, narrow):
    """amax = bound makes the step exactly 1: the output is round-half-even(x) clamped to the code range."""
    bound = 2 ** bits - 1 if unsigned else 2 ** (bits - 1) - 1
    lo = 0 if unsigned else (-bound if narrow else -bound - 1)
    x = X.clamp_min(0) if unsigned else X
    q = TensorQuantizer(QuantDescriptor(num_bits=bits, unsigned=unsigned, narrow_range=narrow, amax=float(bound)))
    expected = torch.round(x).clamp(lo, bound)
    assert torch.equal(q(x), expected)
    assert q.quant_desc.bound == bound and q.quant_desc.format_name == f"{'u' if unsigned else ''}int{bits}"


def test_int4_codes_and_scale_function():
    codes, scale = tensor_quant(torch.tensor([0.35, -1.0, 2.0]), torch.tensor(1.4), 4)  # narrow: step 0.2
    assert codes.tolist() == [2.0, -5.0, 7.0] and float(scale) == pytest.approx(5.0)
    assert fake_tensor_quant(torch.tensor([0.35]), torch.tensor(1.4), 4).tolist() == pytest.approx([0.4])


def test_fp8_rounding_and_saturation():
    x = torch.tensor([0.1, 3.3, 17.0, -1000.0, 1e-9])
    # E4M3: 3 mantissa bits (0.1 -> 0.1015625, 3.3 -> 3.25, 17 -> 16), saturating at 448.
    assert fp8_round(x, (4, 3)).tolist() == [0.1015625, 3.25, 16.0, -448.0, 0.0]
    # E5M2: 2 mantissa bits (0.1 -> 0.09375, 3.3 -> 3.5, 17 -> 16), saturating at 57344.
    assert fp8_round(torch.tensor([0.1, 3.3, 17.0, -1e6]), (5, 2)).tolist() == [0.09375, 3.5, 16.0, -57344.0]


@pytest.mark.parametrize("fmt, maxval", [((4, 3), 448.0), ((5, 2), 57344.0)])
def test_fp8_quantizer_scales_amax_to_the_format_max(fmt, maxval):
    amax = maxval / 4  # scale 4: x * 4 is rounded, then divided back
    x = torch.tensor([0.1 / 4, 3.3 / 4, maxval])
    q = TensorQuantizer(QuantDescriptor(num_bits=fmt, amax=amax))
    assert torch.equal(q(x), fp8_round(x * 4, fmt) / 4)
    assert float(q(x)[2]) == amax  # saturates at amax
    dynamic = TensorQuantizer(QuantDescriptor(num_bits=fmt))(torch.tensor([1.0, -2.0]))
    assert dynamic.tolist() == [1.0, -2.0]  # amax 2.0 -> scale maxval/2, powers of two are exact
    assert torch.equal(scaled_e4m3(x, torch.tensor(amax), *fmt), q(x))


def test_fp8_and_int4_straight_through_gradients():
    for desc in (QuantDescriptor(num_bits=(4, 3), amax=1.0), QuantDescriptor(num_bits=4, amax=1.0)):
        x = torch.tensor([0.5, -2.0, 0.999, 1.5], requires_grad=True)
        TensorQuantizer(desc)(x).sum().backward()
        assert x.grad.tolist() == [1.0, 0.0, 1.0, 0.0], desc


def test_fake_affine_quant_closed_form():
    # [0, 2.55] in 8 bits: step 0.01, zero point 128 -> values inside land on the 0.01 grid, outside clip
    out = fake_affine_tensor_quant(torch.tensor([0.123, 3.0, -1.0]), torch.tensor(0.0), torch.tensor(2.55))
    assert out.tolist() == pytest.approx([0.12, 2.55, 0.0], abs=1e-6)


def test_qat_step_with_4bit_weights_and_fp8_inputs():
    torch.manual_seed(0)
    layer = trtquant.nn.QuantLinear(4, 3, quant_desc_input=QuantDescriptor(num_bits=(4, 3)),
                                    quant_desc_weight=QuantDescriptor(num_bits=4, axis=0))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    before = layer.weight.detach().clone()
    loss = layer(x).pow(2).sum()
    loss.backward()
    assert layer.weight.grad is not None and bool(layer.weight.grad.abs().sum() > 0)
    opt.step()
    assert not torch.equal(before, layer.weight)
    w_q = layer.weight_quantizer(layer.weight.detach())
    steps = w_q / (layer.weight.detach().abs().amax(1, keepdim=True) / 7)
    assert torch.allclose(steps, steps.round(), atol=1e-4)  # every weight on its row's 4-bit grid


@pytest.mark.parametrize("desc", [QuantDescriptor(num_bits=4), QuantDescriptor(num_bits=(4, 3)),
                                  QuantDescriptor(num_bits=12, calib_method="histogram")])
def test_calibration_for_other_formats(desc):
    q = TensorQuantizer(desc)
    q.disable_quant()
    q.enable_calib()
    q(torch.tensor([0.5, -3.0, 1.0]))
    q(torch.tensor([2.0, -1.0]))
    q.disable_calib()
    q.load_calib_amax("max") if desc.calib_method == "max" else q.load_calib_amax("percentile", percentile=100)
    assert float(q.amax) == pytest.approx(3.0, rel=1e-3)
    q.enable_quant()
    assert q(torch.tensor([3.0]))[0] == pytest.approx(3.0, rel=1e-3)


def test_multi_axis_calibration_keeps_both_axes():
    q = TensorQuantizer(QuantDescriptor(axis=(0, 1)), if_calib=True, if_quant=False)
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    q(x)
    q.load_calib_amax()
    assert q.amax.shape == (2, 3, 1) and q.amax.flatten().tolist() == [3.0, 7.0, 11.0, 15.0, 19.0, 23.0]


def test_export_names_the_layer_and_what_tensorrt_accepts():
    model = nn.Sequential(nn.Linear(4, 2))
    model = trtquant.quantize(model, config={"weight": QuantDescriptor(num_bits=4, axis=0)}, placement=None)
    qs = trtquant.quantizers(model)
    qs["0.input_quantizer"].amax = 1.0
    qs["0.weight_quantizer"].amax = torch.ones(2, 1)
    with pytest.raises(ExportError) as info:
        with export_mode(model):
            pass
    msg = str(info.value)
    assert "0.weight_quantizer quantizes to int4" in msg and "TensorRT accepts INT8" in msg
    assert "FP8 E4M3 (num_bits=(4, 3), per tensor)" in msg and "block_size=64 or 128, weight-only" in msg


@pytest.mark.parametrize("fmt", [(4, 3), (5, 2)])
def test_fp8_mse_calibration_matches_the_per_histogram_search(fmt):
    from trtquant.calib.methods import mse_amax

    torch.manual_seed(0)
    x = torch.randn(4000)
    q = TensorQuantizer(QuantDescriptor(num_bits=fmt, calib_method="histogram"), if_calib=True, if_quant=False)
    q(x)
    q.load_calib_amax("mse")  # the batched search
    hist, edges = q._calibrator.histogram
    assert float(q.amax) == float(mse_amax(hist, edges, fmt)) and 0 < float(q.amax) <= float(x.abs().max()) + 1e-2
    with pytest.raises(ValueError, match="for FP8 use method 'mse', 'percentile' or 'max'"):
        q.load_calib_amax("entropy")
