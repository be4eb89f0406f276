"""State dicts: float checkpoints load strictly into quantized models, calibrated ones round-trip,
invalid amax is refused, and trtquant.checkpoint.load_state_dict explains real mismatches."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

import trtquant
from trtquant.checkpoint import load_state_dict
from trtquant.quantizer import TensorQuantizer

from _models import SmallNet, images, randomize_bn


def _calibrate(model: nn.Module, n_batches: int = 1) -> nn.Module:
    return trtquant.calibrate(model, images(n_batches, 2), method="percentile", progress=False)


def _assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------------------
# float checkpoints -> quantized models
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["resnet50", "inception_v3"])
def test_float_state_dict_loads_strict_into_quantized(arch):
    kwargs = {"aux_logits": False, "init_weights": False} if arch == "inception_v3" else {}
    ctor = getattr(torchvision.models, arch)
    float_sd = randomize_bn(ctor(**kwargs), seed=1).state_dict()
    qmodel = trtquant.quantize(ctor(**kwargs))
    n_quant = sum(isinstance(m, TensorQuantizer) for m in qmodel.modules())
    assert n_quant > 50
    # Uncalibrated quantizers add no keys: identical key lists (order included).
    assert list(qmodel.state_dict()) == list(float_sd)
    result = qmodel.load_state_dict(float_sd, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    _assert_same_state(qmodel.state_dict(), float_sd)
    # The same through trtquant's loader.
    assert load_state_dict(trtquant.quantize(ctor(**kwargs)), float_sd) == _IncompatibleKeys([], [])


def test_quantize_is_in_place_and_shares_parameter_objects():
    model = torchvision.models.resnet50()
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    qmodel = trtquant.quantize(model)
    assert qmodel is model
    assert isinstance(model.conv1, trtquant.nn.QuantConv2d) and isinstance(model.fc, trtquant.nn.QuantLinear)
    qparams = dict(qmodel.named_parameters())
    assert list(qparams) == list(params)
    assert all(qparams[n] is p for n, p in params.items())
    assert all(qmodel.get_buffer(n) is b for n, b in buffers.items())
    assert model.conv1.weight is params["conv1.weight"]
    # An optimizer built on the float model trains the quantized one.
    opt = torch.optim.SGD(params.values(), lr=0.1)
    assert opt.param_groups[0]["params"][0] is qmodel.conv1.weight


ARCHS = {
    # name: (constructor kwargs, image size, quantized layers (conv + fc), a conv, its out channels)
    "resnet50": ({}, 64, 54, "layer4.2.conv3", 2048),
    "inception_v3": ({"aux_logits": False, "init_weights": False}, 80, 95, "Mixed_7c.branch_pool.conv", 192),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_calibrated_state_dict_adds_only_amax_and_round_trips(arch):
    kwargs, size, n_layers, conv, channels = ARCHS[arch]
    ctor = getattr(torchvision.models, arch)
    model = randomize_bn(ctor(**kwargs)).eval()
    float_keys = list(model.state_dict())
    data = images(1, 2, shape=(3, size, size))
    trtquant.calibrate(trtquant.quantize(model), data, method="percentile", progress=False)
    x = images(1, 2, seed=5, shape=(3, size, size))[0]
    with torch.no_grad():
        out = model(x)
    sd = model.state_dict()
    extra = [k for k in sd if k not in float_keys]
    assert set(float_keys) <= set(sd)
    assert len(extra) >= 2 * n_layers  # every conv and fc: input and weight amax
    assert all(k.endswith("_quantizer._amax") for k in extra), [k for k in extra if not k.endswith("_quantizer._amax")]
    assert sd[f"{conv}.weight_quantizer._amax"].numel() == channels and f"{conv}.input_quantizer._amax" in sd

    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = trtquant.quantize(ctor(**kwargs)).eval()
    with pytest.raises(trtquant.QuantizerNotCalibratedError):
        with torch.no_grad():
            fresh(x)
    assert fresh.load_state_dict(loaded, strict=True) == _IncompatibleKeys([], [])
    _assert_same_state(fresh.state_dict(), sd)
    with torch.no_grad():
        assert torch.equal(fresh(x), out)

    # pytorch-quantization's names (conv1._input_quantizer._amax) load too.
    legacy = {k.replace(".input_quantizer.", "._input_quantizer.").replace(".weight_quantizer.", "._weight_quantizer."): v
              for k, v in sd.items()}
    assert f"{conv}._input_quantizer._amax" in legacy and f"{conv}._weight_quantizer._amax" in legacy
    fresh2 = trtquant.quantize(ctor(**kwargs)).eval()
    assert fresh2.load_state_dict(legacy, strict=True) == _IncompatibleKeys([], [])
    with torch.no_grad():
        assert torch.equal(fresh2(x), out)


def test_float_checkpoint_keeps_calibrated_amax():
    model = _calibrate(trtquant.quantize(randomize_bn(SmallNet()).eval()))
    amax = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("_amax")}
    new_float = SmallNet().state_dict()
    assert model.load_state_dict(new_float, strict=True) == _IncompatibleKeys([], [])
    assert torch.equal(model.conv1.weight, new_float["conv1.weight"])
    for k, v in amax.items():
        assert torch.equal(model.state_dict()[k], v)


def test_per_channel_amax_shape_c111_or_c_both_load():
    src = _calibrate(trtquant.quantize(SmallNet().eval()))
    sd = src.state_dict()
    assert sd["conv1.weight_quantizer._amax"].shape == (8, 1, 1, 1)
    sd_flat = dict(sd, **{"conv1.weight_quantizer._amax": sd["conv1.weight_quantizer._amax"].flatten()})
    dst = trtquant.quantize(SmallNet().eval())
    load_state_dict(dst, sd_flat)
    x = images(1, 2)[0]
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


# --------------------------------------------------------------------------------------------------
# invalid amax in a checkpoint
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 0.0, -1.0])
def test_invalid_amax_in_state_dict_is_rejected(bad):
    model = _calibrate(trtquant.quantize(SmallNet().eval()))
    sd = model.state_dict()
    key = "conv2.input_quantizer._amax"
    good = sd[key].clone()
    sd[key] = torch.tensor(bad)
    fresh = trtquant.quantize(SmallNet().eval())
    with pytest.raises(RuntimeError, match=r"conv2\.input_quantizer\._amax") as info:
        fresh.load_state_dict(sd, strict=True)
    assert "amax" in str(info.value)
    with pytest.raises(trtquant.CheckpointError, match=r"1 invalid key\(s\)\n  error: conv2\.input_quantizer\._amax"):
        load_state_dict(trtquant.quantize(SmallNet().eval()), sd)
    # A calibrated model keeps its valid amax when handed an invalid one.
    with pytest.raises(RuntimeError):
        model.load_state_dict(sd)
    assert torch.equal(model.conv2.input_quantizer.amax, good)


@pytest.mark.parametrize("bad", ["nan_channel", "negative_channel", "all_zero"])
def test_invalid_per_channel_amax_in_state_dict_is_rejected(bad):
    sd = _calibrate(trtquant.quantize(SmallNet().eval())).state_dict()
    key = "conv1.weight_quantizer._amax"
    amax = sd[key].clone()
    if bad == "nan_channel":
        amax[3] = math.nan
    elif bad == "negative_channel":
        amax[3] = -0.5
    else:
        amax.zero_()
    sd[key] = amax
    with pytest.raises(RuntimeError, match=r"conv1\.weight_quantizer\._amax"):
        trtquant.quantize(SmallNet().eval()).load_state_dict(sd)


def test_amax_shape_mismatch_is_a_checkpoint_error():
    sd = _calibrate(trtquant.quantize(SmallNet().eval())).state_dict()
    sd["conv2.weight_quantizer._amax"] = torch.ones(5, 1, 1, 1)  # conv2 has 8 output channels
    calibrated = _calibrate(trtquant.quantize(SmallNet().eval()))
    before = calibrated.conv1.weight.clone()
    with pytest.raises(trtquant.CheckpointError) as info:
        load_state_dict(calibrated, sd)
    msg = str(info.value)
    assert "conv2.weight_quantizer (TensorQuantizer)" in msg and "_amax" in msg
    assert "(5, 1, 1, 1)" in msg and "(8, 1, 1, 1)" in msg
    assert torch.equal(calibrated.conv1.weight, before)  # nothing loaded
    # torch's own path reports it as well (the quantizer's check).
    with pytest.raises(RuntimeError, match=r"conv2\.weight_quantizer\._amax.*does not match"):
        calibrated.load_state_dict(sd)


# --------------------------------------------------------------------------------------------------
# trtquant.checkpoint.load_state_dict: mismatch reports and hints
# --------------------------------------------------------------------------------------------------
def test_shape_mismatch_grouped_by_module_and_nothing_loaded():
    model = trtquant.quantize(SmallNet(num_classes=5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(trtquant.CheckpointError) as info:
        load_state_dict(model, SmallNet(num_classes=10).state_dict())
    msg = str(info.value)
    assert "checkpoint does not match SmallNet: 2 shape-mismatched key(s)" in msg
    assert "fc (QuantLinear): shape weight: checkpoint (10, 8) vs model (5, 8), shape bias: checkpoint (10,) vs model (5,)" in msg
    _assert_same_state(model.state_dict(), before)


def test_missing_and_unexpected_keys_grouped_by_module():
    model = trtquant.quantize(SmallNet())
    sd = SmallNet().state_dict()
    del sd["conv2.weight"], sd["bn2.running_mean"]
    sd["head.weight"] = torch.zeros(3)
    sd["bn1.extra"] = torch.zeros(1)
    with pytest.raises(trtquant.CheckpointError) as info:
        load_state_dict(model, sd)
    msg = str(info.value)
    assert "checkpoint does not match SmallNet: 2 missing, 2 unexpected key(s)" in msg
    assert "conv2 (QuantConv2d): missing weight" in msg
    assert "bn2 (BatchNorm2d): missing running_mean" in msg
    assert "head (not in model): unexpected weight" in msg
    assert "bn1 (BatchNorm2d): unexpected extra" in msg
    assert "hint" not in msg
    # strict=False: torch's result, no error.
    result = load_state_dict(trtquant.quantize(SmallNet()), sd, strict=False)
    assert isinstance(result, _IncompatibleKeys)
    assert sorted(result.missing_keys) == ["bn2.running_mean", "conv2.weight"]
    assert sorted(result.unexpected_keys) == ["bn1.extra", "head.weight"]


def test_dataparallel_prefix_hint_and_strip_prefix():
    src = randomize_bn(SmallNet()).eval()
    sd = nn.DataParallel(src).state_dict()
    assert all(k.startswith("module.") for k in sd)
    model = trtquant.quantize(SmallNet().eval())
    with pytest.raises(trtquant.CheckpointError, match=r"pass strip_prefix='module\.'") as info:
        load_state_dict(model, sd)
    assert "DataParallel" in str(info.value) and "module.conv1 (not in model): unexpected weight" in str(info.value)
    assert load_state_dict(model, sd, strip_prefix="module.") == _IncompatibleKeys([], [])
    _assert_same_state(model.state_dict(), src.state_dict())


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_torch_ao_packed_params_hint():
    ao_linear = torch.ao.nn.quantized.Linear(8, 10)
    sd = {k: v for k, v in SmallNet().state_dict().items() if not k.startswith("fc.")}
    sd.update({f"fc.{k}": v for k, v in ao_linear.state_dict().items()})
    assert any("_packed_params" in k for k in sd)
    with pytest.raises(trtquant.CheckpointError, match="_packed_params") as info:
        load_state_dict(trtquant.quantize(SmallNet()), sd)
    msg = str(info.value)
    assert "torch.ao" in msg and "load the float checkpoint instead" in msg
    assert "fc (QuantLinear): missing weight, missing bias" in msg


def test_quantizer_keys_into_float_model_hint():
    sd = _calibrate(trtquant.quantize(SmallNet().eval())).state_dict()
    legacy = {k.replace(".input_quantizer.", "._input_quantizer."): v for k, v in sd.items()}
    with pytest.raises(trtquant.CheckpointError, match=r"call trtquant\.quantize\(model\) before loading") as info:
        load_state_dict(SmallNet(), legacy)
    assert "conv1 (Conv2d): unexpected _input_quantizer._amax" in str(info.value)
    # Into a quantized model the legacy names load.
    assert load_state_dict(trtquant.quantize(SmallNet().eval()), legacy) == _IncompatibleKeys([], [])
    # A model quantized with another include: the extra quantizer keys are named.
    with pytest.raises(trtquant.CheckpointError, match="same include/exclude/config") as info:
        load_state_dict(trtquant.quantize(SmallNet().eval(), include=["conv1"]), sd)
    assert "conv2 (Conv2d): unexpected input_quantizer._amax, unexpected weight_quantizer._amax" in str(info.value)


def test_per_channel_amax_layout_kept_when_calibrated():
    src = _calibrate(trtquant.quantize(SmallNet().eval()))
    sd = src.state_dict()
    sd["conv1.weight_quantizer._amax"] = sd["conv1.weight_quantizer._amax"].flatten()
    dst = _calibrate(trtquant.quantize(SmallNet().eval()), n_batches=2)
    dst.load_state_dict(sd)
    assert dst.conv1.weight_quantizer.amax.shape == (8, 1, 1, 1)
    assert torch.equal(dst.conv1.weight_quantizer.amax.flatten(), sd["conv1.weight_quantizer._amax"])
