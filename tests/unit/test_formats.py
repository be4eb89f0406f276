"""FP8 E4M3 and blocked INT4 export for TensorRT: numerics, ONNX form, ONNX Runtime parity, checker rules.

Every comparison here is exact: FP8 fake quant against ONNX Runtime's float8 QuantizeLinear on the
same float input (teacher-forced), INT4 fake-quant weights against ONNX Runtime's blocked
DequantizeLinear, element by element.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper, numpy_helper
from torch import nn

import trtquant
from trtquant import QuantDescriptor
from trtquant.config import FP8_DEFAULT, FP8_E4M3, QuantConfig, int4_weight_only
from trtquant.errors import ExportError
from trtquant.export import check_onnx, export_onnx
from trtquant.export.parity import fp8_ordinals, teacher_forced, weight_parity
from trtquant.functional import fake_fp8

ort = pytest.importorskip("onnxruntime")


class MLP(nn.Module):
    def __init__(self, k: int = 256, h: int = 512):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(k, h), nn.Linear(h, k), nn.Linear(k, 8)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        y = torch.relu(self.conv2(y)) + y
        return self.fc(y.mean((2, 3)))


def _ort(path, level="ORT_DISABLE_ALL", optimized=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if optimized:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _calibrated(model, config, x):
    torch.manual_seed(0)
    q = trtquant.quantize(model, config=config)
    trtquant.calibrate(q, [x], method="max", progress=False)
    return q.eval()


# -- FP8 ---------------------------------------------------------------------------------------------

def test_fp8_fake_quant_is_the_export_op_bit_for_bit():
    """Fake quant divides by the float32 scale amax/448 and casts with saturation, as the export op (and
    TensorRT's castToFp8(clip(x / s))) does: identical on values that include saturation and ties."""
    from trtquant.export.qdq_op import qdq_fp8

    torch.manual_seed(0)
    x = torch.randn(4096) * 5
    x[:4] = torch.tensor([1e4, -1e4, 0.0, 2.0 ** -12])
    amax = torch.tensor(7.3)
    scale = amax / 448.0
    assert torch.equal(fake_fp8(x, amax), qdq_fp8(x, scale))
    assert fake_fp8(x, amax).abs().max().item() == pytest.approx(7.3, rel=1e-6)  # saturates at amax
    values = torch.unique(fake_fp8(x, amax) / scale)
    assert values.numel() <= 253 and torch.equal(values, values.to(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_fp8_export_matches_onnx_runtime_exactly(tmp_path, exporter):
    x = torch.randn(4, 3, 16, 16)
    q = _calibrated(ConvNet(), FP8_DEFAULT, x)
    path = tmp_path / "fp8.onnx"
    r = export_onnx(q, x, path, exporter=exporter)
    assert r.opset >= 19
    m = onnx.load(str(path))
    zps = [m.graph.initializer[[i.name for i in m.graph.initializer].index(n.input[2])]
           for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert zps and all(z.data_type == TP.FLOAT8E4M3FN for z in zps)
    assert not any(n.domain == "trtquant" for n in m.graph.node)
    report = teacher_forced(q, path, x)
    assert report.codes > 0 and report.mismatched == 0, report.format_table()
    assert all(n.matched_by in ("name", "best fit") and n.quantizer for n in report.nodes)
    out = _ort(path).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(out, q(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    check = check_onnx(str(path), target="trt10")
    assert not check.errors, check.format_table()
    assert any(f.rule == "A6-fp8-fp32-graph" for f in check.findings)  # FP8 wants an FP16 graph


def test_fp8_fp16_graph_passes_the_checker_and_stays_exact(tmp_path):
    x = torch.randn(2, 3, 16, 16)
    q = _calibrated(ConvNet(), FP8_DEFAULT, x)
    path = tmp_path / "fp8_fp16.onnx"
    export_onnx(q, x, path, dtype="fp16", exporter="legacy")
    check = check_onnx(str(path), target="trt11")
    assert not check.errors, check.format_table()
    assert not any(f.rule in ("A6-fp8-fp32-graph", "B17-fp8-scale", "C28-fp8-mixed") for f in check.findings)
    report = teacher_forced(copy.deepcopy(q).half(), path, x.half())
    assert report.mismatched == 0, report.format_table()


def test_fp8_ordinals_count_fp8_steps():
    v = torch.tensor([0.0, -0.0, 448.0, -448.0, 2.0 ** -9, 1.0, 1.125]).to(torch.float8_e4m3fn)
    o = fp8_ordinals(v)
    assert o[0] == o[1] == 0 and o[2] == -o[3] == 126 and o[4] == 1 and o[6] - o[5] == 1
    assert torch.equal(fp8_ordinals(v.view(torch.uint8).numpy()), o)  # ONNX Runtime's uint8 bit patterns


def test_fp8_formats_tensorrt_cannot_take_are_refused_by_name(tmp_path):
    x = torch.randn(2, 256)
    for weight in (QuantDescriptor(num_bits=(4, 3), axis=0), QuantDescriptor(num_bits=(5, 2))):
        q = _calibrated(MLP(), QuantConfig(input=FP8_E4M3, weight=weight), x)
        with pytest.raises(ExportError, match=r"a\.weight_quantizer.*TensorRT accepts INT8.*FP8 E4M3"):
            export_onnx(q, x, tmp_path / "bad.onnx")


def test_fp8_with_ort_target_is_refused():
    x = torch.randn(2, 256)
    q = _calibrated(MLP(), FP8_DEFAULT, x)
    with pytest.raises(ValueError, match="target='tensorrt'"):
        export_onnx(q, x, "/nonexistent/x.onnx", target="onnxruntime")


# -- INT4 blocks -------------------------------------------------------------------------------------

def test_int4_block_fake_quant_closed_form():
    """One amax per (row, block of 32): codes in [-8, 7], round half to even, amax = the block's max |w|."""
    torch.manual_seed(0)
    w = torch.randn(6, 96)
    q = trtquant.TensorQuantizer(QuantDescriptor(num_bits=4, block_size=32))
    q.enable_calib()
    q.disable_quant()
    q(w)
    q.load_calib_amax()
    q.disable_calib()
    q.enable_quant()
    amax = w.abs().reshape(6, 3, 32).amax(-1, keepdim=True)
    assert torch.equal(q.amax.reshape(6, 3, 1), amax)
    scale = amax / 7
    expect = (torch.round(w.reshape(6, 3, 32) / scale).clamp(-8, 7) * scale).reshape(6, 96)
    assert torch.equal(q(w), expect)
    codes = torch.round(q(w).reshape(6, 3, 32) / scale)
    assert codes.min() >= -8 and codes.max() <= 7 and len(torch.unique(codes)) > 8


def test_int4_block_size_must_divide_the_row():
    q = trtquant.TensorQuantizer(QuantDescriptor(num_bits=4, block_size=128))
    q.amax = torch.ones(4, 1, 1)
    with pytest.raises(ValueError, match="block_size=128.*shape \\(4, 96\\)"):
        q(torch.randn(4, 96))
    with pytest.raises(ValueError, match="calib_method='max'"):
        QuantDescriptor(num_bits=4, block_size=64, calib_method="histogram")
    with pytest.raises(ValueError, match="FP8 quantizes per tensor"):
        QuantDescriptor(num_bits=(4, 3), block_size=64)
    assert "block_size" not in QuantDescriptor(num_bits=8).dict()  # unblocked dicts unchanged
    d = QuantDescriptor(num_bits=4, block_size=64)
    assert QuantDescriptor.from_dict(d.dict()) == d and d.axis == (0,)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_int4_weight_only_export_is_exact_and_runs_matmulnbits(tmp_path, exporter, dtype):
    x = torch.randn(3, 8, 256)
    q = _calibrated(MLP(), int4_weight_only(["a", "b"], block_size=128), x)
    assert not q.a.input_quantizer.is_enabled and q.c.input_quantizer.is_enabled  # a, b weight-only; c INT8
    path = tmp_path / "int4.onnx"
    r = export_onnx(q, x, path, exporter=exporter, dtype=dtype)
    assert r.opset >= 21
    m = onnx.load(str(path))
    dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and any(a.name == "block_size" for a in n.attribute)]
    assert len(dqs) == 2
    inits = {i.name: i for i in m.graph.initializer}
    for dq in dqs:
        assert inits[dq.input[0]].data_type == TP.INT4 and inits[dq.input[2]].data_type == TP.INT4
        assert helper.get_attribute_value(next(a for a in dq.attribute if a.name == "axis")) == 0  # [K, N]
        assert [n.op_type for n in m.graph.node if dq.output[0] in n.input] == ["MatMul"]
    ref = q if dtype == "fp32" else copy.deepcopy(q).half()
    wp = weight_parity(ref, path)
    assert [w.quantizer for w in wp] == ["a.weight_quantizer", "b.weight_quantizer"]
    assert all(w.mismatched == 0 for w in wp), wp
    opt = tmp_path / "opt.onnx"
    feed = x.numpy() if dtype == "fp32" else x.half().numpy()
    out = _ort(path, "ORT_ENABLE_ALL", opt).run(None, {"input": feed})[0]
    assert sum(n.op_type == "MatMulNBits" for n in onnx.load(str(opt)).graph.node) == 2  # ORT's 4-bit kernel
    want = ref(x if dtype == "fp32" else x.half()).detach().float().numpy()
    assert np.abs(out.astype(np.float32) - want).max() <= 0.05 * np.abs(want).max()
    check = check_onnx(str(path), target="trt11")
    assert not check.errors, check.format_table()
    assert not any(f.rule == "C17-partial-quant" for f in check.findings)  # INT4 is weight-only by design
    assert any(f.rule == "A2-opset" for f in check_onnx(str(path), target="trt10").errors)


def test_int4_block_of_32_exports_for_onnx_runtime_but_the_checker_flags_it(tmp_path):
    x = torch.randn(2, 256)
    q = _calibrated(MLP(), int4_weight_only("a", block_size=32), x)
    path = tmp_path / "b32.onnx"
    export_onnx(q, x, path, exporter="legacy")
    assert all(w.mismatched == 0 for w in weight_parity(q, path))
    errs = [f for f in check_onnx(str(path), target="trt11").errors if f.rule == "B14-int4"]
    assert len(errs) == 1 and "64 and 128" in errs[0].message


def test_mixed_recipe_int4_fp8_by_glob(tmp_path):
    """INT4 weight-only on 'a', FP8 elsewhere: each layer gets its format, the graph is exact on both."""
    x = torch.randn(2, 8, 256)
    q = _calibrated(MLP(), int4_weight_only("a", base=FP8_DEFAULT), x)
    fmts = {n: m.quant_desc.format_name for n, m in q.named_modules() if n.endswith("quantizer") and m.is_enabled}
    assert fmts == {"a.weight_quantizer": "int4", "b.input_quantizer": "e4m3", "b.weight_quantizer": "e4m3",
                    "c.input_quantizer": "e4m3", "c.weight_quantizer": "e4m3"}
    path = tmp_path / "mixed.onnx"
    export_onnx(q, x, path, exporter="legacy", dtype="fp16")
    h = copy.deepcopy(q).half()
    assert teacher_forced(h, path, x.half()).mismatched == 0
    assert all(w.mismatched == 0 for w in weight_parity(h, path))
    check = check_onnx(str(path), target="trt11")
    assert not check.errors, check.format_table()


# -- checker rules on minimal graphs -------------------------------------------------------------------

def _graph(nodes, inits, opset=19, dtype=TP.FLOAT16, out=(4, 64)):
    x = helper.make_tensor_value_info("x", dtype, [4, 64])
    y = helper.make_tensor_value_info("y", dtype, list(out))
    g = helper.make_graph(nodes, "g", [x], [y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _qdq(x, name, dtype, scale, axis=None):
    zp = helper.make_tensor(f"{name}_zp", dtype, list(np.shape(scale)), [0] * int(np.size(scale)))
    s = numpy_helper.from_array(np.asarray(scale, np.float16), f"{name}_s")
    kw = {} if axis is None else {"axis": axis}
    return ([helper.make_node("QuantizeLinear", [x, s.name, zp.name], [f"{name}_q"], name=f"{name}_Q", **kw),
             helper.make_node("DequantizeLinear", [f"{name}_q", s.name, zp.name], [f"{name}_dq"], name=f"{name}_DQ", **kw)],
            [s, zp])


def _check(model, tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(model, str(p))
    return check_onnx(str(p), target="trt10")


def test_c28_fp8_with_int8_weight_is_an_error(tmp_path):
    w = numpy_helper.from_array(np.random.randn(64, 32).astype(np.float16), "w")  # y: (4, 32)
    n1, i1 = _qdq("x", "a", TP.FLOAT8E4M3FN, 0.01)
    n2, i2 = _qdq("w", "wq", TP.INT8, 0.01)
    m = _graph(n1 + n2 + [helper.make_node("MatMul", ["a_dq", "wq_dq"], ["y"], name="mm")], [w] + i1 + i2, out=(4, 32))
    rules = {f.rule for f in _check(m, tmp_path).errors}
    assert "C28-fp8-mixed" in rules


def test_c28_fp8_before_a_non_gemm_op_is_a_float_round_trip(tmp_path):
    n1, i1 = _qdq("x", "a", TP.FLOAT8E4M3FN, 0.01)
    m = _graph(n1 + [helper.make_node("Sigmoid", ["a_dq"], ["y"], name="sig")], i1)
    found = [f for f in _check(m, tmp_path).findings if f.rule == "C28-fp8-fusion"]
    assert found and "sig" in found[0].nodes


def test_b17_fp8_per_channel_activation_is_an_error(tmp_path):
    n1, i1 = _qdq("x", "a", TP.FLOAT8E4M3FN, np.full(64, 0.01), axis=1)
    m = _graph(n1 + [helper.make_node("Relu", ["a_dq"], ["y"])], i1)
    assert any(f.rule == "B17-fp8-scale" for f in _check(m, tmp_path).errors)


def test_clip_weight_amax_never_increases_the_block_error():
    """The search starts at the max amax (ratio 1): every block's squared error is at most RTN's, amax only
    shrinks, and some blocks do get a smaller amax (a lone 8.0 outlier keeps its block's)."""
    from trtquant.ptq import clip_weight_amax

    torch.manual_seed(0)
    lin = nn.Linear(128, 4)
    with torch.no_grad():
        lin.weight[0, 5] = 8.0  # an outlier in row 0, block 0
    q = _calibrated(nn.Sequential(lin), int4_weight_only("0", block_size=64), torch.randn(2, 128))
    wq, w = q[0].weight_quantizer, q[0].weight.detach()
    before_amax = wq.amax.clone()
    err_before = (wq(w) - w).pow(2).reshape(4, 2, 64).sum(-1)
    gains = clip_weight_amax(q)
    err_after = (wq(w) - w).pow(2).reshape(4, 2, 64).sum(-1)
    assert (err_after <= err_before + 1e-7).all() and (wq.amax <= before_amax).all()
    assert gains["0.weight_quantizer"] > 0 and (wq.amax < before_amax).sum() >= 1
    assert wq.amax.reshape(4, 2)[0, 0] == 8.0  # clipping the outlier costs more than it saves


@pytest.mark.parametrize("name", ["vit", "hf_sdpa"])
def test_fp8_attention_bmms_are_placed_fusable_and_exact(tmp_path, name):
    """FP8 placement on a transformer: every Linear and both attention matmuls (Q, K, softmax, V quantizers) in
    FP8; the graph has every attention block C27-fusable, no errors, and ONNX Runtime is exact."""
    from tests._transformers import small_models
    from trtquant.nn.attention import BMM_QUANTIZERS

    make, inp, blocks = small_models()[name]
    torch.manual_seed(0)
    x = inp()
    q = _calibrated(make().eval(), FP8_DEFAULT, x)
    bmm = [m for n, m in q.named_modules() if n.rsplit(".", 1)[-1] in BMM_QUANTIZERS]
    assert len(bmm) == 4 * blocks and all(m.quant_desc.is_fp8 for m in bmm)
    path = tmp_path / f"{name}_fp8.onnx"
    export_onnx(q, x, path, exporter="legacy", dtype="fp16")
    check = check_onnx(str(path), target="trt10")
    assert not check.errors, check.format_table()
    assert sum(f.rule == "C27-attention-fusable" for f in check.findings) == blocks, check.format_table()
    report = teacher_forced(copy.deepcopy(q).half(), path, x.half())
    assert report.mismatched == 0, report.format_table()
