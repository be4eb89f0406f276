"""torchvision models -> BN re-estimation -> quantize -> calibrate -> Q/DQ ONNX that TensorRT 10 fuses.

Both exporters are covered: ResNet-18 with both, the bigger models with one each (time). ResNet-50's
16 residual Adds must each have a DequantizeLinear on exactly the identity input.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import _parity as P

pytest.importorskip("torchvision")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto  # noqa: E402

from trtquant.export.checker import check_onnx  # noqa: E402
from trtquant.export.compare import ort_session  # noqa: E402

CASES = [
    # (model, exporter, amax method)
    ("resnet18", "legacy", "max"),
    ("resnet18", "dynamo", "max"),
    ("resnet50", "legacy", "max"),
    ("mobilenet_v2", "dynamo", "entropy"),
    ("inception_v3", "legacy", "max"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,exporter,method", CASES, ids=[f"{n}-{e}" for n, e, _ in CASES])
def test_export_passes_trt10_checks(name, exporter, method):
    path = P.exported(name, exporter, method)
    report = check_onnx(path, target="trt10")
    shown = report.format_table()
    assert not report.errors, f"{name}/{exporter}: errors\n{shown}"
    assert report.fusion_ok, f"{name}/{exporter}: fusion warnings\n{shown}"
    assert not report.warnings, f"{name}/{exporter}: warnings\n{shown}"
    stats = report.stats
    assert stats["weighted_ops"] and stats["weighted_ops"] == stats["weighted_ops_quantized"], report.summary()

    proto = onnx.load(str(path))
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == (17 if exporter == "legacy" else 18)
    # Q/DQ as TensorRT wants them: int8 zero points of 0, per-channel only on weights with axis.
    consts = P.constants(proto)
    for n in proto.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp = consts[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any(), n.name
        scale = consts[n.input[1]]
        assert scale.dtype == np.float32 and (scale > 0).all() and np.isfinite(scale).all(), n.name
        if scale.size > 1:
            assert n.input[0] in consts or n.op_type == "DequantizeLinear", f"{n.name}: per-channel activation"
            assert any(a.name == "axis" for a in n.attribute), f"{n.name}: per-channel without axis"

    # The model runs in ONNX Runtime with a dynamic batch and agrees with fake quant in shape/class count.
    size = P.SIZES[name]
    x = P.image_batches(1, 2, size, seed=9)[0]
    out = ort_session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = P.calibrated(name, method)(x)
    assert out.shape == tuple(ref.shape)
    assert np.isfinite(out).all()


@pytest.mark.slow
def test_resnet50_residual_adds_quantize_exactly_the_identity_input():
    proto = onnx.load(str(P.exported("resnet50", "legacy", "max")))
    prod = P.producers(proto)
    adds = P.residual_adds(proto)
    assert len(adds) == 16
    downsample = 0
    for add in adds:
        kinds = [prod[i].op_type if i in prod else "graph input" for i in add.input]
        dq = [i for i, k in enumerate(kinds) if k == "DequantizeLinear"]
        assert len(dq) == 1, f"{add.name}: inputs produced by {kinds}; want exactly one DequantizeLinear"
        other = kinds[1 - dq[0]]
        assert other == "BatchNormalization", f"{add.name}: the conv-branch input comes from {other}"
        identity, convs = P.identity_input(proto, add)
        assert identity == dq[0], f"{add.name}: DequantizeLinear on the conv branch (convs per input {convs})"
        assert convs[identity] in (0, 1) and convs[1 - identity] == 3, (add.name, convs)
        downsample += convs[identity] == 1
        # That DequantizeLinear belongs to a Q -> DQ pair on the identity tensor.
        q = prod[prod[add.input[identity]].input[0]]
        assert q.op_type == "QuantizeLinear"
    assert downsample == 4  # the first block of each stage: identity through the downsample conv


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_dynamo_global_average_pool(name):
    """dynamo lowers adaptive_avg_pool2d(x, 1) to ReduceMean; the export rewrites it to GlobalAveragePool."""
    method = "entropy" if name == "mobilenet_v2" else "max"
    ops = [n.op_type for n in onnx.load(str(P.exported(name, "dynamo", method))).graph.node]
    assert "ReduceMean" not in ops and ops.count("GlobalAveragePool") == 1


# ---- graph passes on hand-made graphs ------------------------------------------------------------

def _qdq(nodes, inits, x, tag, scale=0.05):
    from onnx import helper, numpy_helper

    inits += [numpy_helper.from_array(np.array(scale, np.float32), f"s_{tag}"),
              numpy_helper.from_array(np.array(0, np.int8), f"z_{tag}")]
    nodes += [helper.make_node("QuantizeLinear", [x, f"s_{tag}", f"z_{tag}"], [f"q_{tag}"]),
              helper.make_node("DequantizeLinear", [f"q_{tag}", f"s_{tag}", f"z_{tag}"], [f"dq_{tag}"])]
    return f"dq_{tag}"


def _reduce_mean_model(shape, axes):
    from onnx import helper, numpy_helper

    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=1)]
    inits = [numpy_helper.from_array(np.array(axes, np.int64), "axes")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


@pytest.mark.parametrize("shape,axes,rewritten", [
    (["N", 8, 4, 4], [2, 3], True),
    (["N", 8, 4, 4], [-2, -1], True),
    (["N", 8, 4, 4], [1, 2], False),
    (["N", 8, 16], [-2, -1], False),  # 3-D: GlobalAveragePool would average only the last axis
    (["N", 8, 2, 4, 4], [2, 3], False),  # 5-D: GlobalAveragePool would also average the last axis
    (["N", 8, 2, 4, 4], [-2, -1], False),
])
def test_reduce_mean_rewritten_only_when_it_is_a_global_average_pool(shape, axes, rewritten):
    from trtquant.export.graph_passes import reduce_mean_to_global_pool

    model = _reduce_mean_model(shape, axes)
    x = np.random.default_rng(0).standard_normal([2 if d == "N" else d for d in shape]).astype(np.float32)
    before = _run(model, x)
    assert reduce_mean_to_global_pool(model) == int(rewritten)
    assert [n.op_type for n in model.graph.node] == ["GlobalAveragePool" if rewritten else "ReduceMean"]
    np.testing.assert_allclose(_run(model, x), before, rtol=1e-6, atol=1e-7)


def _run(model, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def test_dedupe_qdq_keeps_graph_outputs_and_merges_the_rest():
    from onnx import helper

    from trtquant.export.graph_passes import dedupe_qdq

    nodes, inits = [], []
    a = _qdq(nodes, inits, "x", "a")
    out_dq = _qdq(nodes, inits, "x", "out")  # same pair as "a", but its DQ is a graph output: must stay
    b = _qdq(nodes, inits, "x", "b")  # same tensor, scale, zero point as "a": merged into it
    nodes += [helper.make_node("Relu", [a], ["ra"]), helper.make_node("Neg", [b], ["nb"])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in (out_dq, "ra", "nb")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    x = np.linspace(-1, 1, 4, dtype=np.float32)
    before = _run(model, x)
    assert dedupe_qdq(model) == 1
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 2
    assert {o.name for o in model.graph.output} == {out_dq, "ra", "nb"}
    for got, want in zip(_run(model, x), before):
        np.testing.assert_array_equal(got, want)
