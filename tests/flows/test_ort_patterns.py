"""The ONNX Runtime target on the CNN patterns of the torchvision zoo, one minimal model each.

Each model is quantized (placement 'trt', which gives uncovered conv outputs their observers:
:func:`trtquant.placement.ort_observers.add_output_observers_`), calibrated (max, 2 batches of 4) and
exported with ``target='onnxruntime'``. Each test asserts that ONNX Runtime loads the graph, that it
computes its ONNX Runtime flavour (cosine >= 0.999, unoptimised and with ORT_ENABLE_ALL fusions)
and how many Conv layers ONNX Runtime's optimized graph runs as INT8 kernels.
"""

from __future__ import annotations

import copy

from typing import List, Optional, Tuple

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trtquant
from trtquant.export import compare, export_onnx
from trtquant.export.compare import Comparison
from trtquant.export.ort_graph import FLOAT_OPS_KEY, int32_bias, int32_bias_limit

pytest.importorskip("onnxruntime")


def _cbr(cin: int, cout: int, k: int = 1, act: Optional[nn.Module] = None, groups: int = 1,
         padding: Optional[int] = None) -> nn.Sequential:
    """Conv + BatchNorm (non-trivial statistics, some negative gammas) + activation."""
    bn = nn.BatchNorm2d(cout)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(-1.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    conv = nn.Conv2d(cin, cout, k, padding=k // 2 if padding is None else padding, groups=groups, bias=False)
    return nn.Sequential(conv, bn, act if act is not None else nn.ReLU(inplace=True))


def _export_and_compare(model: nn.Module, tmp_path, config=None, size: int = 24) -> Tuple[Comparison, Comparison, onnx.ModelProto]:
    torch.manual_seed(0)
    model = model.eval()
    q = trtquant.quantize(model, config=config) if config is not None else trtquant.quantize(model)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, size, size, generator=g) for _ in range(2)]
    trtquant.calibrate(q, batches, method="max", progress=False)
    path = tmp_path / "model.onnx"
    export_onnx(q, batches[0][:1], path, target="onnxruntime", exporter="legacy")
    x = torch.randn(4, 3, size, size, generator=g)
    plain = compare(q, path, x, optimize=False)  # loads in ORT; also counts INT8 convs (optimized graph)
    fused = compare(q, path, x, optimize=True, int8_kernels=False)
    return plain, fused, onnx.load(str(path))


def _assert_parity(plain: Comparison, fused: Comparison) -> None:
    for res in (plain, fused):
        for out in res.outputs:
            assert out.cosine >= 0.999, (res.graph_optimization, out)


class _Inception(nn.Module):
    """GoogLeNet's pattern: conv/BN/ReLU branches and a MaxPool branch concatenated, then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 8, 3)
        self.b1 = _cbr(8, 4)
        self.b2 = nn.Sequential(_cbr(8, 4), _cbr(4, 6, 3))
        self.b3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), _cbr(8, 4))
        self.head = _cbr(14, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = torch.cat([self.b1(y), self.b2(y), self.b3(y)], 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.head(y), 1), 1))


def test_inception_concat_runs_every_conv_int8(tmp_path) -> None:
    """Before: the branch convs before the Concat ran float (no output Q: 3/7 INT8 here)."""
    plain, fused, _ = _export_and_compare(_Inception(), tmp_path)
    _assert_parity(plain, fused)
    assert plain.int8_conv_fraction == 1.0, plain.notes


class _TinyActivations(nn.Module):
    """GoogLeNet with std-0.01 init and untouched BatchNorm statistics: activations shrink to ~1e-13
    while the classifier bias stays ~0.1, so its int32 bias code reaches the int32 limit."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            self.fc.bias.copy_(torch.tensor([0.1, -0.2, 0.05, 0.3]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x * 1e-12))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def test_saturated_int32_bias_does_not_overflow_the_fused_kernel(tmp_path) -> None:
    """Before: the bias code 2**31 - 1 wrapped around in QGemm's int32 sum (fused cosine 0.02 on GoogLeNet,
    unoptimised 1.0): the codes now stop at int32_bias_limit(fan_in)."""
    assert int32_bias_limit(8) == 2**31 - 1 - 8 * 255 * 128
    codes, _ = int32_bias(np.array([1.0, -1.0]), 1e-12, np.array([1e-3, 1e-3]), fan_in=8)
    assert codes.tolist() == [int32_bias_limit(8), -int32_bias_limit(8)]
    plain, fused, proto = _export_and_compare(_TinyActivations(), tmp_path)
    _assert_parity(plain, fused)
    biases = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer
              if t.data_type == onnx.TensorProto.INT32]
    # The conv (fan-in 3 * 3 * 3) saturates too: its codes stop at its own, lower limit.
    assert biases and max(int(np.abs(b.astype(np.int64)).max()) for b in biases) == int32_bias_limit(27)


class _SqueezeExcite(nn.Module):
    """MobileNetV3's block: expand (HardSwish), depthwise (HardSwish), SE (pool -> conv -> ReLU -> conv ->
    Hardsigmoid -> Mul), project, residual."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 8, 3, nn.Hardswish())
        self.expand = _cbr(8, 16, 1, nn.Hardswish())
        self.dw = _cbr(16, 16, 3, nn.Hardswish(), groups=16)
        self.fc1 = nn.Conv2d(16, 8, 1)
        self.fc2 = nn.Conv2d(8, 16, 1)
        self.project = _cbr(16, 8, 1, nn.Identity())
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        h = self.dw(self.expand(y))
        s = F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(h, 1)))))
        y = y + self.project(h * s)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


@pytest.mark.parametrize("per_tensor", [False, True], ids=["per_channel", "per_tensor"])
def test_squeeze_excitation_with_hardswish_runs_int8(per_tensor: bool, tmp_path) -> None:
    """Before: 1/6 INT8 per channel, 0/6 per tensor. HardSwish and the Hardsigmoid gate stay float
    between a DQ and a Q, and the graph says so."""
    from trtquant.config import QuantConfig
    from trtquant.descriptor import QuantDescriptor

    cfg = QuantConfig(weight=QuantDescriptor(num_bits=8, axis=None)) if per_tensor else None
    plain, fused, proto = _export_and_compare(_SqueezeExcite(), tmp_path, config=cfg)
    _assert_parity(plain, fused)
    assert plain.int8_conv_fraction == 1.0, plain.notes
    meta = {p.key: p.value for p in proto.metadata_props}
    assert {"HardSigmoid", "HardSwish"} <= set(meta[FLOAT_OPS_KEY].split(",")), meta[FLOAT_OPS_KEY]


class _Shuffle(nn.Module):
    """ShuffleNetV2's unit: chunk, a conv branch, concat, channel shuffle (view/transpose/view)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 16, 3)
        self.branch = nn.Sequential(_cbr(8, 8), _cbr(8, 8, 3, nn.Identity(), groups=8), _cbr(8, 8))
        self.branch2 = nn.Sequential(_cbr(8, 8), _cbr(8, 8, 3, nn.Identity(), groups=8), _cbr(8, 8))
        self.head = _cbr(16, 8)

    @staticmethod
    def shuffle(x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        for branch in (self.branch, self.branch2):
            a, b = y.chunk(2, dim=1)
            y = self.shuffle(torch.cat([a, branch(b)], 1))
        return self.head(y)


def test_channel_shuffle_runs_int8(tmp_path) -> None:
    plain, fused, _ = _export_and_compare(_Shuffle(), tmp_path)
    _assert_parity(plain, fused)
    assert plain.int8_conv_fraction == 1.0, plain.notes


class _PaddedDepthwise(nn.Module):
    """A zero Pad (nn.ZeroPad2d, as in asymmetric 'same' padding) in front of a depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 8, 3)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.dw = _cbr(8, 8, 3, groups=8, padding=0)
        self.pw = _cbr(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(self.pad(self.stem(x))))


def test_zero_pad_before_depthwise_runs_int8(tmp_path) -> None:
    plain, fused, proto = _export_and_compare(_PaddedDepthwise(), tmp_path)
    _assert_parity(plain, fused)
    assert plain.int8_conv_fraction == 1.0, plain.notes
    # The Q copied up through the Pad: the stem's output is quantized before it, not only after.
    pad = next(n for n in proto.graph.node if n.op_type == "Pad")
    producer = {o: n for n in proto.graph.node for o in n.output}[pad.input[0]]
    assert producer.op_type == "DequantizeLinear", producer.op_type


class _ConvBNChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(_cbr(3, 8, 3), _cbr(8, 8, 3, groups=8), _cbr(8, 16), _cbr(16, 8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_per_tensor_weights_with_batchnorm_fold_and_run_int8(tmp_path) -> None:
    """Before: BatchNorm was folded only into per-channel weights, so 0/4 convs ran INT8 here."""
    from trtquant.config import QuantConfig
    from trtquant.descriptor import QuantDescriptor

    cfg = QuantConfig(weight=QuantDescriptor(num_bits=8, axis=None))
    plain, fused, proto = _export_and_compare(_ConvBNChain(), tmp_path, config=cfg)
    _assert_parity(plain, fused)
    assert plain.int8_conv_fraction == 1.0, plain.notes
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)


class _LevelHead(nn.Module):
    """A detection head in torchvision's style: a conv tower and a final conv shared by every FPN level,
    run in a Python loop over the list it gets (torch.fx cannot trace that alone), each level's output
    reshaped and all concatenated into a model output."""

    def __init__(self) -> None:
        super().__init__()
        self.tower = _cbr(8, 8, 3)
        self.logits = nn.Conv2d(8, 6, 3, padding=1)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        out = []
        for f in features:
            y = self.logits(self.tower(f))
            out.append(y.permute(0, 2, 3, 1).reshape(y.shape[0], -1, 6))
        return torch.cat(out, 1)


class _Detector(nn.Module):
    """Two feature levels into :class:`_LevelHead`; the coarse level is a model output too (Faster R-CNN
    returns its FPN features beside the RPN outputs). Branching on the input size, as detectors' transforms
    do, makes the whole model untraceable."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 8, 3)
        self.down = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1))
        self.head = _LevelHead()

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-1] % 2:
            x = F.pad(x, (0, 1, 0, 1))
        p3 = self.stem(x)
        p4 = self.down(p3)
        return self.head([p3, p4]), p4


def test_untraceable_detection_head_runs_every_conv_int8(tmp_path) -> None:
    """Before: the head's final conv (its output a model output, called from untraced Python) had no
    output Q and ran float, and so did a conv whose output is both a model output and another conv's
    input (2/5 convs float here). Its observer is placed outside every traced subtree and kept or
    dropped from the model's run-time dataflow; the tower's observer is dropped (the final conv's input
    quantizer covers it)."""
    from trtquant.export.ort_flavor import ort_flavor_, output_observers_needed
    from trtquant.placement.fx_pass import placement_report
    from trtquant.placement.rules import RULE_ORT_OUTPUT

    plain, fused, graph = _export_and_compare(_Detector(), tmp_path)
    _assert_parity(plain, fused)
    assert plain.int8_conv_fraction == 1.0, plain.notes
    q = trtquant.quantize(_Detector().eval())
    placed = {e["quantizer"]: e["rule"] for e in placement_report(q)["quantizers"]}
    assert placed.get("head.logits.ort_output_quantizer") == RULE_ORT_OUTPUT, placed
    g = torch.Generator().manual_seed(1)
    trtquant.calibrate(q, [torch.randn(2, 3, 24, 24, generator=g)], method="max", progress=False)
    x = torch.randn(2, 3, 24, 24, generator=g)
    needed = output_observers_needed(ort_flavor_(copy.deepcopy(q)), x)
    assert "head.logits.ort_output_quantizer" in needed and "down.0.ort_output_quantizer" in needed, needed
    assert not any(n.startswith("head.tower") for n in needed), needed
    path = tmp_path / "det.onnx"
    export_onnx(q, x, path, target="onnxruntime", exporter="legacy")
    tf = compare(q, path, x, teacher_forced=True, int8_kernels=False).teacher_forced
    assert tf.codes > 0 and tf.mismatched == 0, tf
