"""Calibration never crashes on what normal models do: zero-initialized layers and branches that never run.

* Zero tensors/channels get amax :data:`ZERO_AMAX` (1.0): codes 0, dequantized exactly 0, export
  scale 1/127 > 0, and one warning lists the layers.
* Quantizers that saw no data are disabled with one warning (``strict=True``: CalibrationError).
* torchvision ResNet-18 with ``zero_init_residual=True`` goes through quantize -> calibrate (max and
  entropy) -> export -> check_onnx with 0 errors, every Q scale > 0, finite ONNX Runtime output.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

import trtquant
from trtquant import CalibrationError
from trtquant.quantizer import ZERO_AMAX, floor_zero_amax

import _parity as P

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from trtquant.export import check_onnx, export_onnx  # noqa: E402

LOGGER = "trtquant.calibrate"


def _warnings(caplog, needle: str) -> list:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and needle in r.getMessage()]


def _zero_names(message: str) -> list:
    """The quantizer names a "saw only zeros" warning lists."""
    return message.split("exact): ", 1)[1].split(". Expected", 1)[0].split(", ")


def _export_and_check(model: nn.Module, x: torch.Tensor, path) -> np.ndarray:
    """Legacy export, check_onnx without errors, every QuantizeLinear scale > 0; returns ORT's output."""
    result = export_onnx(model, x, path, exporter="legacy")
    report = check_onnx(result.path)
    assert not report.errors, report
    proto = onnx.load(str(result.path))
    consts = P.constants(proto)
    scales = [consts[n.input[1]] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert scales and all(np.all(s > 0) and np.all(np.isfinite(s)) for s in scales)
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    return sess.run(None, {result.input_names[0]: x.numpy()})[0]


def test_floor_zero_amax_closed_form():
    amax, dead = floor_zero_amax(torch.tensor([0.5, 0.0, -0.0, 2.0]))
    assert torch.equal(amax, torch.tensor([0.5, ZERO_AMAX, ZERO_AMAX, 2.0])) and dead == "2 of 4 channels"
    amax, dead = floor_zero_amax(torch.tensor(0.0))
    assert float(amax) == ZERO_AMAX and dead == "all values"
    same = torch.tensor([1.5, 3.0])
    assert floor_zero_amax(same) == (same, "")
    # The floor survives an fp16 export: its scale is a normal fp16 number, not a flush to 0.
    assert float(torch.tensor(ZERO_AMAX / 127, dtype=torch.float16)) > 2.0 ** -14


class ZeroConvNet(nn.Module):
    """``zero`` is all-zero (weights and bias): its per-channel weight amax and ``head``'s input are all 0."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.zero = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)
        nn.init.zeros_(self.zero.weight)
        nn.init.zeros_(self.zero.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.zero(torch.relu(self.stem(x))))


def test_all_zero_conv_gets_positive_amax_and_one_warning(caplog, tmp_path):
    model = trtquant.quantize(ZeroConvNet())
    data = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trtquant.calibrate(model, data, method="max", progress=False)
    assert torch.equal(model.zero.weight_quantizer.amax.reshape(-1), torch.full((4,), ZERO_AMAX))
    assert float(model.head.input_quantizer.amax) == ZERO_AMAX
    warned = _warnings(caplog, "saw only zeros")
    assert len(warned) == 1
    assert _zero_names(warned[0]) == ["zero.weight_quantizer", "head.input_quantizer"]
    x = data[0]
    with torch.no_grad():
        fq = model(x)
    # head sees exact zeros, so the output is head's bias, exactly (fake quant keeps zeros exact).
    expected = model.head.bias.detach().reshape(1, -1, 1, 1).expand_as(fq)
    assert torch.equal(fq, expected)
    out = _export_and_check(model, x, tmp_path / "zero.onnx")
    np.testing.assert_allclose(out, fq.numpy(), rtol=0, atol=1e-6)


def test_half_zero_per_channel_weight_closed_form(caplog, tmp_path):
    conv = nn.Conv2d(2, 4, 1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[2] = torch.tensor([0.5, -1.5]).reshape(2, 1, 1)  # amax 1.5
        conv.weight[3] = torch.tensor([0.25, 0.125]).reshape(2, 1, 1)  # amax 0.25
    model = trtquant.quantize(nn.Sequential(conv))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trtquant.calibrate(model, [torch.randn(2, 2, 8, 8)], method="max", progress=False)
    wq = model[0].weight_quantizer
    assert torch.equal(wq.amax.reshape(-1), torch.tensor([ZERO_AMAX, ZERO_AMAX, 1.5, 0.25]))
    warned = _warnings(caplog, "saw only zeros")
    assert len(warned) == 1 and _zero_names(warned[0]) == ["0.weight_quantizer (2 of 4 channels)"]
    w = wq(conv.weight.detach())
    assert torch.equal(w[:2], torch.zeros_like(w[:2]))  # dead channels: codes 0, values exactly 0
    # Live channels keep their closed-form amax: 0.5 -> code round(0.5 * 127 / 1.5) = 42, -1.5 -> -127.
    assert torch.equal(w[2].reshape(-1), torch.tensor([42.0, -127.0]) * (torch.tensor(1.5) / 127))
    scale, _, axis = wq.export_constants()
    assert axis == 0 and torch.equal(scale, torch.tensor([ZERO_AMAX, ZERO_AMAX, 1.5, 0.25]) / 127)
    x = torch.randn(1, 2, 8, 8)
    with torch.no_grad():
        fq = model(x)
    np.testing.assert_allclose(_export_and_check(model, x, tmp_path / "half.onnx"), fq.numpy(), rtol=0, atol=1e-6)


class SizeGated(nn.Module):
    """``big`` runs only for inputs wider than 32: 16x16 calibration data never reaches it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.big = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        if x.shape[-1] > 32:
            y = self.big(y)
        return self.fc(y.mean(dim=(2, 3)))


def test_branch_that_never_runs_is_disabled_by_default_and_an_error_when_strict(caplog, tmp_path):
    data = [torch.randn(2, 3, 16, 16)]
    with pytest.raises(CalibrationError, match=r"2 quantizer\(s\) saw no data.*big\.input_quantizer, big\.weight_quantizer"):
        trtquant.calibrate(trtquant.quantize(SizeGated()), data, method="max", progress=False, strict=True)
    model = trtquant.quantize(SizeGated())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trtquant.calibrate(model, data, method="max", progress=False)
    warned = _warnings(caplog, "saw no data")
    assert len(warned) == 1 and "big.input_quantizer, big.weight_quantizer" in warned[0]
    assert not model.big.input_quantizer.is_enabled and not model.big.weight_quantizer.is_enabled
    assert model.conv.input_quantizer.is_enabled and model.conv.input_quantizer.amax is not None
    # The big path now runs in float instead of failing on a missing amax.
    wide = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        fq = model(wide)
    np.testing.assert_allclose(_export_and_check(model, wide, tmp_path / "gated.onnx"), fq.numpy(), rtol=1e-4, atol=1e-5)


def test_resnet18_zero_init_residual_calibrates_exports_and_runs(caplog, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.set_num_threads(1)
    model = trtquant.quantize(torchvision.models.resnet18(zero_init_residual=True, num_classes=10).eval())
    data = [torch.randn(2, 3, 64, 64) for _ in range(2)]
    branch = [f"layer{i}.{j}.residual_branch_quantizer" for i in range(1, 5) for j in range(2)]
    for method in ("max", "entropy"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            trtquant.calibrate(model, data, method=method, progress=False)
        warned = _warnings(caplog, "saw only zeros")
        assert len(warned) == 1, warned
        qs = trtquant.quantizers(model)
        # Each block's residual branch (bn2.weight = 0) is exactly zero; placement quantizes it.
        zero_named = _zero_names(warned[0])
        assert zero_named == branch and warned[0].startswith(f"{len(branch)} quantizer(s)")
        for n in zero_named:
            assert torch.all(qs[n].amax == ZERO_AMAX), n
        out = _export_and_check(model, data[0], tmp_path / f"resnet18_{method}.onnx")
        assert out.shape == (2, 10) and np.isfinite(out).all()


@pytest.mark.parametrize("method", ["max", "percentile", "mse", "entropy"])
def test_all_zero_histogram_gives_zero_amax_then_the_floor(method):
    from trtquant.calib.histogram import HistogramCalibrator
    from trtquant.descriptor import QuantDescriptor
    from trtquant.quantizer import TensorQuantizer

    cal = HistogramCalibrator()
    cal.collect(torch.zeros(4, 8))
    cal.collect(-torch.zeros(3))
    # Without the all-zero rule the bins answer 2^-111 (~3.9e-34): scale 0 once written in fp16.
    assert float(cal.compute_amax(method)) == 0.0
    q = TensorQuantizer(QuantDescriptor(calib_method="histogram"))
    q._calibrator.collect(torch.zeros(2, 2))
    assert q.apply_calib_amax(method) == "all values" and float(q.amax) == ZERO_AMAX
