"""sensitivity() finds a layer made fragile on purpose; auto_fallback() meets the budget by excluding it."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trtquant
from trtquant.errors import QuantizerNotCalibratedError
from trtquant.sensitivity import auto_fallback, format_sensitivity, quant_groups, sensitivity
from trtquant.states import get_state, set_state


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5, bias=False)  # the output is all signal, no constant offset

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _fragile_float() -> Chain:
    """conv2's output channel 0 is 1000x larger and conv3 divides it back: the float function is
    unchanged (ReLU is positively homogeneous), but conv3's per-tensor input quantizer now spends its
    whole range on that one channel and flushes the other seven to zero."""
    torch.manual_seed(0)
    m = Chain().eval()
    with torch.no_grad():
        m.conv2.weight[0] *= 1000.0
        m.conv2.bias[0] *= 1000.0
        m.conv3.weight[:, 0] /= 1000.0
    return m


def _data(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(n)]


def _calibrated(model: nn.Module) -> nn.Module:
    q = trtquant.quantize(model).eval()
    trtquant.calibrate(q, _data(), method="max", progress=False)
    return q


def _reference(float_model: nn.Module, xs):
    with torch.no_grad():
        return [float_model(x) for x in xs]


def _cosine_metric(float_model: nn.Module, xs):
    refs = _reference(float_model, xs)

    def metric(model: nn.Module) -> float:
        with torch.no_grad():
            outs = [model(x) for x in xs]
        return float(torch.stack([F.cosine_similarity(o.flatten(), r.flatten(), dim=0) for o, r in zip(outs, refs)]).mean())

    return metric


def _flags(model):
    return {n: q.get_state() for n, q in trtquant.quantizers(model).items()}


def test_the_fragile_model_is_the_same_function_in_float():
    torch.manual_seed(0)
    plain = Chain().eval()
    x = _data(1)[0]
    with torch.no_grad():
        assert torch.allclose(plain(x), _fragile_float()(x), rtol=1e-4, atol=1e-5)


def test_groups_are_layers_plus_standalone_quantizers():
    q = _calibrated(_fragile_float())
    groups = quant_groups(q)
    assert groups["conv3"] == ("Conv2d", ["conv3.input_quantizer", "conv3.weight_quantizer"])
    assert groups["fc"][0] == "Linear"
    assert all(kind == "TensorQuantizer" for name, (kind, _) in groups.items() if name not in {"conv1", "conv2", "conv3", "fc"})


def test_sensitivity_ranks_the_fragile_layer_first():
    q = _calibrated(_fragile_float())
    ranking = sensitivity(q, _data())
    assert ranking[0].name == "conv3"
    assert ranking[0].quantizers == ["conv3.input_quantizer", "conv3.weight_quantizer"]
    others = [r.sqnr_db for r in ranking[1:]]
    assert ranking[0].sqnr_db < 15.0 < min(others), format_sensitivity(ranking)
    assert ranking[0].mse > max(r.mse for r in ranking[1:])
    assert "| 1 | conv3 | Conv2d |" in format_sensitivity(ranking)


def test_sensitivity_with_a_user_metric_ranks_by_it():
    float_model = _fragile_float()
    q = _calibrated(_fragile_float())
    metric = _cosine_metric(float_model, _data(1, seed=7))
    ranking = sensitivity(q, None, metric=metric)
    assert ranking[0].name == "conv3" and ranking[0].sqnr_db is None
    assert ranking[0].metric < min(r.metric for r in ranking[1:])


def test_sensitivity_restores_states_mode_and_record():
    q = _calibrated(_fragile_float())
    q.train()
    set_state(q, "qat")
    before = _flags(q)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its own eval() must not trip the state check
        sensitivity(q, _data(1), num_batches=1)
    assert _flags(q) == before
    assert q.training and get_state(q) == "qat"


def test_sensitivity_needs_calibration():
    q = trtquant.quantize(_fragile_float())
    with pytest.raises(QuantizerNotCalibratedError, match=r"conv1\.input_quantizer"):
        sensitivity(q, _data(1))


def test_auto_fallback_meets_the_budget_by_excluding_the_fragile_layer():
    float_model = _fragile_float()
    q = _calibrated(_fragile_float())
    metric = _cosine_metric(float_model, _data(2, seed=11))  # held-out inputs, not the calibration data
    before = _flags(q)
    report = auto_fallback(q, _data(), metric, budget=0.01)
    assert report.met
    assert report.fallback_layers == ["conv3"]
    assert report.float_metric == pytest.approx(1.0, abs=1e-6)
    assert report.quantized_metric < 0.99 <= report.final_metric
    assert [s.layer for s in report.steps] == [None, "conv3"]
    assert report.quantized_layers == {"Conv2d": 2, "Linear": 1}
    assert report.float_layers == {"Conv2d": 1}
    # the fallback layer is off, everything else exactly as before
    after = _flags(q)
    for name in ("conv3.input_quantizer", "conv3.weight_quantizer"):
        assert after[name]["disabled"]
    assert {k: v for k, v in after.items() if not k.startswith("conv3.")} == \
        {k: v for k, v in before.items() if not k.startswith("conv3.")}
    assert not q.training
    assert metric(q) == pytest.approx(report.final_metric)
    text = report.format()
    assert "conv3" in text and "exclude=['conv3']" in text and "met" in text


def test_auto_fallback_stops_at_max_layers_and_says_so():
    q = _calibrated(_fragile_float())
    metric = _cosine_metric(_fragile_float(), _data(1, seed=11))
    report = auto_fallback(q, _data(), metric, budget=0.0001, max_layers=0)
    assert not report.met and report.fallback_layers == []
    assert report.float_layers == {} and report.quantized_layers == {"Conv2d": 3, "Linear": 1}


def test_auto_fallback_nothing_to_do_when_already_within_budget():
    torch.manual_seed(0)
    float_model = Chain().eval()
    q = _calibrated(copy.deepcopy(float_model))
    report = auto_fallback(q, _data(), _cosine_metric(float_model, _data(1, seed=11)), budget=0.05)
    assert report.met and report.fallback_layers == [] and len(report.steps) == 1
