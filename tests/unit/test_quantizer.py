"""TensorQuantizer: modes, amax validation, calibration, state dict, learned amax, clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import trtquant
from trtquant import CalibrationError, QuantDescriptor, QuantizerNotCalibratedError, TensorQuantizer
from trtquant.functional import fake_quant

import _qref as R
from _models import SmallNet, images

PHRASE = "run calibration or load a calibrated checkpoint"


def _calibrated(desc=QuantDescriptor(), data=None, **amax_kwargs) -> TensorQuantizer:
    q = TensorQuantizer(desc)
    q.disable_quant()
    q.enable_calib()
    for x in data if data is not None else [torch.randn(4, 3, 5, 5)]:
        q(x)
    q.disable_calib()
    q.load_calib_amax(**amax_kwargs)
    q.enable_quant()
    return q


def test_modes_pass_through():
    q = TensorQuantizer()
    x = torch.randn(10)
    q.disable()
    assert q(x) is x and not q.is_enabled
    q.enable()
    q.disable_quant()
    assert q(x) is x
    q.enable_quant()
    q.amax = 1.0
    assert torch.equal(q(x), R.fake_quant(x, 1.0))
    state = q.get_state()
    q.disable()
    q.disable_quant()
    q.set_state(state)
    assert q.get_state() == {"disabled": False, "quant": True, "calib": False}


def test_uncalibrated_forward_names_quantizer_after_quantize():
    model = trtquant.quantize(SmallNet().eval())
    with pytest.raises(QuantizerNotCalibratedError) as info:
        model(images(1, 1)[0])
    msg = str(info.value)
    assert msg.startswith("conv1.input_quantizer ") and PHRASE in msg
    assert isinstance(info.value, trtquant.TrtQuantError)
    # A weight quantizer reached alone names itself too.
    model.conv1.input_quantizer.amax = 3.0
    with pytest.raises(QuantizerNotCalibratedError, match=r"^conv1\.weight_quantizer .*" + PHRASE):
        model(images(1, 1)[0])
    # An anonymous quantizer with the guard on describes itself.
    q = TensorQuantizer()
    q.dynamic_amax = False
    with pytest.raises(QuantizerNotCalibratedError, match=r"TensorQuantizer\(8bit fake per-tensor amax=None\)"):
        q(torch.ones(2))
    # pytorch-quantization's constructor semantics: no amax means the input's own amax (here 2.0).
    assert torch.equal(TensorQuantizer()(torch.tensor([2.0, -1.0])), R.fake_quant(torch.tensor([2.0, -1.0]), 2.0))


def test_forward_closed_form_per_tensor_narrow_unsigned():
    """The quantizer's output from the definition: hand-written codes at scale 1/16 (amax 127/16)."""
    x = torch.tensor(R.HAND_X)
    q = TensorQuantizer(QuantDescriptor(amax=R.AMAX_SIXTEENTH))
    assert q(x).tolist() == [c * R.SCALE_SIXTEENTH for c in R.HAND_CODES]
    narrow = TensorQuantizer(QuantDescriptor(amax=R.AMAX_SIXTEENTH, narrow_range=True))
    assert narrow(x).tolist() == [c * R.SCALE_SIXTEENTH for c in R.HAND_CODES_NARROW]
    unsigned = TensorQuantizer(QuantDescriptor(amax=255 / 16, unsigned=True))  # scale 1/16 again
    assert unsigned(torch.tensor([-1.0, 0.09375, 15.96875, 40.0])).tolist() == [0.0, 0.125, 15.9375, 15.9375]
    real = TensorQuantizer(QuantDescriptor(amax=R.AMAX_SIXTEENTH, fake_quant=False))
    assert real(x).tolist() == [float(c) for c in R.HAND_CODES]
    # export_constants: scale = float32(amax) / 127, zero point int8 0.
    scale, zp, axis = q.export_constants()
    assert float(scale) == R.SCALE_SIXTEENTH and zp.dtype == torch.int8 and int(zp) == 0 and axis == -1


def test_forward_closed_form_per_channel_after_calibration():
    """Calibrated per-channel amax = max |x| per channel; output = numpy's rint(x / (amax / 127)) * scale."""
    g = torch.Generator().manual_seed(5)
    data = [torch.randn(4, 3, 5, 5, generator=g) * torch.tensor([0.5, 2.0, 7.0]).reshape(1, 3, 1, 1)]
    q = _calibrated(QuantDescriptor(axis=1), data)
    amax = data[0].abs().amax(dim=(0, 2, 3)).reshape(1, 3, 1, 1)
    assert torch.equal(q.amax, amax)
    x = data[0] * 1.3  # some values beyond amax: saturation
    y = q(x)
    assert torch.equal(y, R.fake_quant(x, amax))
    step = torch.from_numpy(R.scale_of(amax))
    assert bool(((y - x).abs() <= step / 2 * (1 + 1e-6) + (x.abs() - amax).clamp(min=0)).all())
    scale, zp, axis = q.export_constants()
    assert axis == 1 and scale.shape == (3,) and torch.equal(scale, torch.from_numpy(R.scale_of(amax)).flatten())


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, -math.inf])
def test_amax_setter_rejects_invalid(bad):
    q = TensorQuantizer()
    q.name = "layer.input_quantizer"
    q.amax = 2.0
    for value in (bad, torch.tensor(bad)):
        with pytest.raises(ValueError, match=r"layer\.input_quantizer.*amax") as info:
            q.amax = value
        assert "finite" in str(info.value) or "> 0" in str(info.value)
    assert float(q.amax) == 2.0  # unchanged


def test_amax_setter_per_channel():
    q = TensorQuantizer(QuantDescriptor(axis=0))
    q.amax = torch.tensor([[1.0], [0.0], [2.0]])  # a dead channel is allowed (scale 1.0 at export)
    assert q.amax.shape == (3, 1)
    for bad in ([[1.0], [-1.0], [2.0]], [[1.0], [math.nan], [2.0]], [[math.inf], [1.0], [1.0]], [[0.0], [0.0], [0.0]]):
        with pytest.raises(ValueError, match="amax"):
            q.amax = torch.tensor(bad)
    assert torch.equal(q.amax, torch.tensor([[1.0], [0.0], [2.0]]))
    q.amax = None
    assert q.amax is None and "_amax" not in q.state_dict()


def test_fixed_amax_from_descriptor():
    q = TensorQuantizer(QuantDescriptor(amax=2.5))
    assert q.amax.dtype == torch.float32 and float(q.amax) == 2.5
    assert torch.equal(q.state_dict()["_amax"], torch.tensor(2.5))
    x = torch.randn(100) * 3
    assert torch.equal(q(x), R.fake_quant(x, 2.5))


def test_max_calibration_per_tensor_and_per_channel():
    data = [torch.randn(4, 3, 5, 5) * s for s in (1.0, 3.0, 2.0)]
    q = _calibrated(QuantDescriptor(), data)
    assert torch.equal(q.amax, torch.stack([d.abs().max() for d in data]).max())
    qc = _calibrated(QuantDescriptor(axis=1), data)
    expected = torch.stack([d.abs().amax(dim=(0, 2, 3)) for d in data]).amax(0)
    assert qc.amax.shape == (1, 3, 1, 1) and torch.equal(qc.amax.flatten(), expected)
    x = data[0]
    assert torch.equal(qc(x), R.fake_quant(x, qc.amax))
    scaled = _calibrated(QuantDescriptor(scale_amax=0.5), data)
    assert torch.equal(scaled.amax, q.amax * 0.5)


def test_histogram_calibration_methods():
    data = [torch.randn(8, 1000)]
    q_max = _calibrated(QuantDescriptor(), data)
    q_pct = _calibrated(QuantDescriptor(calib_method="histogram"), data, method="percentile", percentile=99.0)
    assert 0 < float(q_pct.amax) < float(q_max.amax)
    q_ent = _calibrated(QuantDescriptor(calib_method="histogram"), data, method="entropy")
    assert 0 < float(q_ent.amax) <= float(q_max.amax) * 1.01
    with pytest.raises(ValueError, match="needs a histogram"):
        _calibrated(QuantDescriptor(), data, method="entropy")
    with pytest.raises(ValueError, match="per-tensor only"):
        TensorQuantizer(QuantDescriptor(calib_method="histogram", axis=0))


def test_calibration_with_no_data_and_with_zeros():
    q = TensorQuantizer(QuantDescriptor())
    q.name = "head.input_quantizer"
    with pytest.raises(CalibrationError, match=r"head\.input_quantizer collected no data"):
        q.load_calib_amax()
    q.load_calib_amax(strict=False)
    assert q.amax is None
    zeros = _calibrated(QuantDescriptor(), [torch.zeros(3, 3)])
    assert float(zeros.amax) == 1.0 and torch.equal(zeros(torch.zeros(3)), torch.zeros(3))


def test_calibration_nonfinite_is_an_error_naming_the_quantizer():
    q = TensorQuantizer()
    q.name = "conv.input_quantizer"
    q.disable_quant()
    q.enable_calib()
    q(torch.tensor([1.0, math.nan, 2.0]))
    with pytest.raises(CalibrationError, match=r"conv\.input_quantizer saw NaN or inf.*ignore_nonfinite=True"):
        q.load_calib_amax()
    assert q.amax is None


def test_fixed_amax_quantizer_has_calibrator_or_explains():
    q = TensorQuantizer(QuantDescriptor(amax=1.0))
    q._calibrator = None
    with pytest.raises(CalibrationError, match="no calibrator"):
        q.enable_calib()


def test_state_dict_only_when_calibrated():
    q = TensorQuantizer()
    assert "_amax" not in q.state_dict()
    q.amax = 3.0
    sd = q.state_dict()
    assert torch.equal(sd["_amax"], torch.tensor(3.0))
    fresh = TensorQuantizer()
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.amax, torch.tensor(3.0))
    # A checkpoint without amax keeps the current one (strict, no missing key).
    assert fresh.load_state_dict({}, strict=True).missing_keys == []
    assert float(fresh.amax) == 3.0
    with pytest.raises(RuntimeError, match="_amax"):
        TensorQuantizer().load_state_dict({"_amax": torch.tensor(-3.0)})


def test_learned_amax():
    q = TensorQuantizer()
    with pytest.raises(QuantizerNotCalibratedError, match="calibrate first"):
        q.init_learn_amax()
    q.amax = 1.5
    q.init_learn_amax()
    assert q.learn_amax and isinstance(q._amax, torch.nn.Parameter)
    assert [n for n, _ in q.named_parameters()] == ["_amax"] and list(q.state_dict()) == ["_amax"]
    x = torch.randn(1000) * 2
    y = q(x)
    assert torch.equal(y.detach(), R.fake_quant(x, 1.5))
    y.sum().backward()
    assert q._amax.grad is not None and q._amax.grad.shape == () and float(q._amax.grad) != 0.0
    # LSQ gradient in closed form: d y / d amax = (q - x/s) / 127 inside, q_clipped / 127 outside.
    s = np.float32(1.5) / np.float32(127)
    v = x.numpy().astype(np.float64) / float(s)
    code = np.rint(v)
    inside = (code >= -128) & (code <= 127)
    expected = float(np.where(inside, code - v, np.clip(code, -128, 127)).sum() / 127)
    assert math.isclose(float(q._amax.grad), expected, rel_tol=1e-3, abs_tol=1e-3), (float(q._amax.grad), expected)
    p = q._amax
    q.amax = 2.0
    assert q._amax is p and float(p.detach()) == 2.0
    with pytest.raises(ValueError, match="cannot be unset"):
        q.amax = None
    with pytest.raises(ValueError):
        q.amax = -1.0
    fresh = TensorQuantizer()
    fresh.amax = 1.0
    fresh.init_learn_amax()
    fresh.load_state_dict(q.state_dict())
    assert float(fresh.amax.detach()) == 2.0 and isinstance(fresh._amax, torch.nn.Parameter)


def test_real_quant_returns_codes_and_unsigned():
    q = TensorQuantizer(QuantDescriptor(fake_quant=False, amax=1.27))
    codes = q(torch.tensor([-5.0, -0.0149, 0.015, 1.0, 5.0]))
    assert codes.tolist() == [-128.0, -1.0, 2.0, 100.0, 127.0]
    u = TensorQuantizer(QuantDescriptor(unsigned=True, amax=2.55))
    y = u(torch.tensor([-1.0, 0.0, 0.5, 9.0]))
    assert torch.equal(y, R.fake_quant(torch.tensor([-1.0, 0.0, 0.5, 9.0]), 2.55, unsigned=True))
    assert float(y[0]) == 0.0 and not torch.signbit(y[0]) and float(y[-1]) == float(torch.tensor(2.55))


def test_extra_repr():
    q = TensorQuantizer(QuantDescriptor(axis=0, narrow_range=True, unsigned=True))
    assert repr(q) == "TensorQuantizer(8bit fake per-channel axis=0 unsigned narrow amax=dynamic)"
    q.dynamic_amax = False  # trtquant.quantize's layers: no amax means not calibrated yet
    assert repr(q) == "TensorQuantizer(8bit fake per-channel axis=0 unsigned narrow amax=None)"
    q.amax = torch.tensor([[1.0], [3.0]])
    assert "amax=shape (2, 1), min 1, max 3" in repr(q)
    q.disable()
    assert repr(q) == "TensorQuantizer(disabled)"


def test_type_checks():
    with pytest.raises(TypeError, match="QuantDescriptor"):
        TensorQuantizer({"num_bits": 8})


@pytest.mark.gpu
def test_amax_follows_module_device_and_checkpoint_device():
    q = TensorQuantizer()
    q.amax = 2.0
    q.cuda()
    assert q.amax.device.type == "cuda"
    q.load_state_dict({"_amax": torch.tensor(3.0)})
    assert q.amax.device.type == "cuda" and float(q.amax) == 3.0
    x = torch.randn(100, device="cuda")
    assert torch.equal(q(x).cpu(), fake_quant(x.cpu(), torch.tensor(3.0)))
