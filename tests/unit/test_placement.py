"""Automatic TensorRT placement: residual identity quantizers, LCA rule, MaxPool, untraceable models, state dicts."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trtquant
from trtquant.placement import rules
from trtquant.placement.fx_pass import placement_report

torchvision = pytest.importorskip("torchvision")


def _quantizing(q) -> bool:
    """Enabled and fake-quantizing (observe-only quantizers for the ONNX Runtime graph do not count)."""
    return q.is_enabled and q._if_quant and not getattr(q, "ort_only", False)


def _by_rule(report, rule):
    return [e["quantizer"] for e in report["quantizers"] if e["rule"] == rule]


def _disable_all(model):
    for q in trtquant.quantizers(model).values():
        q.disable()
    return model


def _capture_input(module):
    seen = []
    module.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach().clone()))
    return seen


def _capture_output(module):
    seen = []
    module.register_forward_hook(lambda m, inp, out: seen.append(out.detach().clone()))
    return seen


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return trtquant.quantize(torchvision.models.resnet50().eval())


@pytest.fixture(scope="module")
def resnet18_pair():
    torch.manual_seed(0)
    fp = torchvision.models.resnet18().eval()
    return fp, trtquant.quantize(copy.deepcopy(fp))


# ---- torchvision models -----------------------------------------------------------------------------

def test_resnet50_gets_16_residual_identity_quantizers(resnet50):
    report = placement_report(resnet50)
    assert report["traced"] is True and report["reason"] is None
    residual = _by_rule(report, rules.RULE_RESIDUAL)
    blocks = [n for n, m in resnet50.named_modules() if isinstance(m, torchvision.models.resnet.Bottleneck)]
    assert len(blocks) == 16
    assert sorted(residual) == sorted(f"{b}.residual_quantizer" for b in blocks)
    qs = trtquant.quantizers(resnet50)
    assert all(_quantizing(qs[n]) for n in residual)
    entries = {e["quantizer"]: e for e in report["quantizers"]}
    assert all(entries[n]["enabled"] for n in residual)


def test_resnet50_identity_inputs_are_the_skip_paths(resnet50):
    """Plain blocks quantize the block input; downsample blocks the downsample output (LCA rule)."""
    model = _disable_all(copy.deepcopy(resnet50))
    block_in, ds_out, res_in = {}, {}, {}
    for name, m in model.named_modules():
        if isinstance(m, torchvision.models.resnet.Bottleneck):
            res_in[name] = _capture_input(m.residual_quantizer)
            block_in[name] = []
            m.register_forward_pre_hook(lambda mod, inp, key=name: block_in[key].append(inp[0].detach().clone()))
            if m.downsample is not None:
                ds_out[name] = _capture_output(m.downsample)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert len(ds_out) == 4
    for name in res_in:
        want = ds_out[name][0] if name in ds_out else block_in[name][0]
        assert torch.equal(res_in[name][0], want), name


def test_resnet50_maxpool_quantizer_disabled(resnet50):
    q = resnet50.maxpool.input_quantizer
    assert not q.is_enabled
    entry = next(e for e in placement_report(resnet50)["quantizers"] if e["quantizer"] == "maxpool.input_quantizer")
    assert entry["rule"] == rules.RULE_MAXPOOL and entry["enabled"] is False
    # The average pool in front of the classifier stays quantized.
    assert _quantizing(resnet50.avgpool.input_quantizer)


def test_mobilenet_v2_gets_10_residual_quantizers():
    torch.manual_seed(0)
    model = trtquant.quantize(torchvision.models.mobilenet_v2().eval())
    report = placement_report(model)
    assert report["traced"] is True
    residual = _by_rule(report, rules.RULE_RESIDUAL)
    blocks = [n for n, m in model.named_modules()
              if isinstance(m, torchvision.models.mobilenetv2.InvertedResidual) and m.use_res_connect]
    assert len(residual) == 10 == len(blocks)
    assert sorted(residual) == sorted(f"{b}.residual_quantizer" for b in blocks)
    # Identity = the block input (the branch ends in a 1x1 conv + BN, no activation).
    model = _disable_all(model)
    name = blocks[0]
    block = model.get_submodule(name)
    res_in = _capture_input(block.residual_quantizer)
    blk_in = []
    block.register_forward_pre_hook(lambda m, inp: blk_in.append(inp[0].detach().clone()))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert torch.equal(res_in[0], blk_in[0])


# ---- user-defined blocks ---------------------------------------------------------------------------

class _Block(nn.Module):
    """``relu(bn(conv(x))) + x`` in various spellings."""

    def __init__(self, style: str):
        super().__init__()
        self.style = style
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.relu(self.bn(self.conv(x)))
        if self.style == "branch + x":
            return y + x
        if self.style == "x + branch":
            return x + y
        if self.style == "torch.add":
            return torch.add(y, x)
        if self.style == "operator.add":
            return operator.add(x, y)
        if self.style == "iadd":
            y += x
            return y
        if self.style == "method":
            return y.add(x)
        if self.style == "functional relu":
            return F.relu(self.bn(self.conv(x))) + x
        raise AssertionError(self.style)


def _user_model(block: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), block, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4)).eval()


STYLES = ["branch + x", "x + branch", "torch.add", "operator.add", "iadd", "method", "functional relu"]


@pytest.mark.parametrize("style", STYLES)
def test_user_block_gets_identity_quantizer_on_x(style):
    fp = _user_model(_Block(style))
    model = trtquant.quantize(copy.deepcopy(fp))
    report = placement_report(model)
    assert report["traced"] is True
    assert _by_rule(report, rules.RULE_RESIDUAL) == ["2.residual_quantizer"]
    block = model[2]
    # Only the conv's own quantizers and the identity quantizer quantize inside the block.
    inside = {n for n, q in block.named_modules() if isinstance(q, trtquant.TensorQuantizer) and _quantizing(q)}
    assert inside == {"conv.input_quantizer", "conv.weight_quantizer", "residual_quantizer"}
    _disable_all(model)
    res_in = _capture_input(block.residual_quantizer)
    blk_in = []
    block.register_forward_pre_hook(lambda m, inp: blk_in.append(inp[0].detach().clone()))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out, ref = model(x), fp(x)
    assert torch.equal(res_in[0], blk_in[0]), "the identity quantizer does not read the block input x"
    assert torch.equal(out, ref)


class _DownsampleBlock(nn.Module):
    """Both Add inputs are conv branches: a two-conv main path and a one-conv downsample (the identity)."""

    def __init__(self, skip_first: bool):
        super().__init__()
        self.skip_first = skip_first
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))

    def forward(self, x):
        main = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        skip = self.down(x)
        return F.relu(skip + main if self.skip_first else main + skip)


@pytest.mark.parametrize("skip_first", [False, True])
def test_both_inputs_conv_branches_quantizes_the_downsample_by_lca(skip_first):
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _DownsampleBlock(skip_first)).eval()
    model = trtquant.quantize(copy.deepcopy(fp))
    report = placement_report(model)
    assert _by_rule(report, rules.RULE_RESIDUAL) == ["1.residual_quantizer"]
    block = model[1]
    _disable_all(model)
    res_in = _capture_input(block.residual_quantizer)
    down_out = _capture_output(block.down)
    main_out = _capture_output(block.bn2)
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    assert torch.equal(res_in[0], down_out[0])
    assert not torch.equal(res_in[0], main_out[0])


# ---- untraceable models ----------------------------------------------------------------------------

class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        if y.sum() > 0:  # data-dependent Python control flow: torch.fx cannot trace this
            y = y + self.conv2(y)
        return self.fc(self.pool(y).mean(dim=(2, 3)))


def test_untraceable_model_keeps_module_quantizers_and_says_why():
    torch.manual_seed(0)
    model = trtquant.quantize(_Untraceable().eval())
    report = placement_report(model)
    assert report["traced"] is False
    reason = report["reason"]
    assert reason and "torch.fx" in reason and "_Untraceable" in reason
    assert "control flow" in reason or "TraceError" in reason, reason
    names = {e["quantizer"] for e in report["quantizers"]}
    assert {"conv.input_quantizer", "conv.weight_quantizer", "conv2.input_quantizer", "fc.input_quantizer",
            "fc.weight_quantizer"} <= names
    assert not _by_rule(report, rules.RULE_RESIDUAL)  # graph rules were skipped ...
    assert not model.pool.input_quantizer.is_enabled  # ... module rules still apply
    from trtquant.placement.fx_pass import format_placement_report

    assert "skipped" in format_placement_report(report)
    # The model still calibrates and runs quantized.
    x = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    trtquant.calibrate(model, x, method="max", progress=False)
    with torch.no_grad():
        assert torch.isfinite(model(x[0])).all()


# ---- state dicts and disabled quantizers -----------------------------------------------------------

def test_state_dict_keys_are_the_float_keys_plus_only_amax(resnet18_pair):
    fp, model = resnet18_pair
    model = copy.deepcopy(model)
    float_keys = list(fp.state_dict())
    assert list(model.state_dict()) == float_keys
    model.load_state_dict(fp.state_dict(), strict=True)
    data = [torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    trtquant.calibrate(model, data, method="max", progress=False)
    keys = list(model.state_dict())
    extra = [k for k in keys if k not in set(float_keys)]
    assert [k for k in keys if k in set(float_keys)] == float_keys
    assert extra and all(k.endswith("._amax") for k in extra), [k for k in extra if not k.endswith("._amax")]
    qs = trtquant.quantizers(model)
    assert {k[: -len("._amax")] for k in extra} == {n for n, q in qs.items() if q.amax is not None}
    assert "layer2.0.residual_quantizer._amax" in extra


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_all_quantizers_disabled_is_bit_exact_float(name, resnet18_pair):
    if name == "resnet18":
        fp, model = resnet18_pair
        model = copy.deepcopy(model)
    else:
        torch.manual_seed(0)
        fp = torchvision.models.mobilenet_v2().eval()
        model = trtquant.quantize(copy.deepcopy(fp))
    _disable_all(model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(model(x), fp(x))


# ---- blocks called with constant arguments ----------------------------------------------------------

class _OptionalArgBlock(nn.Module):
    """EfficientNet-style optional arguments: fx cannot branch on them unless they are concrete."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x, scale=None, use_act=True):
        y = self.bn(self.conv(x))
        if scale:
            y = y * scale
        if use_act:
            y = F.relu(y)
        return y + x


class _TwoCalls(nn.Module):
    def __init__(self, shared: bool):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = _OptionalArgBlock()
        self.b = self.a if shared else _OptionalArgBlock()

    def forward(self, x):
        x = self.a(self.stem(x), scale=0.5)
        return self.b(x, 2.0, use_act=False)


def test_blocks_are_traced_with_the_constants_they_are_called_with():
    torch.manual_seed(0)
    fp = _TwoCalls(shared=False).eval()
    model = trtquant.quantize(copy.deepcopy(fp))
    report = placement_report(model)
    assert report["traced"] is True and report["skipped"] == {}
    assert _by_rule(report, rules.RULE_RESIDUAL) == ["a.residual_quantizer", "b.residual_quantizer"]
    res_in = _capture_input(model.b.residual_quantizer)
    blk_in = []
    model.b.register_forward_pre_hook(lambda m, inp: blk_in.append(inp[0].detach().clone()))
    _disable_all(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), fp(x))  # scale and use_act kept their traced meaning
        assert torch.equal(res_in[0], blk_in[0])
        with pytest.raises(Exception, match="specialized"):
            model.b(blk_in[0], 3.0, use_act=False)  # a constant it was not traced with: refused, not wrong


def test_block_called_with_different_constants_is_skipped_and_named(caplog):
    torch.manual_seed(0)
    fp = _TwoCalls(shared=True).eval()
    with caplog.at_level("WARNING", logger="trtquant.placement.fx_pass"):
        model = trtquant.quantize(copy.deepcopy(fp))
    report = placement_report(model)
    assert list(report["skipped"]) == ["a"]
    assert "scale=0.5 vs 2.0" in report["skipped"]["a"] and "use_act=True vs False" in report["skipped"]["a"]
    assert any(r.getMessage().startswith("placement: a: graph rules skipped") for r in caplog.records)
    from trtquant.placement.fx_pass import format_placement_report

    assert "block skipped: a:" in format_placement_report(report)
    assert not _by_rule(report, rules.RULE_RESIDUAL)
    _disable_all(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), fp(x))


# ---- models that do not trace whole -----------------------------------------------------------------

class _Neck(nn.Module):
    """Data-dependent control flow around a traceable residual body."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), _Block("iadd"))

    def forward(self, x):
        y = self.body(x)
        if y.mean() > 100:
            y = y * 0
        return y


class _ImageListModel(nn.Module):
    """Detection-style: a Python loop over a list of images at the top (fx cannot iterate a Proxy)."""

    def __init__(self):
        super().__init__()
        self.backbone = _Neck()
        self.head = nn.Sequential(_Block("method"), nn.Conv2d(8, 4, 1))

    def forward(self, images):
        return [self.head(self.backbone(img[None])) for img in images]


def test_untraceable_root_places_its_largest_traceable_submodules():
    torch.manual_seed(0)
    fp = _ImageListModel().eval()
    model = trtquant.quantize(copy.deepcopy(fp))
    report = placement_report(model)
    assert report["traced"] is False and "_ImageListModel" in report["reason"]
    assert report["placed_subtrees"] == ["backbone.body", "head"]
    assert _by_rule(report, rules.RULE_RESIDUAL) == ["backbone.body.2.residual_quantizer", "head.0.residual_quantizer"]
    from trtquant.placement.fx_pass import format_placement_report

    assert "applied to 2 traceable submodule(s) (backbone.body, head)" in format_placement_report(report)
    # The identity quantizer reads the block input, and the model computes what it did.
    res_in = _capture_input(model.head[0].residual_quantizer)
    blk_in = []
    model.head[0].register_forward_pre_hook(lambda m, inp: blk_in.append(inp[0].detach().clone()))
    _disable_all(model)
    images = [torch.randn(3, 16, 16), torch.randn(3, 12, 12)]
    with torch.no_grad():
        for got, want in zip(model(images), fp(images)):
            assert torch.equal(got, want)
    assert torch.equal(res_in[0], blk_in[0])
