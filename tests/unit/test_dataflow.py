"""Run-time dataflow (trtquant.placement.dataflow): which quantizers cover a conv's output, for models
torch.fx cannot trace. Each model branches on its input (untraceable) and marks the tensor asked about."""

from __future__ import annotations

from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trtquant.descriptor import QuantDescriptor
from trtquant.placement.dataflow import record_dataflow
from trtquant.quantizer import TensorQuantizer


class _Probe(nn.Module):
    """conv -> ``after`` -> ``reader`` (a quantizer, or float); the conv's output is recorded by a
    pass-through quantizer (disabled, as an observe-only one is at export time)."""

    def __init__(self, after: Callable[[torch.Tensor], torch.Tensor], quantized_reader: bool = True,
                 second_scale: Optional[float] = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.mark = TensorQuantizer(QuantDescriptor())
        self.mark.disable()
        self.reader = TensorQuantizer(QuantDescriptor(amax=2.0))
        self.other = TensorQuantizer(QuantDescriptor(amax=second_scale or 2.0)) if second_scale else None
        self.after, self.quantized_reader = after, quantized_reader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:  # control flow on the input: torch.fx cannot trace this model
            x = x * 1.0
        y = self.after(self.mark(self.conv(x)))
        out = self.reader(y) if self.quantized_reader else torch.sigmoid(y)
        if self.other is not None:
            out = out + self.other(y)
        return out.sum(dim=1)


def _covering(model: _Probe):
    flow = record_dataflow(model.eval(), torch.randn(2, 3, 8, 8))
    return flow.covering(flow.seen_by["mark"][0], lambda q: float(q.amax))


@pytest.mark.parametrize("after", [
    lambda y: y,
    lambda y: F.max_pool2d(F.relu(y), 2),
    lambda y: torch.relu_(y),
    lambda y: F.pad(y, (1, 1, 1, 1)),
    lambda y: torch.cat([y.permute(0, 2, 3, 1).reshape(2, -1), y.flatten(1)], 1),
], ids=["direct", "relu-maxpool", "inplace-relu", "zero-pad", "reshape-cat"])
def test_quantizer_after_copy_ops_covers_the_conv(after) -> None:
    assert _covering(_Probe(after)) == {2.0}


@pytest.mark.parametrize("model", [
    _Probe(lambda y: y, quantized_reader=False),  # a sigmoid reads it: float
    _Probe(lambda y: F.pad(y, (1, 1, 1, 1), mode="reflect")),  # not a zero pad
    _Probe(lambda y: y * 2.0),  # arithmetic before the quantizer
], ids=["float-reader", "reflect-pad", "scaled"])
def test_a_float_path_leaves_the_conv_uncovered(model) -> None:
    assert _covering(model) is None


def test_two_scales_are_reported_and_model_outputs_are_not_covered() -> None:
    assert _covering(_Probe(lambda y: y, second_scale=3.0)) == {2.0, 3.0}

    class Returns(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.mark = TensorQuantizer(QuantDescriptor())
            self.mark.disable()

        def forward(self, x):
            return self.mark(self.conv(x))

    flow = record_dataflow(Returns().eval(), torch.randn(1, 3, 4, 4))
    assert flow.covering(flow.seen_by["mark"][0], lambda q: 1) is None


class _ExtraLevel(nn.Module):
    """RetinaNet's FPN extra block: P6 = conv(P5) while a head, whose quantizer runs once per level in a
    Python loop, reads P5 too. The input-size branch makes the model untraceable, so placement cannot tie
    the two readers of P5; calibration sees them read one tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.p5 = nn.Conv2d(3, 8, 3, padding=1)
        self.p6 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Conv2d(8, 4, 3, padding=1)
        with torch.no_grad():
            self.p6.weight.mul_(8.0)  # P6 larger than P5: the head's amax (max over levels) is P6's

    def forward(self, x: torch.Tensor):
        if x.shape[-1] % 2:
            x = F.pad(x, (0, 1, 0, 1))
        p5 = self.p5(x)
        levels = [p5, self.p6(p5)]
        return [self.head(f) for f in levels]


def test_readers_of_one_tensor_in_untraced_code_share_amax_and_export_one_pair(tmp_path) -> None:
    import trtquant
    from trtquant.export import check_onnx, export_onnx

    model = trtquant.quantize(_ExtraLevel().eval())
    g = torch.Generator().manual_seed(0)
    trtquant.calibrate(model, [torch.randn(2, 3, 16, 16, generator=g) for _ in range(2)], method="max",
                       progress=False)
    # The head's quantizer saw both levels; P6's input quantizer only P5: without the tie they differ.
    assert torch.equal(model.p6.input_quantizer.amax, model.head.input_quantizer.amax)
    path = tmp_path / "extra.onnx"
    export_onnx(model, torch.randn(1, 3, 16, 16, generator=g), path, exporter="legacy")
    report = check_onnx(path)
    assert not report.errors and not [f for f in report.findings if f.rule == "B16-double-qdq"], report
