"""pytorch-quantization's extra layers and helpers: Clip, QuantInstanceNorm, QuantLSTM/LSTMCell,
calibrate_weights, descriptor YAML, HistogramCalibrator keywords, enable_onnx_export."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

import trtquant
from trtquant import QuantDescriptor, calib
from trtquant.functional import fake_quant
from trtquant.nn import Clip, QuantInstanceNorm2d, QuantLSTM, QuantLSTMCell
from trtquant.nn.functional import clip


def test_clip_function_pact_gradients():
    x = torch.tensor([-2.0, 0.5, 2.0, 1.0], requires_grad=True)
    lo = torch.tensor(-1.0, requires_grad=True)
    hi = torch.tensor(1.0, requires_grad=True)
    out = clip(x, lo, hi)
    assert out.tolist() == [-1.0, 0.5, 1.0, 1.0]
    out.backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert x.grad.tolist() == [0.0, 2.0, 0.0, 0.0]  # strictly inside only
    assert float(lo.grad) == 1.0 and float(hi.grad) == 7.0  # the clipped values' gradients
    with pytest.raises(ValueError, match="can only be scalar"):
        clip(x, torch.full((4,), -1.0, requires_grad=True), hi).sum().backward()


def test_clip_module_bounds():
    assert Clip(-0.5, 0.25)(torch.tensor([-1.0, 0.125, 1.0])).tolist() == [-0.5, 0.125, 0.25]
    learned = Clip(-1.0, 1.0, learn_min=True, learn_max=True)
    assert isinstance(learned.clip_value_max, nn.Parameter)
    with pytest.raises(ValueError, match="must be scalar"):
        Clip(torch.tensor(0.3), torch.tensor(0.7), learn_min=True)


def test_quant_instancenorm_quantizes_its_input():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    layer = QuantInstanceNorm2d(3, affine=True, quant_desc_input=QuantDescriptor(amax=1.0))
    ref = nn.InstanceNorm2d(3, affine=True)
    ref.load_state_dict({k: v for k, v in layer.state_dict().items() if "quantizer" not in k})
    assert torch.allclose(layer(x), ref(fake_quant(x, torch.tensor(1.0))), atol=1e-6)
    layer.input_quantizer.disable()
    assert torch.allclose(layer(x), ref(x), atol=1e-6)
    with pytest.raises(TypeError, match="Unused keys"):
        QuantInstanceNorm2d(3, oops=1)


def _lstm_reference_step(x, h, c, w_ih, w_hh, b, amax_in, amax_w):
    xh = fake_quant(torch.cat([x, h], 1), torch.tensor(amax_in))
    w = fake_quant(torch.cat([w_ih, w_hh], 1), torch.tensor(amax_w))
    x_q, h_q = xh.split([x.shape[1], h.shape[1]], 1)
    w_ih_q, w_hh_q = w.split([w_ih.shape[1], w_hh.shape[1]], 1)
    i, f, g, o = (x_q @ w_ih_q.T + h_q @ w_hh_q.T + b).chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def test_quant_lstm_cell_fuses_input_hidden_and_weights():
    torch.manual_seed(0)
    cell = QuantLSTMCell(3, 2, quant_desc_input=QuantDescriptor(amax=2.0), quant_desc_weight=QuantDescriptor(amax=0.5))
    x, h, c = torch.randn(4, 3), torch.randn(4, 2), torch.randn(4, 2)
    h1, c1 = cell(x, (h, c))
    rh, rc = _lstm_reference_step(x, h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih + cell.bias_hh, 2.0, 0.5)
    assert torch.allclose(h1, rh, atol=1e-6) and torch.allclose(c1, rc, atol=1e-6)


@pytest.mark.parametrize("bidirectional, batch_first", [(False, False), (True, True)])
def test_quant_lstm_without_quantization_is_nn_lstm(bidirectional, batch_first):
    torch.manual_seed(0)
    q = QuantLSTM(3, 4, num_layers=2, bidirectional=bidirectional, batch_first=batch_first)
    ref = nn.LSTM(3, 4, num_layers=2, bidirectional=bidirectional, batch_first=batch_first)
    ref.load_state_dict(q.state_dict())
    for quantizer in [*q.input_quantizers, *q.weight_quantizers]:
        quantizer.disable()
    assert len(q.input_quantizers) == 4 if bidirectional else 2
    x = torch.randn(5, 6, 3)
    out, (hn, cn) = q(x)
    rout, (rhn, rcn) = ref(x)
    assert torch.allclose(out, rout, atol=1e-6) and torch.allclose(hn, rhn, atol=1e-6)
    assert torch.allclose(cn, rcn, atol=1e-6)


def test_quant_lstm_one_step_matches_the_fused_reference():
    torch.manual_seed(1)
    q = QuantLSTM(3, 2, quant_desc_input=QuantDescriptor(amax=2.0), quant_desc_weight=QuantDescriptor(amax=0.5))
    x, h0, c0 = torch.randn(1, 4, 3), torch.randn(1, 4, 2), torch.randn(1, 4, 2)
    out, (hn, cn) = q(x, (h0, c0))
    rh, rc = _lstm_reference_step(x[0], h0[0], c0[0], q.weight_ih_l0, q.weight_hh_l0, q.bias_ih_l0 + q.bias_hh_l0,
                                  2.0, 0.5)
    assert torch.allclose(out[0], rh, atol=1e-6) and torch.allclose(cn[0], rc, atol=1e-6)


def test_calibrate_weights_per_channel_and_per_tensor():
    torch.manual_seed(0)
    model = nn.Sequential(trtquant.nn.QuantConv2d(2, 3, 3), trtquant.nn.QuantConvTranspose2d(3, 2, 3))
    calib.calibrate_weights(model, method="max")
    w0, w1 = model[0].weight.detach(), model[1].weight.detach()
    assert torch.equal(model[0].weight_quantizer.amax, w0.abs().amax((1, 2, 3), keepdim=True))
    assert torch.equal(model[1].weight_quantizer.amax, w1.abs().amax((0, 2, 3), keepdim=True))  # axis 1
    calib.calibrate_weights(model, method="percentile", perchannel=False, percentile=100)
    assert float(model[0].weight_quantizer.amax) == pytest.approx(float(w0.abs().max()), rel=1e-3)
    with pytest.raises(TypeError, match="Unsupported calibration method 'entropy'"):
        calib.calibrate_weights(model, method="entropy")


def test_histogram_calibrator_takes_the_original_keywords():
    c = calib.HistogramCalibrator(8, None, False, num_bins=19, torch_hist=False, grow_method="stretch")
    c.collect(torch.tensor([0.5, 3.0]))
    assert c._calib_hist.sum() == 2 and c._calib_bin_edges.numel() == 20 and float(c._calib_bin_edges[-1]) == 4.0


def test_descriptor_yaml_dict_and_keyword_errors():
    d = QuantDescriptor(num_bits=2, name="a", axis=(1, 2), amax=[0.5, 1.5], unsigned=True)
    assert QuantDescriptor.from_yaml(d.to_yaml()) == d
    assert QuantDescriptor(**d.dict()) == d
    assert "num_bits: 2" in d.to_yaml() and "narrow_range" not in d.to_yaml()  # defaults left out
    with pytest.raises(TypeError, match="Unused keys"):
        QuantDescriptor(bits=8)
    with pytest.raises(TypeError, match="must be float, list or ndarray"):
        QuantDescriptor(amax="oops")
    np.testing.assert_array_equal(d.amax, np.float32([0.5, 1.5]))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_enable_onnx_export_writes_int8_qdq_that_onnxruntime_runs_identically():
    import onnx

    torch.manual_seed(0)
    model = nn.Sequential(trtquant.nn.QuantLinear(4, 2, quant_desc_input=QuantDescriptor(amax=2.54),
                                                  quant_desc_weight=QuantDescriptor(amax=1.27))).eval()
    with torch.no_grad():
        model(torch.randn(3, 4))  # fills the layer's quantized-weight cache: export must not reuse it
    f = io.BytesIO()
    with trtquant.enable_onnx_export():
        torch.onnx.export(model, torch.randn(3, 4), f, opset_version=17, dynamo=False, input_names=["x"])
    graph = onnx.load_from_string(f.getvalue()).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 2
    import onnxruntime as ort

    x = torch.randn(3, 4)
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert np.allclose(got, model(x).numpy(), atol=1e-6)  # the same Q/DQ as the fake-quant model
    assert not trtquant.TensorQuantizer._enable_onnx_export


def test_quant_instancenorm_exports_qdq_in_front_of_instancenormalization(tmp_path):
    import onnx

    from trtquant.export import export_onnx

    model = nn.Sequential(QuantInstanceNorm2d(3, affine=True, quant_desc_input=QuantDescriptor(amax=2.0))).eval()
    export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "norm.onnx", exporter="legacy")
    graph = onnx.load(str(tmp_path / "norm.onnx")).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    norm = next(n for n in graph.node if n.op_type == "InstanceNormalization")
    assert producer[norm.input[0]] == "DequantizeLinear"
