"""set_state/get_state: one explicit switch, and each classic misuse caught with a clear message."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import trtquant
from trtquant.errors import QuantizerNotCalibratedError
from trtquant.states import QuantStateError, QuantStateWarning, get_state, set_state

import _qref as R


class Net(nn.Module):
    """Conv-BN-ReLU, a residual block, a MaxPool (placement disables its quantizer), Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(x)))
        x = self.pool(x).mean(dim=(2, 3))
        return self.fc(x)


def _data(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(n)]


def _quantized():
    net = Net()
    with torch.no_grad():  # running stats that match batch statistics: eval and train see similar ranges
        for bn in (net.bn1, net.bn2):
            bn.momentum = None
        net.train()
        for b in _data(4, seed=9):
            net(b)
    return trtquant.quantize(net).eval()


def _calibrated():
    m = _quantized()
    trtquant.calibrate(m, _data(), method="max", progress=False)
    return m


def _active(m):
    return {n for n, q in trtquant.quantizers(m).items() if q.is_enabled}


# -- the switch ---------------------------------------------------------------------------------
def test_unknown_state_is_a_value_error():
    with pytest.raises(ValueError, match="'calibrate', 'validate', 'qat', 'float'"):
        set_state(_calibrated(), "int8")


def test_calibrate_state_collects_without_quantizing_then_validate_quantizes():
    m = _quantized()
    ref = copy.deepcopy(m)
    set_state(ref, "float")
    x = _data(1, seed=3)[0]
    set_state(m, "calibrate")
    assert get_state(m) == "calibrate"
    with torch.no_grad():
        for b in _data():
            m(b)
        assert torch.equal(m(x), ref(x))  # calibrating passes values through
    trtquant.compute_amax(m, method="max")
    # conv2's input and the residual Add's identity input are one tensor: both saw the same data
    assert torch.equal(m.residual_quantizer.amax, m.conv2.input_quantizer.amax)
    set_state(m, "validate")
    assert get_state(m) == "validate"
    with torch.no_grad():
        out = m(x)
    assert not torch.equal(out, ref(x))
    assert torch.allclose(out, ref(x), atol=0.2)


def test_float_disables_everything_and_validate_restores_exactly_the_previous_set():
    m = _calibrated()
    before = _active(m)
    assert "pool.input_quantizer" not in before  # placement turned the MaxPool one off
    set_state(m, "float")
    assert get_state(m) == "float" and _active(m) == set()
    plain = Net().eval()
    plain.load_state_dict(m.state_dict(), strict=False)
    x = _data(1)[0]
    with torch.no_grad():
        assert torch.equal(m(x), plain(x))
    set_state(m, "validate")
    assert _active(m) == before


def _record_quantizers(m):
    """Forward hooks on every quantizing quantizer: name -> (input, output) of its last call."""
    seen, handles = {}, []
    for name, q in trtquant.quantizers(m).items():
        if q.is_enabled and q._if_quant:
            handles.append(q.register_forward_hook(
                lambda mod, args, out, name=name: seen.__setitem__(name, (args[0].detach(), out.detach()))))
    return seen, handles


def test_qat_state_trains_through_the_straight_through_estimator():
    m = _calibrated().train()
    m.conv1.input_quantizer.amax = 0.5  # clip most of the input: the STE mask has both values
    set_state(m, "qat")
    assert get_state(m) == "qat"
    x = _data(1)[0].requires_grad_()
    seen, handles = _record_quantizers(m)
    loss = m(x).square().mean()
    for h in handles:
        h.remove()
    # Every quantizer computed the definition on what it was given (teacher-forced, layer by layer).
    assert {"conv1.input_quantizer", "conv1.weight_quantizer", "fc.input_quantizer"} <= set(seen)
    for name, (inp, out) in seen.items():
        assert torch.equal(out, R.fake_quant(inp, trtquant.quantizers(m)[name].amax)), name
    loss.backward()
    assert m.conv1.weight.grad is not None and m.conv1.weight.grad.abs().sum() > 0
    assert m.fc.weight.grad.abs().sum() > 0
    # Straight-through: the input gradient is exactly 0 where |x| > amax and (almost everywhere) not inside.
    clipped = x.detach().abs() > 0.5
    assert int(clipped.sum()) > 100 and int((~clipped).sum()) > 100
    assert bool((x.grad[clipped] == 0).all())
    assert float((x.grad[~clipped] != 0).float().mean()) > 0.9


def test_get_state_infers_without_a_record():
    m = _quantized()
    assert get_state(m) == "validate"  # quantizers quantize by default
    m.train()
    assert get_state(m) == "qat"
    for q in trtquant.quantizers(m).values():
        q.disable()
    assert get_state(m) == "float"
    assert get_state(Net()) is None


# -- misuse: wrong mode when switching -------------------------------------------------------------
def test_calibrating_in_train_mode_is_an_error():
    m = _quantized().train()
    with pytest.raises(QuantStateError, match="updates BatchNorm running stats with calibration data"):
        set_state(m, "calibrate")


def test_validate_in_train_mode_is_an_error():
    m = _calibrated().train()
    with pytest.raises(QuantStateError, match=r"'validate'\) needs model.eval\(\)"):
        set_state(m, "validate")


def test_qat_in_eval_mode_is_an_error():
    m = _calibrated()
    with pytest.raises(QuantStateError, match=r"'qat'\) needs model.train\(\)"):
        set_state(m, "qat")


# -- misuse: scales still at their initial values ---------------------------------------------------
@pytest.mark.parametrize("state", ["validate", "qat"])
def test_uncalibrated_quantizers_are_named(state):
    m = _quantized()
    m.train(state == "qat")
    with pytest.raises(QuantizerNotCalibratedError, match=r"still have no amax.*conv1\.input_quantizer.*fc\.weight_quantizer"):
        set_state(m, state)


def test_statistics_collected_but_amax_never_computed():
    m = _quantized()
    set_state(m, "calibrate")
    with torch.no_grad():
        m(_data(1)[0])
    with pytest.raises(QuantizerNotCalibratedError, match=r"compute_amax"):
        set_state(m, "validate")


def test_recalibrated_but_amax_stale():
    m = _calibrated()
    set_state(m, "calibrate")
    with torch.no_grad():
        m(_data(1, seed=5)[0] * 10)
    with pytest.raises(QuantizerNotCalibratedError, match=r"not recomputed from them: .*conv1\.input_quantizer"):
        set_state(m, "validate")
    trtquant.compute_amax(m, method="max")
    set_state(m, "validate")  # now fine


def test_uncalibrated_check_can_be_skipped_for_partially_calibrated_models():
    m = _quantized()
    set_state(m, "validate", check_calibrated=False)
    assert get_state(m) == "validate"


# -- misuse: a later eval()/train() silently changing behaviour --------------------------------------
def test_eval_after_qat_warns_once_on_forward():
    m = _calibrated().train()
    set_state(m, "qat")
    m.eval()
    x = _data(1)[0]
    with pytest.warns(QuantStateWarning, match=r"set_state\(model, 'qat'\) but the model is now in eval mode"):
        m(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(x)  # once per misfit, not per call
    set_state(m, "validate")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(x)


def test_train_after_validate_warns():
    m = _calibrated()
    set_state(m, "validate")
    m.train()
    with pytest.warns(QuantStateWarning, match="BatchNorm normalises with batch statistics"):
        m(_data(1)[0])


def test_strict_raises_on_forward():
    m = _calibrated().train()
    set_state(m, "qat", strict=True)
    m.eval()
    with pytest.raises(QuantStateError, match="this is a validation pass, not QAT"):
        m(_data(1)[0])


def test_train_after_calibrate_raises_before_batchnorm_updates():
    m = _quantized()
    set_state(m, "calibrate")
    m.train()
    stats = m.bn1.running_mean.clone()
    with pytest.raises(QuantStateError, match="updates BatchNorm running stats"):
        m(_data(1)[0])
    assert torch.equal(m.bn1.running_mean, stats)


def test_the_check_survives_deepcopy_and_follows_the_copy():
    m = _calibrated().train()
    set_state(m, "qat")
    c = copy.deepcopy(m)
    c.eval()
    with pytest.warns(QuantStateWarning):
        c(_data(1)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(_data(1)[0])  # the original is still in train mode: fine


def test_observe_only_quantizers_stay_pass_through():
    m = _calibrated()
    q = m.fc.input_quantizer
    q.ort_only = True
    q.disable_quant()
    set_state(m, "validate")
    assert q.is_enabled and not q._if_quant
    m.train()
    set_state(m, "qat")
    assert not q._if_quant
