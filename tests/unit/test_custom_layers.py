"""Layers users write: Conv/Linear subclasses with their own forward, functional calls on parameters.

The acceptance model is EfficientNet-shaped: TF-"same" padding convs (pad, then F.conv2d, as timm's
Conv2dSame), blocks ``forward(self, x, drop_connect_rate=None)`` with ``if drop_connect_rate:`` and a
ResNet block with ``out += identity``.
"""

from __future__ import annotations

import copy
import inspect
import io
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trtquant
from trtquant.nn.base import QuantMixin
from trtquant.nn.custom import CallQuantMixin
from trtquant.placement import rules
from trtquant.placement.fx_pass import placement_report

ort = pytest.importorskip("onnxruntime")


# ---- user layers --------------------------------------------------------------------------------

class Conv2dSame(nn.Conv2d):
    """TF 'same' padding computed from the input size in forward, then F.conv2d."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """Weight standardization in forward: the conv sees a weight computed from the parameter."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x * 0.5, self.weight, self.bias)


class SuperPadConv(nn.Conv2d):
    """Pads, then nn.Conv2d's own forward (through super())."""

    def forward(self, x):
        return super().forward(F.pad(x, (1, 1, 1, 1)))


class GatedConv(nn.Conv2d):
    """Contains a weighted layer: its call would run inside the twin's forward, so it stays float."""

    def __init__(self):
        super().__init__(3, 4, 3)
        self.gate = nn.Linear(4, 4)

    def forward(self, x):
        y = super().forward(x)
        return y * torch.sigmoid(self.gate(y.mean(dim=(2, 3))))[..., None, None]


class MatmulLinear(nn.Linear):
    """No F.linear call: nothing for the twin to quantize."""

    def forward(self, x):
        return x @ self.weight.t() + self.bias


class TwiceConv(nn.Conv2d):
    """Two calls with the layer's weight (shared scales) and one with a weight of another shape."""

    def forward(self, x):
        y = F.conv2d(x, self.weight, None, padding=1) + F.conv2d(x.flip(-1), self.weight, None, padding=1)
        return y + F.conv2d(x, self.weight[:, :1].sum(0, keepdim=True).expand(1, x.shape[1], 3, 3), padding=1)


def drop_connect(x, p, training):
    if not training:
        return x
    return x / (1 - p) * (torch.rand(x.shape[0], 1, 1, 1) < 1 - p)


class MBBlock(nn.Module):
    def __init__(self, c: int, expand: int = 2):
        super().__init__()
        e = c * expand
        self.expand_conv, self.bn0 = Conv2dSame(c, e, 1, bias=False), nn.BatchNorm2d(e)
        self.dw_conv, self.bn1 = Conv2dSame(e, e, 3, groups=e, bias=False), nn.BatchNorm2d(e)
        self.project_conv, self.bn2 = Conv2dSame(e, c, 1, bias=False), nn.BatchNorm2d(c)
        self.act = nn.SiLU()

    def forward(self, inputs, drop_connect_rate=None):
        x = self.act(self.bn0(self.expand_conv(inputs)))
        x = self.act(self.bn1(self.dw_conv(x)))
        x = self.bn2(self.project_conv(x))
        if drop_connect_rate:
            x = drop_connect(x, p=drop_connect_rate, training=self.training)
        x = x + inputs
        return x


class BasicBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = Conv2dSame(c, c, 3, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = Conv2dSame(c, c, 3, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        identity = x
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return F.relu(out)


class EffNetSame(nn.Module):
    def __init__(self, c: int = 16, n_blocks: int = 2, drop_connect_rate: float = 0.2):
        super().__init__()
        self.stem, self.bn = Conv2dSame(3, c, 3, stride=2, bias=False), nn.BatchNorm2d(c)
        self.blocks = nn.ModuleList([MBBlock(c) for _ in range(n_blocks)])
        self.basic = BasicBlock(c)
        self.drop_connect_rate = drop_connect_rate
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        x = F.silu(self.bn(self.stem(x)))
        for i, block in enumerate(self.blocks):  # rates 0.0 (falsy) and 0.1
            x = block(x, drop_connect_rate=self.drop_connect_rate * i / len(self.blocks))
        x = self.basic(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def _images(n: int = 2, size: int = 32):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, size, size, generator=g) for _ in range(n)]


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
    return model


# ---- acceptance -------------------------------------------------------------------------------

def test_effnet_same_padding_is_fully_quantized_placed_exported_and_checked(tmp_path):
    torch.manual_seed(0)
    model = trtquant.quantize(_randomize_bn(EffNetSame()).eval())
    weighted = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantMixin)]
    assert len(weighted) == 10 and quantized == weighted
    assert all(isinstance(model.get_submodule(n), CallQuantMixin) for n in weighted if n != "fc")

    report = placement_report(model)
    assert report["traced"] is True and report["skipped"] == {}
    assert [e["quantizer"] for e in report["quantizers"] if e["rule"] == rules.RULE_RESIDUAL] == [
        "blocks.0.residual_quantizer", "blocks.1.residual_quantizer", "basic.residual_quantizer"]
    by_name = {e["quantizer"]: e["rule"] for e in report["quantizers"]}
    assert by_name["stem.input_quantizer"] == rules.RULE_CALL_INPUT
    assert by_name["blocks.1.dw_conv.weight_quantizer"] == rules.RULE_CALL_WEIGHT
    # The rewritten block keeps its parameter names (callers pass drop_connect_rate by keyword).
    assert list(inspect.signature(model.blocks[1].forward).parameters) == ["inputs", "drop_connect_rate"]
    x = _images(1)[0]

    data = _images(2)
    trtquant.calibrate(model, data, method="max", progress=False)
    assert all(q.amax is not None for n, q in trtquant.quantizers(model).items() if q.is_enabled), "uncalibrated"
    with torch.no_grad():
        want = model(x).numpy()
    from trtquant.export import check_onnx, export_onnx

    for exporter in ("dynamo", "legacy"):
        result = export_onnx(model, x, tmp_path / f"eff_{exporter}.onnx", exporter=exporter)
        check = check_onnx(result.path)
        errors = [f for f in check.findings if f.severity == "error"]
        c20 = [f for f in check.findings if f.rule == "C20-residual-add"]
        assert not errors and not c20, [f.message for f in errors + c20]
        assert check.stats["weighted_ops"] == 10 and check.stats["weighted_ops_quantized"] == 10, check.stats
        sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"input": x.numpy()})[0]
        # Same Q/DQ scales on both sides; only float summation order differs (a rare rounding-boundary
        # flip of one code moves a logit by about one step of the next scale).
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * float(np.abs(want).max()))


# ---- twin numerics ----------------------------------------------------------------------------

def _calibrated_twin(layer: nn.Module, x: torch.Tensor) -> nn.Module:
    model = trtquant.quantize(nn.Sequential(layer), placement=None)
    trtquant.calibrate(model, [x], method="max", progress=False)
    return model[0]


@pytest.mark.parametrize("make", [lambda: Conv2dSame(4, 6, 3, stride=2), lambda: SuperPadConv(4, 6, 3),
                                  lambda: StdConv2d(4, 6, 3, padding=1), lambda: ScaledLinear(5, 3)],
                         ids=["same-padding", "super-forward", "weight-std", "linear"])
def test_twin_equals_user_forward_on_fake_quantized_input_and_weight(make):
    torch.manual_seed(0)
    fp = make().eval()
    x = torch.randn(2, 4, 9, 9) if isinstance(fp, nn.Conv2d) else torch.randn(2, 7, 5)
    twin = _calibrated_twin(copy.deepcopy(fp), x)
    assert type(twin).__name__ == f"Quant{type(fp).__name__}" and isinstance(twin, type(fp))
    assert twin.weight is not fp.weight and torch.equal(twin.weight, fp.weight)
    iq, wq = twin.input_quantizer, twin.weight_quantizer
    assert wq.axis == (0,) and wq.amax.numel() == fp.weight.shape[0]
    with torch.no_grad():
        got = twin(x)
        if isinstance(fp, Conv2dSame):  # Q(pad(x)) == pad(Q(x)): quantization maps 0 to 0
            ref = copy.deepcopy(fp)
            ref.weight.copy_(wq(fp.weight))
            want = Conv2dSame.forward(ref, iq(x))
        elif isinstance(fp, SuperPadConv):
            want = F.conv2d(F.pad(iq(x), (1, 1, 1, 1)), wq(fp.weight), fp.bias)
        elif isinstance(fp, StdConv2d):  # the weight is quantized after standardization
            w = fp.weight
            w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
            want = F.conv2d(iq(x), wq(w), fp.bias, padding=1)
            assert twin.weight_transformed is True
        else:
            want = F.linear(iq(x * 0.5), wq(fp.weight), fp.bias)
        assert not torch.equal(got, fp(x))  # it does quantize
    assert torch.equal(got, want)
    amax_w = fp.weight.detach().abs().amax(dim=tuple(range(1, fp.weight.dim())))
    if not isinstance(fp, StdConv2d):
        assert torch.equal(wq.amax.reshape(-1), amax_w)


def test_twin_call_policy_shared_scales_float_other_shapes_and_no_call(caplog):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    fp = TwiceConv(3, 3, 3).eval()
    with caplog.at_level(logging.WARNING, logger="trtquant.nn.custom"):
        twin = _calibrated_twin(copy.deepcopy(fp), x)
        with torch.no_grad():
            got = twin(x)
    warned = [r.getMessage() for r in caplog.records if "QuantTwiceConv" in r.getMessage()]
    assert len(warned) == 1 and "(1, 3, 3, 3)" in warned[0] and "float" in warned[0]
    iq, wq = twin.input_quantizer, twin.weight_quantizer
    ref = trtquant.quantize(nn.Sequential(nn.Conv2d(3, 3, 3)), placement=None)
    trtquant.calibrate(ref, [x], method="max", progress=False)
    assert torch.equal(iq.amax, ref[0].input_quantizer.amax)  # one input scale: max over both calls' inputs
    with torch.no_grad():
        w = fp.weight
        odd = w[:, :1].sum(0, keepdim=True).expand(1, 3, 3, 3)
        want = F.conv2d(iq(x), wq(w), None, padding=1) + F.conv2d(iq(x.flip(-1)), wq(w), None, padding=1) \
            + F.conv2d(x, odd, padding=1)
    assert torch.equal(got, want)

    caplog.clear()
    fp = MatmulLinear(4, 2).eval()
    with caplog.at_level(logging.WARNING):
        model = trtquant.quantize(nn.Sequential(fp), placement=None)
        trtquant.calibrate(model, [torch.randn(3, 4)], method="max", progress=False)
    msgs = " | ".join(r.getMessage() for r in caplog.records)
    assert "QuantMatmulLinear" in msgs and "no conv/linear call" in msgs
    assert not model[0].input_quantizer.is_enabled  # saw no data: disabled by calibrate, layer runs float
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(model(x), fp(x))


def test_subclass_containing_weighted_layers_stays_float(caplog):
    model = nn.Sequential(GatedConv(), nn.ReLU())
    with caplog.at_level(logging.WARNING, logger="trtquant"):
        trtquant.quantize(model)
    assert type(model[0]) is GatedConv and isinstance(model[0].gate, QuantMixin)
    assert "0 (GatedConv)" in caplog.text and "contains weighted layers (gate)" in caplog.text
    with pytest.raises(ValueError, match=r"0 \(GatedConv\)"):
        trtquant.quantize(nn.Sequential(GatedConv()), include=["0"])


def test_twin_survives_deepcopy_pickle_and_state_dict():
    torch.manual_seed(0)
    fp = nn.Sequential(Conv2dSame(3, 4, 3, stride=2), nn.ReLU()).eval()
    model = trtquant.quantize(copy.deepcopy(fp), placement=None)
    assert list(model.state_dict()) == list(fp.state_dict())
    x = torch.randn(2, 3, 11, 11)
    trtquant.calibrate(model, [x], method="max", progress=False)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        assert type(other[0]) is type(model[0]) and isinstance(other[0], Conv2dSame)
        with torch.no_grad():
            assert torch.equal(other(x), model(x))


# ---- functional calls on another module's weight ------------------------------------------------

class SharedWeightNet(nn.Module):
    """A conv reused functionally at a second scale, and a head tied to an embedding table."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.embed = nn.Embedding(5, 8)

    def forward(self, x):
        a = F.relu(self.conv(x))
        b = F.relu(F.conv2d(F.avg_pool2d(x, 2), self.conv.weight, self.conv.bias, padding=1))
        h = a.mean(dim=(2, 3)) + b.mean(dim=(2, 3))
        return F.linear(h, self.embed.weight)


def test_functional_calls_on_parameters_get_input_and_weight_quantizers(tmp_path):
    torch.manual_seed(0)
    fp = SharedWeightNet().eval()
    model = trtquant.quantize(copy.deepcopy(fp))
    by_rule = {}
    for e in placement_report(model)["quantizers"]:
        by_rule.setdefault(e["rule"], []).append(e["quantizer"])
    assert by_rule[rules.RULE_FUNCTIONAL_INPUT] == ["conv2d_input_quantizer", "linear_input_quantizer"]
    assert by_rule[rules.RULE_FUNCTIONAL_WEIGHT] == ["conv2d_weight_quantizer", "linear_weight_quantizer"]
    x = torch.randn(2, 3, 16, 16)
    trtquant.calibrate(model, [x], method="max", progress=False)
    assert model.linear_weight_quantizer.amax.numel() == 5  # per output row of the tied table
    with torch.no_grad():
        got = model(x)
        q = model
        a = F.relu(F.conv2d(q.conv.input_quantizer(x), q.conv.weight_quantizer(fp.conv.weight), fp.conv.bias,
                            padding=1))
        pooled = F.avg_pool2d(q.pool_quantizer(x), 2)  # the functional-pool rule's quantizer
        b = F.relu(F.conv2d(q.conv2d_input_quantizer(pooled), q.conv2d_weight_quantizer(fp.conv.weight),
                            fp.conv.bias, padding=1))
        want = F.linear(q.linear_input_quantizer(a.mean(dim=(2, 3)) + b.mean(dim=(2, 3))),
                        q.linear_weight_quantizer(fp.embed.weight))
    assert torch.equal(got, want)
    from trtquant.export import check_onnx, export_onnx

    result = export_onnx(model, x, tmp_path / "shared.onnx", exporter="legacy")
    check = check_onnx(result.path)
    assert not [f for f in check.findings if f.severity == "error"]
    assert check.stats["weighted_ops"] == 3 and check.stats["weighted_ops_quantized"] == 3, check.stats


def test_functional_calls_follow_include_and_exclude():
    torch.manual_seed(0)
    model = trtquant.quantize(SharedWeightNet().eval(), include=["conv"])
    assert not any(e["rule"] in (rules.RULE_FUNCTIONAL_INPUT, rules.RULE_FUNCTIONAL_WEIGHT)
                   for e in placement_report(model)["quantizers"])
    assert isinstance(model.conv, QuantMixin)


def test_overrides_reach_functional_call_quantizers():
    """A per-module override (here: per-tensor weights for block "0") applies to the quantizers placement adds at
    F.conv2d/F.linear calls in that block's forward, as to its layers."""
    from trtquant.config import QuantConfig
    from trtquant.descriptor import QuantDescriptor

    per_tensor = QuantDescriptor(num_bits=8, axis=None)
    model = trtquant.quantize(nn.Sequential(SharedWeightNet(), SharedWeightNet()).eval(),
                              QuantConfig(overrides={"0": {"weight": per_tensor}}))
    assert model[0].conv2d_weight_quantizer.axis is None and model[0].linear_weight_quantizer.axis is None
    assert model[1].conv2d_weight_quantizer.axis == 0
