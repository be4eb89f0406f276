"""trtquant.calibrate: states restored, data forms accepted, clear errors before and after the data pass."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import trtquant
from trtquant import CalibrationError
from trtquant.config import INT8_MAX

from _models import TinyCNN, WithUnusedBranch, images


def _amax(model) -> dict:
    """amax of every enabled quantizer (MaxPool's is disabled by placement)."""
    return {n: None if q.amax is None else q.amax.clone() for n, q in trtquant.quantizers(model).items() if q.is_enabled}


def _assert_same_amax(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for n in a:
        assert (a[n] is None) == (b[n] is None), n
        assert a[n] is None or torch.equal(a[n], b[n]), n


def test_calibrate_restores_states_and_mode():
    model = trtquant.quantize(TinyCNN()).train()
    qs = trtquant.quantizers(model)
    qs["features.3.input_quantizer"].disable()
    qs["classifier.input_quantizer"].disable_quant()
    before = {n: q.get_state() for n, q in qs.items()}
    assert trtquant.calibrate(model, images(2, 2), method="percentile", progress=False) is model
    assert {n: q.get_state() for n, q in qs.items()} == before
    assert model.training and all(m.training for m in model.modules())
    assert qs["features.3.input_quantizer"].amax is None  # disabled: not calibrated
    assert qs["classifier.input_quantizer"].amax is not None
    assert all(q.amax is not None for n, q in qs.items() if q.is_enabled)


def test_calibrate_restores_states_when_data_raises():
    model = trtquant.quantize(TinyCNN()).train()
    before = {n: q.get_state() for n, q in trtquant.quantizers(model).items()}

    def data():
        yield images(1, 2)[0]
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        trtquant.calibrate(model, data(), progress=False)
    assert {n: q.get_state() for n, q in trtquant.quantizers(model).items()} == before
    assert model.training


def test_progress_off_is_silent_and_on_shows_a_bar(capfd):
    model = trtquant.quantize(TinyCNN())
    trtquant.calibrate(model, images(2, 2), method="max", progress=False)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    trtquant.calibrate(model, images(2, 2), method="max", progress=True)
    out, err = capfd.readouterr()
    assert "calibrate" in err


def test_quantizers_without_data_are_all_listed(caplog):
    model = trtquant.quantize(WithUnusedBranch())
    with pytest.raises(CalibrationError) as info:
        trtquant.calibrate(model, images(1, 2), method="max", progress=False, strict=True)
    msg = str(info.value)
    missing = ["unused.input_quantizer", "unused.weight_quantizer", "unused_fc.input_quantizer",
               "unused_fc.weight_quantizer"]
    assert msg.startswith("4 quantizer(s) saw no data")
    assert msg.split(": ", 1)[1].split(". ")[0].split(", ") == missing
    assert "strict=False" in msg
    # The default (strict=False): the rest is calibrated, those are disabled, one warning lists them.
    model = trtquant.quantize(WithUnusedBranch())
    with caplog.at_level("WARNING", logger="trtquant.calibrate"):
        trtquant.calibrate(model, images(1, 2), method="max", progress=False)
    qs = trtquant.quantizers(model)
    assert [n for n, q in qs.items() if q.amax is None] == missing
    assert [n for n, q in qs.items() if not q.is_enabled and n in missing] == missing
    assert all(a is not None for a in _amax(model).values())
    warned = [r.getMessage() for r in caplog.records if "saw no data" in r.getMessage()]
    assert len(warned) == 1 and all(n in warned[0] for n in missing)


def test_misspelt_method_fails_before_any_data():
    model = trtquant.quantize(TinyCNN())
    pulled = []

    def data():
        pulled.append(1)
        yield images(1, 2)[0]

    with pytest.raises(ValueError, match=r"unknown calibration method 'entropi'.*did you mean 'entropy'"):
        trtquant.calibrate(model, data(), method="entropi", progress=False)
    assert pulled == []
    assert all(a is None for a in _amax(model).values())


def test_nan_input_names_the_quantizer():
    model = trtquant.quantize(TinyCNN(), config=INT8_MAX)
    batch = images(1, 2)[0]
    batch[0, 0, 5, 5] = math.nan
    with pytest.raises(CalibrationError) as info:
        trtquant.calibrate(model, [batch], method="max", progress=False)
    msg = str(info.value)
    assert "NaN or inf activations reached" in msg and "features.0.input_quantizer" in msg
    assert "weight_quantizer" not in msg and "ignore_nonfinite=True" in msg


def test_ignore_nonfinite():
    clean = images(2, 2)
    dirty = [b.clone() for b in clean]
    dirty[0][0, 0, 5, 5] = math.nan
    dirty[1][1, 2, 7, 1] = math.inf
    dirty[1][0, 1, 0, 0] = -math.inf
    zeroed = [torch.where(torch.isfinite(b), b, torch.zeros(())) for b in dirty]
    for config in (INT8_MAX, None):  # max and histogram calibrators
        model = trtquant.quantize(TinyCNN(), config=config)
        trtquant.calibrate(model, dirty, method="percentile", progress=False, ignore_nonfinite=True)
        ref = trtquant.quantize(TinyCNN(), config=config)
        ref.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("_amax")})
        trtquant.calibrate(ref, zeroed, method="percentile", progress=False)
        a, b = _amax(model), _amax(ref)
        assert torch.equal(a["features.0.input_quantizer"], b["features.0.input_quantizer"])
        assert all(v is not None and bool(torch.isfinite(v).all()) for v in a.values())
        # NaN inputs propagate through the first conv: downstream amax comes from finite values only.
        assert float(a["features.3.input_quantizer"]) > 0


def test_accepts_dataloader_tuples_dicts_and_forward_loop():
    xs = images(2, 2)
    labels = [torch.tensor([0, 1]), torch.tensor([1, 0])]
    loader = DataLoader(TensorDataset(torch.cat(xs), torch.cat(labels)), batch_size=2, shuffle=False)

    def forward_loop(model):
        for x in xs:
            model(x)

    forms = {
        "tensors": xs,
        "dataloader": loader,
        "tuples": [(x, y) for x, y in zip(xs, labels)],
        "dicts": [{"x": x} for x in xs],
        "forward_loop": forward_loop,
    }
    results = {}
    for name, data in forms.items():
        torch.manual_seed(0)
        model = trtquant.quantize(TinyCNN())
        trtquant.calibrate(model, data, method="entropy", progress=False)
        results[name] = _amax(model)
        assert all(v is not None for v in results[name].values()), name
    for name in forms:
        _assert_same_amax(results[name], results["tensors"])


def test_num_batches_and_empty_data_and_no_quantizers():
    model = trtquant.quantize(TinyCNN())
    pulled = []

    def data():
        for i, x in enumerate(images(5, 1)):
            pulled.append(i)
            yield x

    trtquant.calibrate(model, data(), num_batches=2, method="max", progress=False)
    assert pulled == [0, 1]
    with pytest.raises(CalibrationError, match="yielded no batches"):
        trtquant.calibrate(trtquant.quantize(TinyCNN()), [], progress=False)
    with pytest.raises(CalibrationError, match=r"call trtquant\.quantize\(model\) first"):
        trtquant.calibrate(TinyCNN(), images(1, 1), progress=False)
    with pytest.raises(ValueError, match="num_batches"):
        trtquant.calibrate(model, images(1, 1), num_batches=0, progress=False)
