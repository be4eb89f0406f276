"""check_onnx: one correct model per pattern, one broken variant per checklist rule.

:data:`BROKEN` maps every rule id the checker declares to a broken model that triggers it;
``test_every_declared_rule_id_has_a_broken_model`` keeps the two in step.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from trtquant.export.checker import RULE_IDS, RULES, VALIDATION_IDS, CheckReport, Finding, check_onnx, rule_ids
from trtquant.export.checker import run as checker_run

OPSET = 17
C = 16  # channels of the ResNet-style block


class Builder:
    """A few lines of onnx.helper per layer; every node is named after its role."""

    def __init__(self, seed: int = 0) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)

    def init(self, name: str, value: np.ndarray | np.generic) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [f"{name}_out"], name=name, **attrs))
        return f"{name}_out"

    def qdq(self, x: str, name: str, scale: float | np.ndarray, *, zp: object = 0, zp_dtype: type = np.int8,
            axis: int | None = None, scale_input: str | None = None) -> str:
        s = scale_input or self.init(f"{name}_scale", np.asarray(scale, np.float32))
        shape = np.shape(scale) if scale_input is None else ()
        z = self.init(f"{name}_zp", np.full(shape, zp, dtype=zp_dtype))
        kw = {} if axis is None else {"axis": axis}
        q = self.node("QuantizeLinear", [x, s, z], f"{name}_q", **kw)
        return self.node("DequantizeLinear", [q, s, z], f"{name}_dq", **kw)

    def weight(self, name: str, shape: tuple[int, ...], axis: int | None = 0, scale_axis: int = 0) -> str:
        w = self.rng.standard_normal(shape).astype(np.float32) * 0.1
        amax = np.abs(w).max(axis=tuple(d for d in range(w.ndim) if d != scale_axis))
        return self.qdq(self.init(name, w), name, amax / 127, axis=axis)

    def conv(self, x: str, name: str, cin: int = C, cout: int = C, *, w_axis: int | None = 0,
             w_scale_axis: int = 0, bias: str | None = None) -> str:
        w = self.weight(f"{name}_w", (cout, cin, 3, 3), axis=w_axis, scale_axis=w_scale_axis)
        inputs = [x, w]
        if bias == "float":
            inputs.append(self.init(f"{name}_b", np.zeros(cout, np.float32)))
        elif bias == "int32":
            b = self.init(f"{name}_b", np.arange(cout, dtype=np.int32))
            s = self.init(f"{name}_b_scale", np.full(cout, 1e-4, np.float32))
            z = self.init(f"{name}_b_zp", np.zeros(cout, np.int32))
            inputs.append(self.node("DequantizeLinear", [b, s, z], f"{name}_b_dq", axis=0))
        return self.node("Conv", inputs, name, kernel_shape=[3, 3], pads=[1, 1, 1, 1])

    def bn(self, x: str, name: str, c: int = C) -> str:
        params = [self.init(f"{name}_{p}", np.full(c, v, np.float32))
                  for p, v in (("gamma", 1.0), ("beta", 0.0), ("mean", 0.0), ("var", 1.0))]
        return self.node("BatchNormalization", [x, *params], name)

    def model(self, inputs: dict[str, list[int | str]], outputs: dict[str, list[int | str]], opset: int = OPSET,
              elem: int = TensorProto.FLOAT) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "g", [helper.make_tensor_value_info(n, elem, s) for n, s in inputs.items()],
            [helper.make_tensor_value_info(n, elem, s) for n, s in outputs.items()], self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def resnet_block(*, skip_q: bool = True, branch_q: bool = False, x_scale: float = 0.05, x_zp: int = 0,
                 x_zp_dtype: type = np.int8, x_axis: int | None = None, w_axis: int | None = 0,
                 w_scale_axis: int = 0, act_qdq: str | None = None, bias: str | None = None,
                 downsample: bool = False, opset: int = OPSET, batch: int | str = 1) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv -> BN -> Relu -> Q/DQ -> Conv -> BN -> Add(., skip) -> Relu (correct by default)."""
    b = Builder()
    scale = np.full(C, x_scale, np.float32) if x_axis is not None else x_scale
    xq = b.qdq("x", "x", scale, zp=x_zp, zp_dtype=x_zp_dtype, axis=x_axis)
    c1 = b.conv(xq, "conv1", w_axis=w_axis, w_scale_axis=w_scale_axis, bias=bias)
    if act_qdq == "conv":  # Conv -> Q -> DQ -> BN
        c1 = b.qdq(c1, "conv1_out", 0.07)
    bn1 = b.bn(c1, "bn1")
    if act_qdq == "bn":  # Conv -> BN -> Q -> DQ -> Relu
        bn1 = b.qdq(bn1, "bn1_out", 0.07)
    r1 = b.qdq(b.node("Relu", [bn1], "relu1"), "relu1", 0.04)
    bn2 = b.bn(b.conv(r1, "conv2"), "bn2")
    branch = b.qdq(bn2, "bn2", 0.06) if branch_q else bn2
    if downsample:  # skip = x -> Q/DQ -> Conv -> BN -> Q/DQ (the shorter path: the identity input)
        skip = b.qdq(b.bn(b.conv(xq, "down"), "down_bn"), "down_bn", 0.05)
    else:
        skip = xq if skip_q else "x"
    out = b.node("Relu", [b.node("Add", [branch, skip], "add")], "relu_out")
    return b.model({"x": [batch, C, 8, 8]}, {out: [batch, C, 8, 8]}, opset=opset)


def gemm_model(*, trans_b: int = 1, axis: int = 0, batch: int = 4) -> onnx.ModelProto:
    """x[batch,32] -> Q/DQ -> Gemm(W per-row, float bias) -> y[batch,16]."""
    b = Builder()
    xq = b.qdq("x", "x", 0.05)
    w_shape = (16, 32) if trans_b else (32, 16)
    w = b.weight("fc_w", w_shape, axis=axis, scale_axis=axis)
    bias = b.init("fc_b", np.zeros(16, np.float32))
    y = b.node("Gemm", [xq, w, bias], "fc", transB=trans_b)
    return b.model({"x": [batch, 32]}, {y: [batch, 16]})


def concat_model(scales: tuple[float, float] = (0.05, 0.05), quantize_b: bool = True) -> onnx.ModelProto:
    b = Builder()
    a = b.qdq("a", "a", scales[0])
    bb = b.qdq("b", "b", scales[1]) if quantize_b else "b"
    y = b.node("Concat", [a, bb], "concat", axis=1)
    return b.model({"a": [1, 8, 4, 4], "b": [1, 8, 4, 4]}, {y: [1, 16, 4, 4]})


def no_qdq_model() -> onnx.ModelProto:
    b = Builder()
    w = b.init("w", np.ones((C, C, 3, 3), np.float32))
    y = b.node("Conv", ["x", w], "conv", kernel_shape=[3, 3])
    return b.model({"x": [1, C, 8, 8]}, {y: [1, C, 6, 6]})


def dangling_input_model() -> onnx.ModelProto:
    """A node reads a tensor nothing defines: onnx.checker fails."""
    model = resnet_block()
    model.graph.node[3].input[0] = "undefined_tensor"
    return model


def shape_mismatch_model() -> onnx.ModelProto:
    """Add of [1,3] and [1,4]: strict shape inference fails."""
    b = Builder()
    y = b.node("Add", ["a", "b"], "add")
    return b.model({"a": [1, 3], "b": [1, 4]}, {y: [1, 4]})


def unknown_rank_model() -> onnx.ModelProto:
    """Reshape to a runtime shape of unknown length, then Q/DQ: the Q/DQ input has no rank."""
    b = Builder()
    r = b.qdq(b.node("Reshape", ["x", "shape"], "reshape"), "r", 0.05)
    y = b.node("Shape", [b.node("Relu", [r], "relu")], "shape_of")
    graph = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8]),
                                             helper.make_tensor_value_info("shape", TensorProto.INT64, ["k"])],
                              [helper.make_tensor_value_info(y, TensorProto.INT64, ["k"])], b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)


def qlinearconv_model() -> onnx.ModelProto:
    b = Builder()
    ins = ["x", b.init("xs", np.float32(0.1)), b.init("xz", np.uint8(128)),
           b.init("w", np.ones((4, 4, 1, 1), np.uint8)), b.init("ws", np.float32(0.1)), b.init("wz", np.uint8(0)),
           b.init("ys", np.float32(0.2)), b.init("yz", np.uint8(128))]
    y = b.node("QLinearConv", ins, "qconv")
    return b.model({"x": [1, 4, 8, 8]}, {y: [1, 4, 8, 8]}, elem=TensorProto.UINT8)


def trt_domain_model() -> onnx.ModelProto:
    b = Builder()
    b.nodes.append(helper.make_node("TRT_FP8QuantizeLinear", ["x", b.init("s", np.float32(0.1))], ["y"],
                                    name="fp8_q", domain="trt"))
    model = b.model({"x": [1, 4]}, {})
    model.graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]))
    model.opset_import.append(helper.make_opsetid("trt", 1))
    return model


def activation_qdq_model(x_shape: list[int | str], scale: float | np.ndarray = 0.05) -> onnx.ModelProto:
    """x -> Q/DQ -> Relu."""
    b = Builder()
    y = b.node("Relu", [b.qdq("x", "x", scale)], "relu")
    return b.model({"x": x_shape}, {y: x_shape})


def int4_odd_weight_model() -> onnx.ModelProto:
    """MatMul with an INT4 weight [16, 15]: the odd last dimension cannot be packed (opset 21 for INT4)."""
    b = Builder()
    b.inits.append(helper.make_tensor("w", TensorProto.INT4, [16, 15], [i % 15 - 7 for i in range(16 * 15)]))
    b.inits.append(helper.make_tensor("w_zp", TensorProto.INT4, [], [0]))
    w = b.node("DequantizeLinear", ["w", b.init("w_scale", np.float32(0.01)), "w_zp"], "w_dq")
    y = b.node("MatMul", [b.qdq("x", "x", 0.05), w], "mm")
    return b.model({"x": [4, 16]}, {y: [4, 15]}, opset=21)


def non_constant_scale_model() -> onnx.ModelProto:
    b = Builder()
    xq = b.qdq("x", "x", 0.0, scale_input="s")
    y = b.node("Relu", [xq], "relu")
    return b.model({"x": [1, 4], "s": []}, {y: [1, 4]})


def mismatched_pair_model() -> onnx.ModelProto:
    """The DQ of x reads another scale than its Q."""
    model = resnet_block()
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.07, np.float32), "x_scale_other"))
    next(n for n in model.graph.node if n.name == "x_dq").input[1] = "x_scale_other"
    return model


def twice_quantized_model() -> onnx.ModelProto:
    b = Builder()
    y1 = b.node("Relu", [b.qdq("x", "xa", 0.05)], "r1")
    y2 = b.node("Relu", [b.qdq("x", "xb", 0.06)], "r2")
    return b.model({"x": [1, 4]}, {y1: [1, 4], y2: [1, 4]})


def weight_only_conv_model() -> onnx.ModelProto:
    b = Builder()
    y = b.node("Conv", ["x", b.weight("w", (C, C, 3, 3))], "conv", kernel_shape=[3, 3])
    return b.model({"x": [1, C, 8, 8]}, {y: [1, C, 6, 6]})


def gemm_output_qdq_model() -> onnx.ModelProto:
    """Gemm -> Q/DQ -> Softmax: the output Q/DQ feeds nothing quantizable."""
    b = Builder()
    xq = b.qdq("x", "x", 0.05)
    y = b.qdq(b.node("Gemm", [xq, b.weight("w", (16, 32)), b.init("bias", np.zeros(16, np.float32))], "fc",
                     transB=1), "fc_out", 0.1)
    y = b.node("Softmax", [y], "softmax")
    return b.model({"x": [4, 32]}, {y: [4, 16]})


def wrapped_model(op: str, **attrs: Any) -> onnx.ModelProto:
    """x -> Q/DQ -> ``op`` -> Q/DQ -> Relu."""
    b = Builder()
    y = b.qdq(b.node(op, [b.qdq("x", "x", 0.05)], "pool", **attrs), "pool", 0.05)
    size = 7 if "kernel_shape" in attrs else 8
    return b.model({"x": [1, 4, 8, 8]}, {b.node("Relu", [y], "relu"): [1, 4, size, size]})


def softmax_model() -> onnx.ModelProto:
    """x -> Q/DQ -> Softmax: TensorRT runs Softmax in float."""
    b = Builder()
    y = b.node("Softmax", [b.qdq("x", "x", 0.05)], "softmax")
    return b.model({"x": [4, 16]}, {y: [4, 16]})


def attention_model(*, quant_v: bool = True, scale_after: bool = False) -> onnx.ModelProto:
    """q * s -> Q/DQ -> MatMul(., Q/DQ(kᵀ)) -> Softmax -> Q/DQ -> MatMul(., Q/DQ(v)): TensorRT's fusable INT8
    attention; ``quant_v=False`` leaves V float, ``scale_after`` scales the scores instead of Q."""
    b = Builder()
    s = b.init("attn_scale", np.asarray(0.35, np.float32))
    q = "q" if scale_after else b.node("Mul", ["q", s], "q_scale")
    scores = b.node("MatMul", [b.qdq(q, "q_bmm", 0.02), b.qdq("kt", "k_bmm", 0.02)], "qk")
    if scale_after:
        scores = b.node("Mul", [scores, s], "scores_scale")
    probs = b.node("Softmax", [scores], "softmax", axis=-1)
    v = b.qdq("v", "v_bmm", 0.02) if quant_v else "v"
    y = b.node("MatMul", [b.qdq(probs, "softmax_q", 1 / 127), v], "pv")
    return b.model({"q": [1, 2, 4, 8], "kt": [1, 2, 8, 4], "v": [1, 2, 4, 8]}, {y: [1, 2, 4, 8]})


def rank2_scale_model() -> onnx.ModelProto:
    """A [1, 4] scale on a rank-4 activation: neither per-tensor, per-channel nor block."""
    return activation_qdq_model([1, 4, 8, 8], np.full((1, 4), 0.05, np.float32))


def small_conv_model() -> onnx.ModelProto:
    b = Builder()
    r = b.qdq(b.node("Relu", ["x"], "relu"), "r", 0.05)
    w = b.weight("w", (3, 5, 1, 3))
    y = b.node("Conv", [r, w], "conv", kernel_shape=[1, 3])
    return b.model({"x": [1, 5, 8, 8]}, {y: [1, 3, 8, 6]})


def rules(report: CheckReport, severity: str | None = None) -> set[str]:
    return {f.rule for f in report.findings if severity is None or f.severity == severity}


def finding(report: CheckReport, rule: str, severity: str) -> Finding:
    assert "internal-error" not in rules(report), report.format_table()
    hits = [f for f in report.findings if f.rule == rule and f.severity == severity]
    assert hits, f"{rule}/{severity} not reported:\n{report.format_table()}"
    return hits[0]


def assert_clean(report: CheckReport) -> None:
    assert report.ok and report.fusion_ok, report.format_table()
    assert not report.warnings, report.format_table()


# --- correct models ---------------------------------------------------------------------------
def test_correct_resnet_block_has_no_errors_or_placement_warnings() -> None:
    report = check_onnx(resnet_block())
    assert_clean(report)
    assert report.stats["weighted_ops"] == report.stats["weighted_ops_quantized"] == 2
    assert report.stats["quantize_linear"] == 4 and report.stats["dequantize_linear"] == 4
    assert rules(report) == {"A5-fp32-graph"}  # info: trt10 with unknown typing


def test_correct_resnet_block_runs_in_onnxruntime() -> None:
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(resnet_block().SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": np.ones((1, C, 8, 8), np.float32)})
    assert y.shape == (1, C, 8, 8)


def test_correct_gemm_trans_b_per_row_weights() -> None:
    assert_clean(check_onnx(gemm_model(trans_b=1, axis=0)))
    assert_clean(check_onnx(gemm_model(trans_b=0, axis=1)))


def test_correct_concat_equal_scales() -> None:
    assert_clean(check_onnx(concat_model()))


def test_c20_downsample_block_skip_is_the_shorter_branch() -> None:
    assert_clean(check_onnx(resnet_block(downsample=True)))


def test_a0_no_qdq_is_info_and_ok() -> None:
    report = check_onnx(no_qdq_model())
    f = finding(report, "A0-no-qdq", "info")
    assert "TensorRT will build this in float" in f.message and f.nodes == ("conv",)
    assert report.ok and report.fusion_ok


# --- A. model ---------------------------------------------------------------------------------
def test_a1_onnx_checker_failure_is_error() -> None:
    report = check_onnx(dangling_input_model())
    assert finding(report, "A1-onnx-checker", "error").message.startswith("onnx.checker failed")
    assert not report.ok


def test_a1_shape_inference_failure_is_error() -> None:
    finding(check_onnx(shape_mismatch_model()), "A1-shape-inference", "error")


def test_a1_unknown_rank_is_error() -> None:
    report = check_onnx(unknown_rank_model())
    f = finding(report, "A1-unknown-rank", "error")
    assert f.nodes == ("r_q", "r_dq") and "'reshape_out'" in f.message
    assert rules(report, "error") == {"A1-unknown-rank"} and not report.warnings, report.format_table()


def test_a1_too_large_model_in_memory_is_info() -> None:
    with mock.patch.object(checker_run, "_PROTO_LIMIT", 1000):  # resnet_block() is ~20 kB
        report = check_onnx(resnet_block())
    assert "A1-too-large" in rules(report, "info") and report.ok


def test_a2_opset_21_is_error_for_trt10_and_23_for_trt11() -> None:
    """10.0's parser reads opsets 9-20; parsers built with ONNX 1.17 (10.6 on, the trt11 target) read up to 22,
    which INT4/FP8 Q/DQ at opset 21 need."""
    assert "21" in finding(check_onnx(resnet_block(opset=21), target="trt10"), "A2-opset", "error").message
    assert "A2-opset" not in rules(check_onnx(resnet_block(opset=21), target="trt11"))
    assert "23" in finding(check_onnx(resnet_block(opset=23), target="trt11"), "A2-opset", "error").message


def test_a2_per_channel_needs_opset_13() -> None:
    model = resnet_block(opset=12, w_axis=None)
    finding(check_onnx(model), "A2-opset", "error")


def test_a3_qlinearconv_is_error() -> None:
    report = check_onnx(qlinearconv_model())
    assert finding(report, "A3-qoperator", "error").nodes == ("qconv",)
    assert "A0-no-qdq" not in rules(report)


def test_a2_fp16_scales_need_opset_19() -> None:
    model = resnet_block()
    for t in model.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for vi in [*model.graph.input, *model.graph.output]:
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    report = check_onnx(model, "trt11")
    assert "FP16/BF16 scales" in finding(report, "A2-opset", "error").message
    assert "A5-fp32-graph" not in rules(report)


def test_a4_trt_domain_qdq_is_info() -> None:
    assert finding(check_onnx(trt_domain_model()), "A4-trt-domain", "info").nodes == ("fp8_q",)


def test_a5_fp32_graph_severity_follows_typing() -> None:
    model = resnet_block()
    assert finding(check_onnx(model, "trt11"), "A5-fp32-graph", "warning")
    assert finding(check_onnx(model, "trt10", strongly_typed=True), "A5-fp32-graph", "warning")
    assert finding(check_onnx(model, "trt10"), "A5-fp32-graph", "info")
    assert "A5-fp32-graph" not in rules(check_onnx(model, "trt10", strongly_typed=False))


# --- B. each Q/DQ -----------------------------------------------------------------------------
def test_b6_uint8_activation_is_error() -> None:
    f = finding(check_onnx(resnet_block(x_zp_dtype=np.uint8)), "B6-dtype", "error")
    assert "x_q" in f.nodes and "symmetric int8" in f.message


def test_b6_uint8_on_dla_names_the_dla_flag() -> None:
    f = finding(check_onnx(resnet_block(x_zp_dtype=np.uint8), "dla"), "B6-dtype", "error")
    assert "ENABLE_UINT8_AND_ASYMMETRIC_QUANTIZATION_DLA" in f.message


@pytest.mark.parametrize("bad", [0.0, -0.1, math.nan, math.inf])
def test_b7_scale_not_finite_positive_is_error(bad: float) -> None:
    f = finding(check_onnx(resnet_block(x_scale=bad)), "B7-scale", "error")
    assert f.nodes == ("x_q", "x_dq")


def test_b7_non_constant_scale_is_error() -> None:
    f = finding(check_onnx(non_constant_scale_model()), "B7-scale", "error")
    assert "x_q" in f.nodes and "not a constant" in f.message


def test_b7_tiny_and_amax_zero_scales_warn() -> None:
    model = resnet_block(x_scale=1e-7)
    finding(check_onnx(model), "B7-scale", "warning")
    model = resnet_block()
    scale = next(t for t in model.graph.initializer if t.name == "conv1_w_scale")
    values = numpy_helper.to_array(scale).copy()
    values[3] = 1.0
    scale.CopyFrom(numpy_helper.from_array(values, scale.name))
    assert "exactly 1.0" in finding(check_onnx(model), "B7-scale", "warning").message


def test_b8_nonzero_zero_point_is_error() -> None:
    f = finding(check_onnx(resnet_block(x_zp=3)), "B8-zero-point", "error")
    assert "x_q" in f.nodes and "symmetric" in f.message


def test_b8_missing_zero_point_is_error() -> None:
    model = resnet_block()
    for node in model.graph.node:
        if node.name in ("x_q", "x_dq"):
            del node.input[2]
    assert "x_q" in finding(check_onnx(model), "B8-zero-point", "error").nodes


def test_b9_scale_rank_neither_tensor_channel_nor_block_is_error() -> None:
    report = check_onnx(rank2_scale_model())
    f = finding(report, "B9-scale-rank", "error")
    assert f.nodes == ("x_q", "x_dq") and "scale rank 2" in f.message and "input rank 4" in f.message
    assert rules(report, "error") == {"B9-scale-rank"} and not report.warnings, report.format_table()


def test_b10_per_channel_activation_is_error() -> None:
    f = finding(check_onnx(resnet_block(x_axis=1)), "B10-per-channel-activation", "error")
    assert "x_q" in f.nodes


def test_b11_per_channel_without_axis_is_error() -> None:
    f = finding(check_onnx(resnet_block(w_axis=None)), "B11-axis", "error")
    assert "conv1_w_q" in f.nodes and "axis=1" in f.message


def test_b11_scale_count_mismatch_is_error() -> None:
    model = gemm_model(trans_b=1, axis=0)  # 16 scales for the 16 rows of a [16, 32] weight...
    for node in model.graph.node:
        if node.name.startswith("fc_w"):
            node.attribute[0].i = 1  # ...declared along axis 1 (32 entries)
    f = finding(check_onnx(model), "B11-axis", "error")
    assert "16 scales" in f.message and "32 entries" in f.message and "fc_w_q" in f.nodes


def test_b12_conv_weight_axis_1_is_error() -> None:
    f = finding(check_onnx(resnet_block(w_axis=1, w_scale_axis=1)), "B12-channel-axis", "error")
    assert "conv1_w_dq" in f.nodes and "conv1" in f.nodes and "axis=0" in f.fix


def test_b12_gemm_trans_b_0_axis_0_is_error() -> None:
    f = finding(check_onnx(gemm_model(trans_b=0, axis=0)), "B12-channel-axis", "error")
    assert "fc" in f.nodes and "axis=1" in f.fix


def test_b12_axis_follows_transpose_to_matmul() -> None:
    def model(axis: int) -> onnx.ModelProto:  # y = x @ W.T with W [16, 32] quantized per row
        b = Builder()
        w = b.node("Transpose", [b.weight("w", (16, 32), axis=axis, scale_axis=axis)], "w_t", perm=[1, 0])
        y = b.node("MatMul", [b.qdq("x", "x", 0.05), w], "mm")
        return b.model({"x": [4, 32]}, {y: [4, 16]})

    assert_clean(check_onnx(model(0)))
    assert "mm" in finding(check_onnx(model(1)), "B12-channel-axis", "error").nodes


def test_b13_scalar_qdq_is_error() -> None:
    report = check_onnx(activation_qdq_model([]))
    f = finding(report, "B13-scalar", "error")
    assert f.nodes == ("x_q", "x_dq") and "scalar (rank-0) tensor 'x'" in f.message
    assert rules(report, "error") == {"B13-scalar"} and not report.warnings, report.format_table()


def test_b14_int4_weight_with_odd_last_dimension_is_error() -> None:
    report = check_onnx(int4_odd_weight_model())
    f = finding(report, "B14-int4", "error")
    assert f.nodes == ("w_dq",) and "last dimension 15 is odd" in f.message
    assert rules(report, "error") == {"A2-opset", "B14-int4"}, report.format_table()  # A2: opset 21 > 20
    assert not report.warnings, report.format_table()


def test_b15_q_pair_params_differ_warns() -> None:
    f = finding(check_onnx(mismatched_pair_model()), "B15-qdq-pairing", "warning")
    assert f.nodes == ("x_q", "x_dq") and "scale" in f.message


def test_b16_tensor_quantized_twice_warns() -> None:
    f = finding(check_onnx(twice_quantized_model()), "B16-double-qdq", "warning")
    assert set(f.nodes) == {"xa_q", "xb_q"}


# --- C. placement -----------------------------------------------------------------------------
def test_c17_only_weight_quantized_warns() -> None:
    report = check_onnx(weight_only_conv_model())
    assert finding(report, "C17-partial-quant", "warning").nodes == ("conv",)
    assert not report.fusion_ok


@pytest.mark.parametrize("where", ["conv", "bn"])
def test_c19_qdq_between_conv_and_bn_or_relu_warns(where: str) -> None:
    f = finding(check_onnx(resnet_block(act_qdq=where)), "C19-conv-act-qdq", "warning")
    assert "conv1" in f.nodes and f"{'conv1_out' if where == 'conv' else 'bn1_out'}_q" in f.nodes


def test_c18_qdq_on_weighted_output_feeding_nothing_quantizable_warns() -> None:
    f = finding(check_onnx(gemm_output_qdq_model()), "C18-output-qdq", "warning")
    assert "fc" in f.nodes


def test_c20_both_add_inputs_quantized_warns() -> None:
    f = finding(check_onnx(resnet_block(branch_q=True)), "C20-residual-add", "warning")
    assert "add" in f.nodes and "both Add inputs quantized" in f.message


def test_c20_conv_branch_quantized_skip_float_warns() -> None:
    f = finding(check_onnx(resnet_block(branch_q=True, skip_q=False)), "C20-residual-add", "warning")
    assert "add" in f.nodes and "identity float" in f.message


def test_c20_no_add_input_quantized_warns() -> None:
    f = finding(check_onnx(resnet_block(skip_q=False)), "C20-residual-add", "warning")
    assert "add" in f.nodes and "identity input" in f.fix


def test_c21_unequal_concat_scales_warns() -> None:
    f = finding(check_onnx(concat_model(scales=(0.05, 0.1))), "C21-concat", "warning")
    assert "concat" in f.nodes
    assert "mixes quantized and float" in finding(check_onnx(concat_model(quantize_b=False)), "C21-concat",
                                                   "warning").message


@pytest.mark.parametrize("op,attrs", [("MaxPool", {"kernel_shape": [2, 2]}), ("Clip", {})])
def test_c22_qdq_around_a_commuting_op_is_info(op: str, attrs: dict[str, Any]) -> None:
    report = check_onnx(wrapped_model(op, **attrs))
    assert finding(report, "C22-redundant-qdq", "info").nodes == ("x_dq", "pool", "pool_q")
    assert report.ok and report.fusion_ok and not report.warnings, report.format_table()


def test_c22_qdq_around_average_pool_is_fusible_info() -> None:
    report = check_onnx(wrapped_model("AveragePool", kernel_shape=[2, 2]))
    assert finding(report, "C22-fusible", "info").nodes == ("x_dq", "pool", "pool_q")
    assert "C22-redundant-qdq" not in rules(report)


def test_c22_qdq_feeding_only_softmax_is_float_island_info() -> None:
    f = finding(check_onnx(softmax_model()), "C22-float-island", "info")
    assert f.nodes == ("x_q", "x_dq", "softmax")


def test_c23_small_channel_conv_warns() -> None:
    report = check_onnx(small_conv_model())
    assert finding(report, "C23-small-channel-conv", "warning").nodes == ("conv",)


def test_c24_quantized_gemv_warns() -> None:
    report = check_onnx(gemm_model(batch=1))
    f = finding(report, "C24-gemv", "warning")
    assert f.nodes == ("fc",) and "GEMV" in f.message
    assert rules(report, "warning") == {"C24-gemv"} and report.ok, report.format_table()
    assert "C24-gemv" not in rules(check_onnx(gemm_model(batch=4)))


def test_c27_attention_shapes() -> None:
    ok = check_onnx(attention_model())
    f = finding(ok, "C27-attention-fusable", "info")
    assert f.nodes == ("qk", "softmax", "pv") and ok.ok
    assert not rules(ok, "warning") & {"C27-attention-float", "C27-attention-scale"}, ok.format_table()
    float_v = finding(check_onnx(attention_model(quant_v=False)), "C27-attention-float", "warning")
    assert "V ('v')" in float_v.message and "Q (" not in float_v.message
    late = check_onnx(attention_model(scale_after=True))
    assert finding(late, "C27-attention-scale", "warning").nodes[-1] == "scores_scale"
    assert "C27-attention-fusable" not in rules(late)


def test_c25_int32_quantized_bias_is_error() -> None:
    report = check_onnx(resnet_block(bias="int32"))
    f = finding(report, "C25-quantized-bias", "error")
    assert "conv1" in f.nodes and "conv1_b_dq" in f.nodes
    assert "B6-dtype" not in rules(report)  # reported once, by C25


def test_c26_dla_needs_static_shapes() -> None:
    report = check_onnx(resnet_block(batch="N"), target="dla")
    assert "'x'" in finding(report, "C26-dla", "error").message
    assert finding(report, "C26-dla", "info")
    assert "C26-dla" not in rules(check_onnx(resnet_block(batch="N")))


# --- any exporter's graph, report plumbing --------------------------------------------------------
def test_constant_nodes_identity_chains_and_unnamed_nodes() -> None:
    model = resnet_block()
    graph = model.graph
    consts, keep = [], []
    for t in graph.initializer:  # scales and zero points become Constant nodes, weights go through Identity
        if t.name.endswith(("_scale", "_zp")):
            consts.append(helper.make_node("Constant", [], [t.name], value=t))
        elif t.name.endswith("_w"):
            keep.append(numpy_helper.from_array(numpy_helper.to_array(t), t.name + "_raw"))
            consts.append(helper.make_node("Identity", [t.name + "_raw"], [t.name]))
        else:
            keep.append(t)
    nodes = consts + list(graph.node)
    for n in nodes:
        n.name = ""
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.ClearField("initializer")
    graph.initializer.extend(keep)
    report = check_onnx(model)
    assert_clean(report)
    broken = resnet_block(x_zp=3)
    for n in broken.graph.node:
        n.name = ""
    f = finding(check_onnx(broken), "B8-zero-point", "error")
    assert f.nodes == ("QuantizeLinear#0", "DequantizeLinear#1")


def test_report_to_dict_is_json_and_table_fits_120_columns() -> None:
    report = check_onnx(resnet_block(branch_q=True, x_zp=3, w_axis=None))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["target"] == "trt10" and data["counts"]["error"] == len(report.errors) > 0
    assert data["stats"]["qdq_nodes"] == 10 and not data["ok"] and not data["fusion_ok"]
    table = report.format_table()
    assert "B8-zero-point" in table and "C20-residual-add" in table and "fix:" in table
    assert max(len(line) for line in table.splitlines()) <= 120


def test_model_with_external_data_loads_from_disk(tmp_path: Path) -> None:
    path = tmp_path / "block.onnx"
    onnx.save(resnet_block(x_zp=3), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="block.data", size_threshold=0)
    assert (tmp_path / "block.data").exists()
    report = check_onnx(path)
    assert rules(report, "error") == {"B8-zero-point"}  # scales and weights were read from block.data
    assert "'x_zp' = 3" in finding(report, "B8-zero-point", "error").message
    with pytest.raises(ValueError, match="external data"):
        check_onnx(onnx.load(path, load_external_data=False))


def test_onnxruntime_qdq_models(tmp_path: Path) -> None:
    quant = pytest.importorskip("onnxruntime.quantization")
    b = Builder()

    def conv(x: str, name: str) -> str:
        w = b.init(f"{name}_w", b.rng.standard_normal((C, C, 3, 3)).astype(np.float32) * 0.1)
        bias = b.init(f"{name}_b", np.zeros(C, np.float32))
        return b.node("Conv", [x, w, bias], name, kernel_shape=[3, 3], pads=[1, 1, 1, 1])

    y = b.node("Relu", [b.node("Add", [conv(b.node("Relu", [conv("x", "conv1")], "relu1"), "conv2"), "x"], "add")],
               "relu_out")
    onnx.save(b.model({"x": [1, C, 8, 8]}, {y: [1, C, 8, 8]}), tmp_path / "float.onnx")

    class Reader(quant.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": b.rng.standard_normal((1, C, 8, 8)).astype(np.float32)}])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    def quantize(name: str, **kw: object) -> CheckReport:
        quant.quantize_static(str(tmp_path / "float.onnx"), str(tmp_path / name), Reader(),
                              quant_format=quant.QuantFormat.QDQ, **kw)
        return check_onnx(tmp_path / name)

    default = quantize("default.onnx")  # asymmetric activations, int32 biases
    assert {"B8-zero-point", "C25-quantized-bias"} <= rules(default, "error")
    trt = quantize("trt.onnx", per_channel=True, activation_type=quant.QuantType.QInt8,
                   weight_type=quant.QuantType.QInt8,
                   extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})
    assert trt.ok, trt.format_table()
    assert {"C19-conv-act-qdq", "C20-residual-add"} <= rules(trt, "warning")  # ORT quantizes Conv outputs


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="unknown target"):
        check_onnx(resnet_block(), target="trt9")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        check_onnx("/nonexistent/model.onnx")
    with pytest.raises(TypeError):
        check_onnx(42)  # type: ignore[arg-type]


def junk_file_report() -> CheckReport:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "junk.onnx"
        path.write_bytes(b"\x00not an onnx model\xff" * 10)
        return check_onnx(path)


def test_unparseable_file_is_a1_error() -> None:
    assert rules(junk_file_report(), "error") == {"A1-load"}


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
def test_torch_fake_quant_export_parses_without_errors(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")

    class QConv(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(8, 16, 3, padding=1)
            self.register_buffer("w_scale", self.conv.weight.detach().abs().amax(dim=(1, 2, 3)) / 127)
            self.register_buffer("w_zp", torch.zeros(16, dtype=torch.int32))

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            x = torch.fake_quantize_per_tensor_affine(x, 0.05, 0, -128, 127)
            w = torch.fake_quantize_per_channel_affine(self.conv.weight, self.w_scale, self.w_zp, 0, -128, 127)
            return torch.nn.functional.conv2d(x, w, self.conv.bias, padding=1)

    path = tmp_path / "qconv.onnx"
    torch.onnx.export(QConv().eval(), (torch.randn(1, 8, 8, 8),), str(path), opset_version=17, dynamo=False)
    report = check_onnx(path)
    assert report.ok, report.format_table()
    assert report.stats["weighted_ops_quantized"] == 1


# --- every declared rule id has a broken model ----------------------------------------------------
def fp8_model(kind: str = "ok", dtype: int = TensorProto.FLOAT16) -> onnx.ModelProto:
    """x -> Q/DQ FP8 -> MatMul(W) with an FP8 (or, for 'mixed', INT8) weight; 'per_channel' quantizes x per
    channel, 'sigmoid' feeds the FP8 DQ to a Sigmoid instead."""
    np_dt = helper.tensor_dtype_to_np_dtype(dtype)
    nodes, inits = [], []

    def qdq(x: str, name: str, qtype: int, scale: Any, axis: int | None = None) -> str:
        scale = np.asarray(scale, np_dt)
        inits.append(numpy_helper.from_array(scale, f"{name}_s"))
        inits.append(helper.make_tensor(f"{name}_zp", qtype, list(scale.shape), [0] * scale.size))
        kw = {} if axis is None else {"axis": axis}
        nodes.append(helper.make_node("QuantizeLinear", [x, f"{name}_s", f"{name}_zp"], [f"{name}_q"], name=f"{name}_Q", **kw))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_zp"], [f"{name}_dq"],
                                      name=f"{name}_DQ", **kw))
        return f"{name}_dq"

    fp8 = TensorProto.FLOAT8E4M3FN
    a = qdq("x", "a", fp8, np.full(32, 0.01) if kind == "per_channel" else 0.01, 1 if kind == "per_channel" else None)
    if kind == "sigmoid":
        nodes.append(helper.make_node("Sigmoid", [a], ["y"], name="sig"))
    else:
        inits.append(numpy_helper.from_array(np.random.default_rng(0).standard_normal((32, 16)).astype(np_dt), "w"))
        w = qdq("w", "wq", TensorProto.INT8 if kind == "mixed" else fp8, 0.01)
        nodes.append(helper.make_node("MatMul", [a, w], ["y"], name="mm"))
    graph = helper.make_graph(nodes, "fp8", [helper.make_tensor_value_info("x", dtype, [8, 32])],
                              [helper.make_tensor_value_info("y", dtype, [8, 32 if kind == "sigmoid" else 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def _checked(model: Callable[[], onnx.ModelProto], target: str = "trt10", **kw: Any) -> Callable[[], CheckReport]:
    return lambda: check_onnx(model(), target=target, **kw)  # type: ignore[arg-type]


def _too_large_report() -> CheckReport:
    with mock.patch.object(checker_run, "_PROTO_LIMIT", 1000):
        return check_onnx(resnet_block())


#: rule id -> (severity, the report on a broken model that triggers it).
BROKEN: dict[str, tuple[str, Callable[[], CheckReport]]] = {
    "A0-no-qdq": ("info", _checked(no_qdq_model)),
    "A1-load": ("error", junk_file_report),
    "A1-onnx-checker": ("error", _checked(dangling_input_model)),
    "A1-shape-inference": ("error", _checked(shape_mismatch_model)),
    "A1-too-large": ("info", _too_large_report),
    "A1-unknown-rank": ("error", _checked(unknown_rank_model)),
    "A2-opset": ("error", _checked(lambda: resnet_block(opset=21))),
    "A3-qoperator": ("error", _checked(qlinearconv_model)),
    "A4-trt-domain": ("info", _checked(trt_domain_model)),
    "A5-fp32-graph": ("warning", _checked(resnet_block, "trt11")),
    "B6-dtype": ("error", _checked(lambda: resnet_block(x_zp_dtype=np.uint8))),
    "B7-scale": ("error", _checked(non_constant_scale_model)),
    "B8-zero-point": ("error", _checked(lambda: resnet_block(x_zp=3))),
    "B9-scale-rank": ("error", _checked(rank2_scale_model)),
    "B10-per-channel-activation": ("error", _checked(lambda: resnet_block(x_axis=1))),
    "B11-axis": ("error", _checked(lambda: resnet_block(w_axis=None))),
    "B12-channel-axis": ("error", _checked(lambda: resnet_block(w_axis=1, w_scale_axis=1))),
    "B13-scalar": ("error", _checked(lambda: activation_qdq_model([]))),
    "B14-int4": ("error", _checked(int4_odd_weight_model)),
    "B15-qdq-pairing": ("warning", _checked(mismatched_pair_model)),
    "B16-double-qdq": ("warning", _checked(twice_quantized_model)),
    "C17-partial-quant": ("warning", _checked(weight_only_conv_model)),
    "C18-output-qdq": ("warning", _checked(gemm_output_qdq_model)),
    "C19-conv-act-qdq": ("warning", _checked(lambda: resnet_block(act_qdq="conv"))),
    "C20-residual-add": ("warning", _checked(lambda: resnet_block(branch_q=True))),
    "C21-concat": ("warning", _checked(lambda: concat_model(scales=(0.05, 0.1)))),
    "C22-redundant-qdq": ("info", _checked(lambda: wrapped_model("MaxPool", kernel_shape=[2, 2]))),
    "C22-fusible": ("info", _checked(lambda: wrapped_model("AveragePool", kernel_shape=[2, 2]))),
    "C22-float-island": ("info", _checked(softmax_model)),
    "C23-small-channel-conv": ("warning", _checked(small_conv_model)),
    "C24-gemv": ("warning", _checked(lambda: gemm_model(batch=1))),
    "C25-quantized-bias": ("error", _checked(lambda: resnet_block(bias="int32"))),
    "C26-dla": ("error", _checked(lambda: resnet_block(batch="N"), "dla")),
    "C27-attention-fusable": ("info", _checked(attention_model)),
    "C27-attention-float": ("warning", _checked(lambda: attention_model(quant_v=False))),
    "C27-attention-scale": ("warning", _checked(lambda: attention_model(scale_after=True))),
    "A6-fp8-fp32-graph": ("warning", _checked(lambda: fp8_model(dtype=TensorProto.FLOAT))),
    "B17-fp8-scale": ("error", _checked(lambda: fp8_model("per_channel"))),
    "C28-fp8-fusion": ("warning", _checked(lambda: fp8_model("sigmoid"))),
    "C28-fp8-mixed": ("error", _checked(lambda: fp8_model("mixed"))),
}


def test_fp8_matmul_in_an_fp16_graph_is_clean() -> None:
    report = check_onnx(fp8_model(), target="trt10")
    assert not report.errors and not report.warnings, report.format_table()


def test_every_declared_rule_id_has_a_broken_model() -> None:
    declared = [*VALIDATION_IDS, *RULE_IDS]
    assert len(declared) == len(set(declared))
    missing, undeclared = set(declared) - set(BROKEN), set(BROKEN) - set(declared)
    assert not missing and not undeclared, f"no broken model: {missing}; not declared: {undeclared}"


@pytest.mark.parametrize("rule_id", list(BROKEN))
def test_broken_model_triggers_its_rule(rule_id: str) -> None:
    severity, report = BROKEN[rule_id]
    r = report()
    finding(r, rule_id, severity)
    assert rules(r) <= {*VALIDATION_IDS, *RULE_IDS}, f"undeclared ids: {rules(r) - {*VALIDATION_IDS, *RULE_IDS}}"


def test_rules_are_registered_in_checklist_order() -> None:
    numbers = [int(rule_ids(r)[0].split("-")[0][1:]) for r in RULES]
    assert numbers == sorted(numbers) and numbers[0] == 0 and numbers[-1] == 28
    assert [i for r in RULES for i in rule_ids(r)] == RULE_IDS
