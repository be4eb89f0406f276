"""trtquant.ptq: invariance and closed-form checks of CLE, SmoothQuant, bias correction and AdaRound."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import trtquant
from trtquant.config import QuantConfig
from trtquant.descriptor import QuantDescriptor
from trtquant.functional import amax_to_scale
from trtquant.ptq import adaround, bias_correction, equalize, smooth_quant
from trtquant.ptq.bias_correction import float_mode
from trtquant.ptq.equalize import ChannelCeiling

PER_TENSOR = QuantConfig(input=QuantDescriptor(num_bits=8, calib_method="max"), weight=QuantDescriptor(num_bits=8))
PER_CHANNEL_4BIT = QuantConfig(input=QuantDescriptor(num_bits=8, calib_method="max"),
                               weight=QuantDescriptor(num_bits=4, axis=(0,)))


def _bn(c: int, g: torch.Generator) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    bn.running_mean.copy_(torch.rand(c, generator=g) * 2 - 1)
    bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    bn.weight.data.copy_(torch.rand(c, generator=g) * 3 + 0.1)
    bn.bias.data.copy_(torch.rand(c, generator=g) * 4 - 1)
    return bn


def depthwise_net(act: type = nn.ReLU, seed: int = 0) -> nn.Sequential:
    """conv -> BN -> act -> depthwise conv -> BN -> ReLU -> 1x1 conv: MobileNet's inverted-residual core."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _bn(8, g), act(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                         _bn(8, g), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def _r_out(w: torch.Tensor) -> torch.Tensor:
    return w.abs().reshape(w.shape[0], -1).amax(1)


def _r_in(conv: nn.Conv2d) -> torch.Tensor:
    w = conv.weight.abs()
    if conv.groups == w.shape[0] and w.shape[1] == 1:  # depthwise: input channel i is filter i
        return w.reshape(w.shape[0], -1).amax(1)
    return w.transpose(0, 1).reshape(w.shape[1], -1).amax(1)


def test_cle_keeps_fp32_function_and_equalizes_depthwise_chain():
    m = depthwise_net()
    x = torch.randn(4, 3, 12, 12)
    ref = m(x).detach()
    chains = equalize(m, batchnorm="fold", absorb_bias=False)
    assert [(c.first, c.second) for c in chains] == [("0", "3"), ("3", "6")]
    assert isinstance(m[1], nn.Identity) and isinstance(m[4], nn.Identity)  # BN folded first
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-5)
    # converged: each shared channel has one range in both layers of both chains
    torch.testing.assert_close(_r_out(m[0].weight), _r_in(m[3]), rtol=1e-4, atol=0)
    torch.testing.assert_close(_r_out(m[3].weight), _r_in(m[6]), rtol=1e-4, atol=0)


def test_cle_single_pair_closed_form():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 5, 3)).eval()
    r1, r2 = _r_out(m[0].weight).detach().clone(), _r_in(m[2]).detach().clone()
    x = torch.randn(2, 3, 10, 10)
    ref = m(x).detach()
    equalize(m, iterations=1)
    expect = torch.sqrt(r1 * r2)
    torch.testing.assert_close(_r_out(m[0].weight), expect, rtol=1e-5, atol=0)
    torch.testing.assert_close(_r_in(m[2]), expect, rtol=1e-5, atol=0)
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-5)


def test_cle_relu6_skipped_exactly_or_replaced_by_relu():
    m = depthwise_net(act=nn.ReLU6)
    x = torch.randn(4, 3, 12, 12) * 3
    ref = m(x).detach()
    chains = equalize(m, batchnorm="fold", absorb_bias=False)  # relu6="skip": relu6(x/s) != relu6(x)/s, so 0->3 is left alone
    assert [(c.first, c.second) for c in chains] == [("3", "6")]
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-5)

    m = depthwise_net(act=nn.ReLU6)
    as_relu = copy.deepcopy(m)
    as_relu[2] = nn.ReLU()
    assert (as_relu(x) - ref).abs().max() > 1e-2  # activations above 6 exist: replacing changes the function
    chains = equalize(m, batchnorm="fold", absorb_bias=False, relu6="relu")
    assert isinstance(m[2], nn.ReLU) and len(chains) == 2
    torch.testing.assert_close(m(x), as_relu(x), rtol=0, atol=1e-5)


def test_cle_relu6_clip_exact_with_per_channel_ceiling():
    m = depthwise_net(act=nn.ReLU6)
    x = torch.randn(4, 3, 12, 12) * 3
    ref = m(x).detach()
    assert float(m[:2](x).detach().max()) > 6  # the ReLU6 clips: a plain rescale would change the function
    chains = equalize(m, batchnorm="fold", absorb_bias=False, relu6="clip")
    assert [(c.first, c.second, c.activation) for c in chains] == [("0", "3", "relu6"), ("3", "6", "relu")]
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-5)
    ceiling = m[1]
    assert isinstance(ceiling, ChannelCeiling) and isinstance(m[2], nn.ReLU6)
    assert float(ceiling.bound.max()) <= 6.0 and float(ceiling.bound.min()) >= 6.0 / 16 - 1e-6  # s in [1, max_scale]
    assert float(ceiling.bound.min()) < 6.0  # something was rescaled
    # the pair is equalized up to one common factor (the factor that makes every s >= 1)
    ratio = _r_out(m[0].weight) / _r_in(m[3])
    assert float(ratio.max() / ratio.min()) < 1.01


def _weight_only(conv_weight: "QuantDescriptor | None") -> QuantConfig:
    """Weights only (input quantizers off); the last 1x1 conv (no BatchNorm) per channel in every variant."""
    return QuantConfig(weight=conv_weight, overrides={"*": {"input": None},
                                                      "6": {"input": None, "weight": QuantDescriptor(num_bits=8, axis=(0,))}})


def test_cle_keep_batchnorm_gives_per_tensor_weights_the_per_channel_result():
    m = depthwise_net(act=nn.ReLU6)
    x = torch.randn(4, 3, 12, 12) * 3
    calib = [x]
    ref = m(x).detach()
    per_channel = trtquant.quantize(copy.deepcopy(m), _weight_only(None), placement=None)
    trtquant.calibrate(per_channel, calib, method="max", progress=False)
    plain = trtquant.quantize(copy.deepcopy(m), _weight_only(QuantDescriptor(num_bits=8)), placement=None)
    trtquant.calibrate(plain, calib, method="max", progress=False)

    chains = equalize(m, batchnorm="keep")
    assert [(c.first, c.second, c.activation) for c in chains] == [("0", "1", None), ("3", "4", None)]
    assert isinstance(m[1], nn.BatchNorm2d) and isinstance(m[4], nn.BatchNorm2d)  # kept, not folded
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-5)
    for i in (0, 3):  # every weight row now spans its layer's full range
        r = _r_out(m[i].weight)
        torch.testing.assert_close(r, r.max().expand_as(r), rtol=1e-6, atol=0)
    per_tensor = trtquant.quantize(m, _weight_only(QuantDescriptor(num_bits=8)), placement=None)
    trtquant.calibrate(per_tensor, calib, method="max", progress=False)
    with torch.no_grad():
        err_plain = float((plain(x) - per_channel(x)).abs().max())
        # the same INT8 codes as per-channel weights; the BatchNorm multiplies the scale back per channel
        torch.testing.assert_close(per_tensor(x), per_channel(x), rtol=0, atol=1e-5)
    assert err_plain > 1e-3, err_plain  # plain per-tensor weights do differ: the check above can fail


class SameConv2d(nn.Conv2d):
    """TF-style "same" padding: a Conv2d subclass with its own forward (pad, then F.conv2d with its weight)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(nn.functional.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride, 0,
                                    self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """Weight standardization: rescaling a filter changes nothing, so CLE must not touch it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def test_cle_sees_conv_subclasses_with_own_forward_and_refuses_nonlinear_ones():
    torch.manual_seed(4)
    g = torch.Generator().manual_seed(4)
    m = nn.Sequential(SameConv2d(3, 8, 2), _bn(8, g), nn.ReLU(), SameConv2d(8, 8, 2, groups=8), _bn(8, g),
                      nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 10, 10)
    ref = m(x).detach()
    chains = equalize(m, batchnorm="fold", absorb_bias=False)
    assert [(c.first, c.second) for c in chains] == [("0", "3"), ("3", "6")]  # leaves, not their F.conv2d calls
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-5)

    m = nn.Sequential(StdConv2d(3, 8, 3), _bn(8, g), nn.ReLU(), nn.Conv2d(8, 4, 1), _bn(4, g)).eval()
    ref = m(x).detach()
    keep = copy.deepcopy(m)
    assert equalize(m, batchnorm="fold") == []
    assert isinstance(m[1], nn.BatchNorm2d) and isinstance(m[4], nn.BatchNorm2d)  # no chain: BatchNorms put back
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-6)
    # batchnorm="keep" rescales the plain conv into its BatchNorm and leaves the standardized one alone
    assert [(c.first, c.second) for c in equalize(keep)] == [("3", "4")]
    torch.testing.assert_close(keep(x), ref, rtol=0, atol=1e-5)


def test_cle_leaves_dead_channels_and_bounds_the_scale():
    torch.manual_seed(5)
    m = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 2, 1)).eval()
    with torch.no_grad():
        m[0].weight[0].mul_(1e-7)  # dead: its output is its bias
        m[0].weight[1].mul_(1e4)  # would need s = 100 to equalize
    w0 = m[0].weight.detach().clone()
    x = torch.randn(2, 3, 4, 4)
    ref = m(x).detach()
    equalize(m, batchnorm="fold", max_scale=16.0)
    s = w0.abs().reshape(6, -1).amax(1) / m[0].weight.detach().abs().reshape(6, -1).amax(1)
    torch.testing.assert_close(s[0], torch.tensor(1.0))  # the dead channel is not scaled
    assert float(s.max()) <= 16.0 + 1e-4 and float(s.min()) >= 1 / 16 - 1e-6
    torch.testing.assert_close(s[1], torch.tensor(16.0))  # clamped at max_scale
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_high_bias_absorption_exact_above_three_sigma():
    def net() -> nn.Sequential:
        torch.manual_seed(2)
        m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3)).eval()
        m[0].weight.data.mul_(0.01)
        m[1].bias.data.fill_(10.0)  # pre-activation ~ N(10, 1): c = 10 - 3 = 7 moves into conv2's bias
        return m
    m, plain = net(), net()
    folded = 10.0 + m[0].bias.detach().clone()  # BN folded: beta + conv bias (mean 0, var 1, gamma 1)
    x = torch.randn(2, 3, 8, 8)
    ref = m(x).detach()
    equalize(m, batchnorm="fold", absorb_bias=True)
    equalize(plain, batchnorm="fold", absorb_bias=False)
    with torch.no_grad():
        assert float(m[0](x).min()) > 0  # the ReLU passes everything (and conv2 has no padding): exact
        torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-4)
    # c = beta - 3 gamma = 7 left conv1's bias in every channel (in that channel's equalized units)
    torch.testing.assert_close(m[0].bias / plain[0].bias, 1 - 7.0 / folded, rtol=1e-4, atol=0)


def _unbalanced_net() -> nn.Sequential:
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)).eval()
    s = torch.logspace(-2, 1.5, 16)[torch.randperm(16)]
    with torch.no_grad():  # same function, wildly different per-channel weight ranges
        m[0].weight.mul_(s.view(-1, 1, 1, 1))
        m[0].bias.mul_(s)
        m[2].weight.div_(s.view(1, -1, 1, 1))
    return m


def _int8_mse(m: nn.Module, cfg: QuantConfig, calib, x) -> float:
    ref = m(x).detach()
    q = copy.deepcopy(m)
    trtquant.quantize(q, cfg, placement=None)
    trtquant.calibrate(q, calib, method="max", progress=False)
    with torch.no_grad():
        return float((q(x) - ref).pow(2).mean())


def test_cle_lowers_per_tensor_int8_error():
    m = _unbalanced_net()
    calib = [torch.randn(4, 3, 12, 12) for _ in range(2)]
    x = torch.randn(8, 3, 12, 12)
    before = _int8_mse(m, PER_TENSOR, calib, x)
    equalize(m, batchnorm="fold")
    after = _int8_mse(m, PER_TENSOR, calib, x)
    print(f"\nper-tensor INT8 MSE: {before:.3g} -> {after:.3g} with CLE")
    assert after < 0.2 * before, (before, after)


class LNMLP(nn.Module):
    """LayerNorm -> fc1 -> fc2 (both foldable) -> GELU -> fc3 (needs a Mul); channel 3 is an outlier."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.ln = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.act = nn.GELU()
        self.fc3 = nn.Linear(32, 8)
        with torch.no_grad():
            self.ln.weight[3] = 60.0
            self.fc2.weight[:, 5] *= 0.02
            self.fc1.weight[5] *= 40.0  # fc1 output channel 5 is an outlier for fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.fc1(self.ln(x)))))


def test_smooth_quant_folds_and_keeps_fp32_function():
    m = LNMLP().eval()
    data = [torch.randn(4, 10, 16) for _ in range(2)]
    x = torch.randn(8, 10, 16)
    ref = m(x).detach()
    report = smooth_quant(m, data, alpha=0.5)
    assert report == {"fc1": "folded into ln", "fc2": "folded into fc1",
                      "fc3": "skipped (no LayerNorm/Linear producer that feeds only these layers, "
                               "and no input quantizer to carry a Mul: quantize first)"}
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_smooth_quant_mul_path_keeps_function_and_lowers_int8_error():
    cfg = QuantConfig(input=QuantDescriptor(num_bits=8, calib_method="max"))
    data = [torch.randn(4, 10, 16) for _ in range(2)]
    x = torch.randn(8, 10, 16)
    fp = LNMLP().eval()
    ref = fp(x).detach()

    plain = trtquant.quantize(copy.deepcopy(fp), cfg, placement=None)
    trtquant.calibrate(plain, data, method="max", progress=False)
    smooth = trtquant.quantize(copy.deepcopy(fp), cfg, placement=None)
    report = smooth_quant(smooth, data, alpha=0.5)
    assert report == {"fc1": "folded into ln", "fc2": "folded into fc1", "fc3": "mul"}
    with float_mode(smooth):
        torch.testing.assert_close(smooth(x), ref, rtol=1e-5, atol=1e-5)
    trtquant.calibrate(smooth, data, method="max", progress=False)
    with torch.no_grad():
        err_plain = float((plain(x) - ref).pow(2).mean())
        err_smooth = float((smooth(x) - ref).pow(2).mean())
    print(f"\nINT8 MSE: {err_plain:.3g} -> {err_smooth:.3g} with SmoothQuant")
    assert err_smooth < 0.5 * err_plain, (err_plain, err_smooth)
    with pytest.raises(ValueError, match="before trtquant.calibrate"):
        smooth_quant(smooth, data)


def _small_cnn(seed: int = 5) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6)).eval()


def _small_cnn_4bit_per_tensor(m: nn.Module, data: list) -> nn.Module:
    q = trtquant.quantize(copy.deepcopy(m), QuantConfig(input=QuantDescriptor(num_bits=8, calib_method="max"),
                                                        weight=QuantDescriptor(num_bits=4)), placement=None)
    return trtquant.calibrate(q, data, method="max", progress=False)


def test_bias_correction_zeroes_mean_output_error_per_channel():
    m = _small_cnn()
    data = [torch.randn(8, 3, 12, 12) for _ in range(3)]
    q = _small_cnn_4bit_per_tensor(m, data)

    def mean_err() -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([q(b) - m(b) for b in data]).mean((0, 1))
    before = mean_err()
    changes = bias_correction(q, data, error="accumulated")
    assert set(changes) == {"0", "2", "6"}
    after = mean_err()
    assert float(before.abs().max()) > 1e-3
    print(f"\nmean output error per channel: max {float(before.abs().max()):.3g} -> {float(after.abs().max()):.3g}")
    assert float(after.abs().max()) < 1e-5, after


def test_bias_correction_weight_error_closed_form_on_linear():
    """error="weight" (the paper's eq. 13): the bias moves by -(W~ - W) E[x~], x~ the layer's quantized input."""
    data = [torch.randn(8, 3, 12, 12) for _ in range(3)]
    q = _small_cnn_4bit_per_tensor(_small_cnn(), data)
    fc = q.get_submodule("6")
    seen = []
    h = fc.register_forward_hook(lambda mod, args, out: seen.append(mod.input_quantizer(args[0]).detach().clone()))
    with torch.no_grad():
        for b in data:
            q(b)
    h.remove()
    mean_x = torch.cat(seen).double().mean(0)
    with torch.no_grad():
        expect = fc.bias.double() - (fc.weight_quantizer(fc.weight).double() - fc.weight.double()) @ mean_x
    assert float((expect - fc.bias.double()).abs().max()) > 1e-3  # 4-bit weights do bias the output
    changes = bias_correction(q, data, error="weight")
    assert set(changes) == {"0", "2", "6"}
    # layers 0 and 2 moved first, but from the same pass: layer 6's correction used its pre-correction input
    torch.testing.assert_close(fc.bias.double(), expect, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="error must be"):
        bias_correction(q, data, error="both")


def test_adaround_batchnorm_gain_makes_equalize_keep_change_nothing():
    """Conv -> BN: the loss is the folded layer's, so moving per-channel scales into the BN gives the same model
    and the same calibration losses (which decide, per layer, whether the learned rounding is kept)."""
    fp = depthwise_net()
    data = [torch.randn(8, 3, 12, 12) for _ in range(2)]
    x = torch.randn(4, 3, 12, 12)

    def run(keep: bool, gain: bool):
        m = copy.deepcopy(fp)
        if keep:
            equalize(m)  # batchnorm="keep": rows rescaled into the BatchNorms
        q = trtquant.quantize(m, PER_CHANNEL_4BIT, placement=None)
        trtquant.calibrate(q, data, method="max", progress=False)
        res = adaround(q, data, iterations=100, progress=False, batchnorm_gain=gain)
        with torch.no_grad():
            return q(x), res

    (a, ra), (b, rb), (_, raw) = run(False, True), run(True, True), run(True, False)  # raw: the default
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4)  # same rounding decisions, up to float rounding
    for n in ("0", "3"):  # the two layers followed by a BatchNorm
        assert ra[n].kept == rb[n].kept
        assert rb[n].nearest_loss == pytest.approx(ra[n].nearest_loss, rel=1e-4)
        assert abs(raw[n].nearest_loss / ra[n].nearest_loss - 1) > 0.05  # unweighted: another loss
    assert rb["6"].nearest_loss == pytest.approx(raw["6"].nearest_loss, rel=1e-6)  # no BatchNorm after it


def test_adaround_within_floor_ceil_never_worse_and_helps_at_4bit():
    m = _small_cnn(6)
    data = [torch.randn(16, 3, 12, 12) for _ in range(2)]
    x = torch.randn(16, 3, 12, 12)
    ref = m(x).detach()
    q = trtquant.quantize(copy.deepcopy(m), PER_CHANNEL_4BIT, placement=None)
    trtquant.calibrate(q, data, method="max", progress=False)
    with torch.no_grad():
        nearest_err = float((q(x) - ref).pow(2).mean())
    w0 = {n: q.get_submodule(n).weight.detach().clone() for n in ("0", "2", "6")}
    res = adaround(q, data, iterations=200, progress=False)
    assert set(res) == {"0", "2", "6"}
    for name, r in res.items():
        layer = q.get_submodule(name)
        wq = layer.weight_quantizer
        s = amax_to_scale(wq.amax, 7)
        assert r.adaround_loss < r.nearest_loss if r.kept == "adaround" else r.adaround_loss >= r.nearest_loss
        if r.kept == "nearest":
            torch.testing.assert_close(layer.weight, w0[name], rtol=0, atol=0)
            continue
        codes = layer.weight / s
        torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)  # on the grid...
        assert bool((codes.round() >= torch.floor(w0[name] / s) - 1e-4).all())  # ...at floor or ceil
        assert bool((codes.round() <= torch.ceil(w0[name] / s) + 1e-4).all())
        torch.testing.assert_close(wq(layer.weight), layer.weight, rtol=0, atol=1e-6)  # quantizer reproduces it
    assert sum(r.kept == "adaround" for r in res.values()) >= 2
    with torch.no_grad():
        ada_err = float((q(x) - ref).pow(2).mean())
    print(f"\n4-bit weights, output MSE: nearest {nearest_err:.3g} -> AdaRound {ada_err:.3g}; "
          + ", ".join(f"{n}: {r.nearest_loss:.3g}->{r.adaround_loss:.3g} ({r.kept})" for n, r in res.items()))
    assert ada_err < 0.9 * nearest_err, (nearest_err, ada_err)


def test_adaround_keeps_nearest_when_learned_rounding_is_worse():
    m = _small_cnn(7)
    data = [torch.randn(8, 3, 12, 12)]
    q = trtquant.quantize(copy.deepcopy(m), PER_CHANNEL_4BIT, placement=None)
    trtquant.calibrate(q, data, method="max", progress=False)
    w0 = {n: q.get_submodule(n).weight.detach().clone() for n in ("0", "2", "6")}
    # a huge step and no regularizer: rounding decisions land at random, worse than nearest
    res = adaround(q, data, iterations=5, lr=100.0, reg_weight=0.0, progress=False)
    worse = [n for n, r in res.items() if r.adaround_loss >= r.nearest_loss]
    assert worse and all(res[n].kept == "nearest" for n in worse)
    for n in worse:
        torch.testing.assert_close(q.get_submodule(n).weight, w0[n], rtol=0, atol=0)


def test_adaround_time_budget_stops_every_layer():
    m = _small_cnn(8)
    data = [torch.randn(4, 3, 12, 12)]
    q = trtquant.quantize(copy.deepcopy(m), PER_CHANNEL_4BIT, placement=None)
    trtquant.calibrate(q, data, method="max", progress=False)
    res = adaround(q, data, iterations=10_000, time_budget_s=0.0, progress=False)
    assert len(res) == 3 and all(r.iterations == 0 for r in res.values())


@pytest.mark.parametrize("step", ["equalize", "equalize_relu6_clip", "smooth_quant", "bias_correction", "adaround"])
def test_each_step_still_exports(step, tmp_path):
    from trtquant.export import check_onnx, export_onnx
    from trtquant.export.compare import compare

    if step == "smooth_quant":
        m, data = LNMLP().eval(), [torch.randn(2, 10, 16)]
        cfg = QuantConfig(input=QuantDescriptor(num_bits=8, calib_method="max"))
    else:
        m, data = depthwise_net(), [torch.randn(2, 3, 12, 12)]
        cfg = PER_TENSOR
    if step == "equalize":
        equalize(m)
    if step == "equalize_relu6_clip":  # the ceiling exports as one Min per chain, between the conv and its ReLU6
        m = depthwise_net(act=nn.ReLU6)
        equalize(m, batchnorm="fold", relu6="clip")
        assert isinstance(m[1], ChannelCeiling)
    q = trtquant.quantize(m, cfg, placement=None if step == "smooth_quant" else "trt")
    if step == "smooth_quant":
        smooth_quant(q, data)
    trtquant.calibrate(q, data, method="max", progress=False)
    if step == "bias_correction":
        bias_correction(q, data)
    if step == "adaround":
        adaround(q, data, iterations=20, progress=False)
    x = torch.randn(4, *data[0].shape[1:])
    for target in ("tensorrt", "onnxruntime"):
        path = tmp_path / f"{step}_{target}.onnx"
        export_onnx(q, data[0][:1], path, exporter="legacy", target=target)
        if target == "tensorrt":
            report = check_onnx(str(path))
            assert not report.errors, report.format_table()
            if step == "smooth_quant":  # fc3's 1/s is the only explicit Mul (fc1, fc2 were folded)
                import onnx

                nodes = onnx.load(str(path)).graph.node
                q_inputs = {n.input[0] for n in nodes if n.op_type == "QuantizeLinear"}
                assert sum(n.op_type == "Mul" and n.output[0] in q_inputs for n in nodes) == 1
        out = compare(q, path, x, int8_kernels=False).outputs[0]  # ONNX Runtime computes what fake quant does
        print(f"\n{step} {target}: rel L2 {out.rel_l2:.3g}, cosine {out.cosine:.6f}, max abs {out.max_abs_error:.3g}")
        assert out.cosine > 0.99999 and out.rel_l2 < 1e-5, out
