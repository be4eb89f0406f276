"""Which activation quantizers the ONNX Runtime flavour makes unsigned (non-negative by construction)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trtquant
from trtquant.export.ort_flavor import nonnegative_input_quantizers, ort_flavor_, unsigned_nonnegative_inputs_


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.after_relu = nn.Conv2d(8, 8, 1)          # input: ReLU output -> unsigned
        self.after_conv = nn.Conv2d(8, 8, 1)          # input: a conv output -> signed
        self.after_pool = nn.Conv2d(8, 8, 1)          # input: MaxPool(ReLU6(.)) -> unsigned
        self.after_tanh = nn.Conv2d(8, 8, 1)          # input: Hardtanh(-1, 1) -> signed
        self.after_cat = nn.Conv2d(16, 8, 1)          # input: cat(ReLU, conv) -> signed
        self.after_clamp = nn.Conv2d(8, 8, 1)         # input: x.clamp(min=0) -> unsigned
        self.pool = nn.MaxPool2d(2)
        self.relu6 = nn.ReLU6()
        self.tanh = nn.Hardtanh(-1.0, 1.0)
        self.fc = nn.Linear(8, 4)                     # input: flatten(avgpool(ReLU)) -> unsigned

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        a = self.act(y)
        b = self.after_relu(a)
        c = self.after_conv(b)
        d = self.after_pool(self.pool(self.relu6(c)))
        e = self.after_tanh(self.tanh(d))
        f = self.after_cat(torch.cat([F.relu(e), e], 1))
        g = self.after_clamp(f.clamp(min=0))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(g), 1), 1))


def _calibrated(model: nn.Module) -> nn.Module:
    q = trtquant.quantize(model.eval())
    trtquant.calibrate(q, [torch.randn(2, 3, 16, 16) for _ in range(2)], method="max", progress=False)
    return q


def test_structure_decides_unsigned() -> None:
    q = _calibrated(_Mixed())
    names = nonnegative_input_quantizers(q)
    assert names is not None
    layers = {n.rsplit(".", 1)[0] for n in names if n.endswith(".input_quantizer")}
    assert {"after_relu", "after_pool", "after_clamp", "fc"} <= layers
    assert not {"stem", "after_conv", "after_tanh", "after_cat"} & layers
    # Weight quantizers are never candidates.
    assert not any(n.endswith("weight_quantizer") for n in names)


def test_unsigned_switch_keeps_amax_and_doubles_resolution() -> None:
    q = _calibrated(_Mixed())
    before = {n: (m.amax.clone(), m.unsigned) for n, m in trtquant.quantizers(q).items() if m.amax is not None}
    switched = unsigned_nonnegative_inputs_(q)
    after = trtquant.quantizers(q)
    assert switched == sum(1 for n in before if after[n].unsigned and not before[n][1]) >= 4
    for n, (amax, _) in before.items():
        assert torch.equal(after[n].amax, amax), n  # same clipping point
    qz = after["after_relu.input_quantizer"]
    x = torch.linspace(0, float(qz.amax), 1001)
    levels = torch.unique(qz(x)).numel()
    assert levels == 256, levels  # [0, 255] * amax / 255, where the signed grid had 128 non-negative levels


def test_ort_flavor_of_an_untraceable_model_stays_signed() -> None:
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.conv2 = nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu(self.conv(x))
            if float(y.sum()) > -1:  # data-dependent control flow: torch.fx cannot trace it
                y = self.conv2(y)
            return y

    q = _calibrated(Untraceable())
    assert nonnegative_input_quantizers(q) is None
    flavored = ort_flavor_(copy.deepcopy(q))
    assert not any(m.unsigned for m in trtquant.quantizers(flavored).values())


@pytest.mark.parametrize("name", ["resnet18"])
def test_torchvision_post_relu_quantizers(name: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    q = _calibrated(getattr(torchvision.models, name)())
    names = nonnegative_input_quantizers(q) or set()
    # Every conv input in a ResNet is a ReLU output except the stem (the image); the residual identity
    # quantizers read ReLU outputs too; the observe-only branch quantizers read BN outputs.
    convs = [n for n, m in q.named_modules() if isinstance(m, nn.Conv2d)]
    assert {f"{c}.input_quantizer" for c in convs if c != "conv1"} <= names
    assert "conv1.input_quantizer" not in names
    assert any(n.endswith("residual_quantizer") for n in names)
    assert not any(n.endswith("residual_branch_quantizer") for n in names)
    assert "fc.input_quantizer" in names


class _Tricky(nn.Module):
    """Cases that look non-negative but are not (each feeds a conv whose quantizer must stay signed)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.after_inplace_sub = nn.Conv2d(8, 8, 1)
        self.after_negative_max = nn.Conv2d(8, 8, 1)
        self.after_keyword = nn.Conv2d(8, 8, 1)
        self.shared = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        a = F.relu(y)
        a.sub_(1.0)                                   # overwritten in place: can be negative now
        b = self.after_inplace_sub(a)
        c = self.after_negative_max(F.relu(b).clamp(min=-2.0, max=-1.0))  # min > max: the result is -1
        d = self.after_keyword(input=F.relu(c))       # a keyword call site: not analysed, stays signed
        return self.shared(F.relu(d)) + self.shared(d)  # one layer, one signed site


def test_inplace_clamp_keyword_and_multi_site_cases_stay_signed() -> None:
    q = _calibrated(_Tricky())
    names = nonnegative_input_quantizers(q)
    assert names is not None
    for layer in ("after_inplace_sub", "after_negative_max", "after_keyword", "shared"):
        assert f"{layer}.input_quantizer" not in names, layer


def test_clip_with_a_computed_bound_is_kept(tmp_path) -> None:
    """ORT graph rewrite: a Clip whose max is computed at run time cannot be proven a no-op."""
    pytest.importorskip("onnxruntime")
    import onnx

    from trtquant.export import compare, export_onnx

    class ComputedClip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c2(torch.clamp(F.relu(self.c1(x)), max=x.abs().mean() * 0.1))

    q = _calibrated(ComputedClip())
    path = tmp_path / "clip.onnx"
    export_onnx(q, torch.randn(1, 3, 16, 16), path, target="onnxruntime", exporter="legacy")
    assert any(n.op_type == "Clip" for n in onnx.load(str(path)).graph.node)
    res = compare(q, path, torch.randn(4, 3, 16, 16), int8_kernels=False).outputs[0]
    assert res.rel_l2 < 1e-2, res


def test_one_tensor_two_scales_keeps_a_pair_per_consumer(tmp_path) -> None:
    """Two quantizers read one ReLU output with different amax (as after QAT with learned amax): the
    ONNX Runtime graph gives each consumer its own Q/DQ instead of one silently shared scale."""
    pytest.importorskip("onnxruntime")
    import onnx

    from trtquant.export import compare, export_onnx

    class TwoReaders(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = nn.Conv2d(8, 4, 1)
            self.c3 = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = F.relu(self.c1(x))
            return torch.cat([self.c2(a), self.c3(a)], 1)

    q = _calibrated(TwoReaders())
    q.c3.input_quantizer.amax = q.c2.input_quantizer.amax * 0.5
    path = tmp_path / "two.onnx"
    export_onnx(q, torch.randn(1, 3, 16, 16), path, target="onnxruntime", exporter="legacy")
    proto = onnx.load(str(path))
    relu_out = next(n.output[0] for n in proto.graph.node if n.op_type == "Relu")
    readers = [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == relu_out]
    assert len(readers) == 2
    x = torch.randn(8, 3, 16, 16)
    res = compare(q, path, x, int8_kernels=False).outputs[0]
    # The same scales as the flavoured model: only rare single-code flips from summation order
    # (measured 2.6e-4); had c3 been given c2's scale, the outputs would differ far more.
    shared = copy.deepcopy(q)
    shared.c3.input_quantizer.amax = shared.c2.input_quantizer.amax.clone()
    wrong = compare(shared, path, x, int8_kernels=False).outputs[0]
    assert res.rel_l2 < 2e-3 and wrong.rel_l2 > 10 * res.rel_l2, (res, wrong)


class _PerTensorWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.conv(x), 1).flatten(1))


class _Conv1dBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.conv2 = nn.Conv1d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.bn(self.conv(x))))


class _OutputAlsoQuantized(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(6, 8)
        self.l2 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor):
        a = F.relu(self.l1(x))
        return a, self.l2(a)  # a is a graph output and the quantized input of l2


@pytest.mark.parametrize("case", ["per_tensor_weights", "conv1d_bn", "output_also_quantized"])
def test_onnxruntime_graph_equals_its_flavour(case: str, tmp_path) -> None:
    """Biases, BatchNorm folds and graph outputs: the ONNX Runtime graph computes the flavoured model."""
    pytest.importorskip("onnxruntime")
    from trtquant import QuantDescriptor
    from trtquant.export import compare, export_onnx

    torch.manual_seed(0)
    if case == "per_tensor_weights":
        model, x = _PerTensorWeights().eval(), torch.randn(4, 3, 12, 12)
        cfg = {"weight": QuantDescriptor(num_bits=8)}
    elif case == "conv1d_bn":
        model, x = _Conv1dBN().eval(), torch.randn(4, 3, 20)
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.data.uniform_(-1.5, 1.5)  # negative gammas flip the folded codes
        cfg = {}
    else:
        model, x = _OutputAlsoQuantized().eval(), torch.randn(16, 6)
        cfg = {}
    q = trtquant.quantize(model, config=cfg) if cfg else trtquant.quantize(model)
    trtquant.calibrate(q, [x], method="max", progress=False)
    path = tmp_path / f"{case}.onnx"
    export_onnx(q, x[:1], path, target="onnxruntime", exporter="legacy")
    res = compare(q, path, x, int8_kernels=False)
    for out in res.outputs:
        assert out.rel_l2 < 1e-6, (case, out)  # measured 1e-8..6e-8: float summation order only
