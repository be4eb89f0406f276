"""torchvision models -> BN re-estimation -> quantize -> calibrate -> Q/DQ ONNX that TensorRT 10 fuses.

Both exporters are covered: ResNet-18 with both, the bigger models with one each (time). ResNet-50's
16 residual Adds must each have a DequantizeLinear on exactly the identity input.

Numeric parity per model (ONNX Runtime with graph optimisations off runs the Q/DQ graph literally):
  * every scale in the graph is float32(amax) / 127 of a quantizer of the model, computed in numpy;
  * teacher-forced, layer by layer: the float input of every activation QuantizeLinear, taken from ONNX
    Runtime, goes through the model's own TensorQuantizer (fake quant); its codes must agree with ORT's
    (at most 1e-4 of them may differ, by one) and its values equal ORT's DequantizeLinear output bit for
    bit where they agree; the weights' DequantizeLinear outputs equal the weight quantizers' outputs;
  * end to end, ORT vs fake quant is printed next to the chaos floor (fake quant vs itself under 1e-6
    relative input noise) and bounded by a multiple of it: random-init deep nets are chaotic, so the
    whole-output figure is a sanity bound; the per-layer checks are the real ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import _parity as P
import _qref as R

pytest.importorskip("torchvision")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto  # noqa: E402

from trtquant.export.checker import check_onnx  # noqa: E402

import trtquant  # noqa: E402

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

    # The model runs in ONNX Runtime with a dynamic batch and agrees with fake quant, layer by layer.
    _check_numeric_parity(name, exporter, method, path, proto)


# Chaos-floor multiple allowed for the end-to-end figure (see the module docstring), and its absolute floor.
E2E_FLOOR_FACTOR = 5.0
E2E_MIN_BOUND = 1e-4


def _check_numeric_parity(name, exporter, method, path, proto) -> None:
    model = P.calibrated(name, method)
    consts = P.constants(proto)
    active = {n: q for n, q in trtquant.quantizers(model).items() if q.is_enabled and q._if_quant and q.amax is not None}
    # numpy's float32(amax) / 127 -> the quantizers with that scale (per tensor), or their weight (per channel).
    by_scale = {}
    for n, q in active.items():
        if not q.quant_desc.per_channel:
            assert (q.num_bits, q.unsigned) == (8, False), n
            by_scale.setdefault(float(R.scale_of(q.amax)), []).append(q)
    weight_scales = {R.scale_of(q.amax).reshape(-1).tobytes(): n for n, q in active.items() if q.quant_desc.per_channel}

    qnodes = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    act_q = P.activation_quantize_nodes(proto)
    assert len(act_q) >= 10
    g = P.index(proto)
    consumers = {t: [g.nodes[i] for i, _ in uses] for t, uses in g.consumers.items()}
    graph_scales = set()
    for n in qnodes:
        scale = consts[n.input[1]]
        if scale.size > 1:
            assert scale.tobytes() in weight_scales, f"{n.name}: per-channel scale is no weight quantizer's amax/127"
        else:
            graph_scales.add(float(scale))
            assert float(scale) in by_scale, f"{n.name}: scale {float(scale)!r} is no quantizer's float32(amax)/127"
    # Every per-tensor quantizer of the model is in the graph (quantizers of one tensor share a Q/DQ pair).
    missing = [s for s in by_scale if s not in graph_scales]
    assert not missing, f"{len(missing)} quantizer scales not in the graph, e.g. {missing[:3]}"

    # ORT once, with every activation Q's float input, its codes, and its DQ outputs as extra outputs.
    extra, _ = P.qdq_probe_outputs(proto, act_q)
    weight_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in consts
                 or n.op_type == "DequantizeLinear" and n.input[0] in {q.output[0] for q in qnodes if q not in act_q}]
    for dq in weight_dq:
        extra[dq.output[0]] = TensorProto.FLOAT
    x = P.image_batches(1, 2, P.SIZES[name], seed=9)[0]
    values = P.probe_values(proto, extra, path.with_name(path.stem + "-probe.onnx"), x)

    # Teacher-forced: the same float input through the model's quantizer and through ORT's Q -> DQ.
    total = differ = 0
    for q in act_q:
        s = consts[q.input[1]]
        quantizer = by_scale[float(s)][0]
        xin = torch.from_numpy(values[q.input[0]])
        with torch.no_grad():
            y = quantizer(xin)
        ort_codes = values[q.output[0]].astype(np.int32)
        codes = np.rint(y.numpy() / s).astype(np.int32)
        d = np.abs(codes - ort_codes)
        assert int(d.max()) <= 1, f"{q.name}: fake quant and ORT codes differ by {int(d.max())}"
        total += d.size
        differ += int((d > 0).sum())
        same = d == 0
        for dq in consumers[q.output[0]]:
            got = y.numpy()[same]
            assert np.array_equal(got.view(np.int32), values[dq.output[0]][same].view(np.int32)), \
                f"{dq.name}: fake quant values differ from ORT's DequantizeLinear where the codes agree"
    assert differ <= 1e-4 * total, f"{differ} of {total} codes differ"
    # Weights: each weight DequantizeLinear equals the weight quantizer applied to the float weight.
    weights_checked = 0
    for dq in weight_dq:
        scale = consts[dq.input[1]]
        wname = weight_scales.get(scale.tobytes()) if scale.size > 1 else None
        if wname is None:
            continue
        wq = trtquant.quantizers(model)[wname]
        module = model.get_submodule(wname.rsplit(".", 1)[0])
        with torch.no_grad():
            ref_w = wq(module.weight.detach())
        got_w = values[dq.output[0]]
        if got_w.shape != tuple(ref_w.shape):
            continue
        assert np.array_equal(got_w, ref_w.numpy()), f"{dq.name}: weight DQ differs from {wname}"
        weights_checked += 1
    assert weights_checked >= 1

    # End to end, next to the chaos floor.
    out = torch.from_numpy(values[proto.graph.output[0].name])
    with torch.no_grad():
        ref = model(x)
        floor = [P.relative_l2(model(P.with_relative_noise(x, 1e-6, seed=s)), ref) for s in (0, 1, 2)]
    assert out.shape == ref.shape and torch.isfinite(out).all()
    e2e = P.relative_l2(out, ref)
    bound = max(E2E_FLOOR_FACTOR * max(floor), E2E_MIN_BOUND)
    print(f"\n{name}/{exporter}/{method}: teacher-forced {len(act_q)} activation Q nodes, {total} codes, {differ} "
          f"differ; {weights_checked} weight DQs equal; end to end ORT vs fake quant rel L2 {e2e:.3e}, chaos floor "
          f"(1e-6 input noise) {[f'{v:.3e}' for v in floor]}, bound {bound:.3e}")
    assert e2e <= bound, f"ORT vs fake quant rel L2 {e2e:.3e} > {bound:.3e} (chaos floor {floor})"


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
