"""The ONNX Runtime INT8 graph (export target='onnxruntime'): INT8 kernels and parity."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

import _parity
from trtquant.export import compare, export_onnx
from trtquant.export.compare import metrics, ort_session
from trtquant.export.onnx import ort_flavor_
from trtquant.export.ort_graph import WEIGHTS_KEY, host_weight_dtype, int8_conv_fraction


def _export(name: str, tmp_path):
    model = _parity.calibrated(name)
    size = _parity.SIZES[name]
    path = tmp_path / f"{name}_ort.onnx"
    export_onnx(model, torch.zeros(1, 3, size, size), path, target="onnxruntime", exporter="legacy")
    return model, path, size


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
def test_int8_kernels_cover_the_convs(name: str, tmp_path) -> None:
    _, path, _ = _export(name, tmp_path)
    # The calibrated per-channel weights are in the graph (int8 initializer -> DQ, axis 0, int32 bias;
    # uint8 + 128 on a CPU without VNNI): ONNX Runtime would otherwise quantize float weights itself.
    proto = onnx.load(str(path))
    code_dtype = np.dtype(host_weight_dtype())
    consts, prod = _parity.constants(proto), _parity.producers(proto)
    for conv in (n for n in proto.graph.node if n.op_type == "Conv"):
        w_dq = prod.get(conv.input[1])
        assert w_dq is not None and w_dq.op_type == "DequantizeLinear", f"{conv.name}: float weight"
        assert consts[w_dq.input[0]].dtype == code_dtype and consts[w_dq.input[1]].ndim == 1, conv.name
        if len(conv.input) > 2 and conv.input[2]:
            b_dq = prod.get(conv.input[2])
            assert b_dq is not None and consts[b_dq.input[0]].dtype == np.int32, f"{conv.name}: float bias"
    opt = tmp_path / "opt.onnx"
    ort_session(path, optimize=True, optimized_model_path=str(opt))
    optimized = onnx.load(str(opt))
    n_int8, n_conv = int8_conv_fraction(optimized)
    assert n_conv > 0 and n_int8 / n_conv >= 0.95, f"{name}: {n_int8}/{n_conv} Conv layers run as INT8 kernels"
    # Unsigned post-activation quantizers let ONNX Runtime delete every ReLU/ReLU6: no float
    # DQ -> act -> Q islands are left, only the input Q and the classifier's DQ.
    ops = [n.op_type for n in optimized.graph.node]
    assert not {"Relu", "Clip", "Add", "Conv"} & set(ops), sorted(set(ops))
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") <= 1, sorted(ops)


def _torch_module_name(node) -> str:
    """'/layer2/layer2.0/downsample/downsample.0/Conv' (legacy exporter scopes) -> 'layer2.0.downsample.0'."""
    path: list = []
    for comp in node.name.strip("/").split("/")[:-1]:
        if path and comp.startswith(path[-1] + "."):
            path[-1] = comp
        else:
            path.append(comp)
    return ".".join(path)


def test_ort_graph_matches_its_fake_quant_model_teacher_forced(tmp_path) -> None:
    """Unoptimised (Q/DQ executed literally), layer by layer, the graph computes what the ORT-flavoured
    model computes. Each check feeds torch the very tensor ONNX Runtime had:

    (a) every activation QuantizeLinear: ORT's float input quantized in torch (uint8, zero point 128,
        or 0 where the quantizer is unsigned) gives ORT's codes (<= 0.01 % off by one; measured 0 of 3.9M codes);
    (b) every Conv/Gemm: the flavoured layer (folded int8 weight, int32-grid bias, its input quantizer)
        on ORT's dequantized input matches ORT's output to float-summation-order precision (measured
        rel L2 2e-7..6e-7 per layer), and the Q on a conv's output gives the same codes (<= 0.01 % off
        by one; measured 11 of 1.6M);
    (c) the graph quantizes with exactly the scales of the model's enabled activation quantizers
        (49 Q nodes in the graph: the 38 quantizers plus exact copies through Relu/MaxPool/Flatten).
    """
    from onnx import TensorProto

    import trtquant
    from trtquant.functional import amax_to_scale

    model, path, size = _export("resnet18", tmp_path)
    flavored = ort_flavor_(copy.deepcopy(model)).eval()
    modules = dict(flavored.named_modules())
    proto = onnx.load(str(path))
    consts, graph = _parity.constants(proto), _parity.index(proto)
    qnodes = _parity.activation_quantize_nodes(proto)
    layers = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    extra = {q.input[0]: TensorProto.FLOAT for q in qnodes}
    extra.update({q.output[0]: TensorProto.UINT8 for q in qnodes})
    for n in layers:
        extra[n.input[0]] = extra[n.output[0]] = TensorProto.FLOAT
    probe = tmp_path / "probe.onnx"
    onnx.save(_parity.with_extra_outputs(proto, extra), str(probe))
    sess = ort_session(probe, optimize=False)
    x = _parity.image_batches(1, 8, size, seed=7)[0]
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(names, {"input": x.numpy()})))
    values["input"] = x.numpy()

    def codes_of(t: torch.Tensor, q) -> torch.Tensor:
        scale, zp = torch.tensor(consts[q.input[1]], dtype=torch.float32), int(consts[q.input[2]])
        return (torch.round(t / scale) + zp).clamp(0, 255).to(torch.int32)

    def count(d: torch.Tensor, what: str) -> int:
        assert int(d.max()) <= 1, f"{what}: codes differ by {int(d.max())}"
        return int((d > 0).sum())

    # (a) Q numerics on ORT's own float inputs.
    total = differ = 0
    for q in qnodes:
        assert consts[q.input[2]].dtype == np.uint8 and int(consts[q.input[2]]) in (0, 128), q.name
        d = (codes_of(torch.from_numpy(values[q.input[0]]), q) - torch.from_numpy(values[q.output[0]].astype(np.int32))).abs()
        differ += count(d, q.name)
        total += d.numel()
    assert differ <= 1e-4 * total, f"Q numerics: {differ} of {total} codes differ"

    # (b) every Conv/Gemm, teacher-forced.
    total = differ = 0
    worst = []
    for n in layers:
        layer = modules[_torch_module_name(n)]
        with torch.no_grad():
            ref = layer(torch.from_numpy(values[n.input[0]]))
        got = torch.from_numpy(values[n.output[0]])
        rel = float((got.double() - ref.double()).norm() / ref.double().norm())
        worst.append((rel, n.name))
        for q in (c for _, _, c in graph.consumer_nodes(n.output[0]) if c.op_type == "QuantizeLinear"):
            d = (codes_of(ref, q) - torch.from_numpy(values[q.output[0]].astype(np.int32))).abs()
            differ += count(d, n.name)
            total += d.numel()
    worst.sort(reverse=True)
    assert worst[0][0] < 1e-5, f"a layer does not compute what the flavoured model computes: {worst[:3]}"
    assert total > 0 and differ <= 1e-4 * total, f"conv outputs: {differ} of {total} codes differ"

    # (c) the same quantization points (up to exact copies through monotone ops).
    graph_scales = {float(consts[q.input[1]]) for q in qnodes}
    flavored_qs = [q for q in trtquant.quantizers(flavored).values()
                   if q.is_enabled and q._if_quant and q.amax is not None and not q.quant_desc.per_channel]
    model_scales = {float(amax_to_scale(q.amax, 255 if q.unsigned else 127)) for q in flavored_qs}
    assert graph_scales == model_scales, (sorted(graph_scales - model_scales), sorted(model_scales - graph_scales))
    # Every post-ReLU quantizer is unsigned (zero point 0 in the graph); the residual conv branches are not.
    unsigned = {float(consts[q.input[1]]) for q in qnodes if int(consts[q.input[2]]) == 0}
    assert unsigned == {float(amax_to_scale(q.amax, 255)) for q in flavored_qs if q.unsigned}
    assert 0 < sum(q.unsigned for q in flavored_qs) < len(flavored_qs)


def test_ort_graph_end_to_end_loosely(tmp_path) -> None:
    """End to end, only a loose bound: the teacher-forced test above is the parity check.

    A random-init ResNet-18 amplifies every rounding flip from another summation order (one code in
    ~1e5 after a conv, ~20 % differing codes at the classifier), so ORT can only match the flavoured
    model about as well as that model matches itself under 1e-6 input noise. Measured on these 64
    images: ORT (unoptimised) rel L2 3.15e-2, cosine 0.99951; the model under noise 2.24e-2, 2.63e-2,
    2.71e-2; ORT's fused INT8 kernels (fixed-point requantisation) rel L2 5.2e-2, cosine 0.99863.
    """
    model, path, size = _export("resnet18", tmp_path)
    flavored = ort_flavor_(copy.deepcopy(model))
    x = torch.cat(_parity.image_batches(4, 16, size, seed=7))
    got = compare(flavored, path, x, optimize=False).outputs[0]
    with torch.no_grad():
        ref = flavored(x).numpy()
        g = torch.Generator().manual_seed(3)
        noise = [metrics("o", ref, flavored(x * (1 + 1e-6 * torch.randn(x.shape, generator=g))).numpy()).rel_l2
                 for _ in range(3)]
    assert got.rel_l2 <= 2 * max(noise), f"ORT graph rel L2 {got.rel_l2:.3e} vs fake-quant noise {noise}"
    assert got.cosine > 0.999
    # compare() recognises the ONNX Runtime graph and flavours the plain model itself.
    plain = compare(model, path, x, optimize=False)
    assert plain.outputs[0] == got and any("flavour" in n for n in plain.notes)
    assert plain.int8_conv_fraction == 1.0
    fused = compare(flavored, path, x, optimize=True).outputs[0]
    assert fused.cosine > 0.995, f"fused INT8 kernels: rel L2 {fused.rel_l2:.3e}, cosine {fused.cosine:.5f}"


def test_ort_target_rejects_fp16(tmp_path) -> None:
    model = _parity.calibrated("resnet18")
    with pytest.raises(ValueError, match="fp32"):
        export_onnx(model, torch.zeros(1, 3, 64, 64), tmp_path / "x.onnx", target="onnxruntime", dtype="fp16")


def test_ort_target_needs_observers_calibrated(tmp_path) -> None:
    import torchvision

    import trtquant
    from trtquant.errors import ExportError

    model = trtquant.quantize(torchvision.models.resnet18().eval())
    trtquant.calibrate(model, [torch.randn(2, 3, 64, 64)], method="max", progress=False)
    for name, q in trtquant.quantizers(model).items():
        if q.ort_only:
            q.amax = None
    with pytest.raises(ExportError, match="residual_branch_quantizer"):
        export_onnx(model, torch.zeros(1, 3, 64, 64), tmp_path / "x.onnx", target="onnxruntime")


class _Block(torch.nn.Module):
    """A transformer-style MLP block quantized only at its Linear inputs (placement=None): the
    LayerNorm output also feeds the float residual Add, which must keep reading the float value."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(32)
        self.up = torch.nn.Linear(32, 64)
        self.down = torch.nn.Linear(64, 32)
        self.head = torch.nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        h = h + self.down(torch.nn.functional.gelu(self.up(h)))
        return self.head(h)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_linear_on_3d_input_runs_int8_and_float_readers_stay_float(exporter: str, tmp_path) -> None:
    import trtquant

    torch.manual_seed(0)
    model = trtquant.quantize(_Block().eval(), include=torch.nn.Linear, placement=None)
    trtquant.calibrate(model, [torch.randn(4, 12, 32) for _ in range(2)], method="max", progress=False)
    path = tmp_path / "block.onnx"
    export_onnx(model, torch.randn(1, 12, 32), path, target="onnxruntime", exporter=exporter)
    res = compare(model, path, torch.randn(8, 12, 32))
    assert res.int8_conv_fraction is None  # the fraction counts Conv layers; there are none
    out = res.outputs[0]
    # ORT computes the flavoured model's numbers: int8 x int8 in int32, then float; rounding-level error.
    assert out.rel_l2 < 1e-5, out
    opt = tmp_path / "opt.onnx"
    ort_session(path, optimize=True, optimized_model_path=str(opt))
    ops = [n.op_type for n in onnx.load(str(opt)).graph.node]
    assert ops.count("MatMulIntegerToFloat") == 3 and "MatMul" not in ops, ops
    fused = compare(model, path, torch.randn(8, 12, 32), optimize=True).outputs[0]
    assert fused.rel_l2 < 1e-5, fused


def test_host_weight_dtype_reads_vnni_from_cpuinfo(tmp_path, monkeypatch) -> None:
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    vnni = tmp_path / "vnni"
    vnni.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert host_weight_dtype(str(avx2)) == "uint8"
    assert host_weight_dtype(str(vnni)) == "int8"
    assert host_weight_dtype(str(tmp_path / "missing")) == "uint8"
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert host_weight_dtype(str(avx2)) == "int8"


def test_uint8_and_int8_weight_graphs_hold_the_same_grid(tmp_path) -> None:
    """ort_weights='uint8' writes codes + 128 with zero point 128: the dequantized weights are identical,
    so both graphs compute the same values unoptimised (the U8U8 kernels are exact on every CPU)."""
    import trtquant

    torch.manual_seed(0)
    model = trtquant.quantize(_Block().eval(), include=torch.nn.Linear, placement=None)
    trtquant.calibrate(model, [torch.randn(4, 12, 32) for _ in range(2)], method="max", progress=False)
    graphs = {}
    for w in ("int8", "uint8"):
        path = tmp_path / f"{w}.onnx"
        export_onnx(model, torch.randn(1, 12, 32), path, target="onnxruntime", exporter="legacy", ort_weights=w)
        proto = onnx.load(str(path))
        assert {p.key: p.value for p in proto.metadata_props}[WEIGHTS_KEY] == w
        consts, prod = _parity.constants(proto), _parity.producers(proto)
        dqs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and consts.get(n.input[0]) is not None
               and consts[n.input[0]].dtype in (np.int8, np.uint8)]
        graphs[w] = {n.input[1]: (consts[n.input[0]], consts[n.input[2]]) for n in dqs}
    assert len(graphs["int8"]) == 3
    for (c8, z8), (cu, zu) in zip(graphs["int8"].values(), graphs["uint8"].values()):
        assert c8.dtype == np.int8 and cu.dtype == np.uint8 and (z8 == 0).all() and (zu == 128).all()
        np.testing.assert_array_equal(c8.astype(np.int16) + 128, cu.astype(np.int16))
    x = torch.randn(8, 12, 32)
    a = compare(model, tmp_path / "int8.onnx", x).outputs[0]
    b = compare(model, tmp_path / "uint8.onnx", x).outputs[0]
    assert a.rel_l2 < 1e-5 and b.rel_l2 < 1e-5, (a, b)


def test_export_rejects_an_unknown_ort_weight_type(tmp_path) -> None:
    with pytest.raises(ValueError, match="ort_weights"):
        export_onnx(torch.nn.Linear(2, 2), torch.randn(1, 2), tmp_path / "x.onnx", target="onnxruntime",
                    ort_weights="int4")
