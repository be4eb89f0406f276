"""Teacher-forced parity (trtquant.export.parity): per activation QuantizeLinear, ONNX Runtime's codes against
the PyTorch quantizer's, both computed from ONNX Runtime's own float input - and the check fails on a wrong graph.

The model is _parity's calibrated torchvision ResNet-18 at 64x64 (shared with test_export_parity.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import _parity as P

pytest.importorskip("torchvision")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from trtquant.export import compare, export_onnx  # noqa: E402
from trtquant.export.parity import activation_quantize_nodes, requantize, screen_indices, teacher_forced  # noqa: E402

MODEL = "resnet18"


def _images() -> torch.Tensor:
    return P.image_batches(1, 8, P.SIZES[MODEL], seed=7)[0]


@pytest.mark.parametrize("n", [10, 8192, 2**24 + 1, 25690112])
def test_screen_indices_stay_inside_large_tensors(n: int) -> None:
    """S3D at 16x224x224: 25,690,112 codes; a float32 linspace put the last index one past the end."""
    idx = screen_indices(n, 8192)
    assert int(idx[0]) == 0 and int(idx[-1]) == n - 1 and bool((idx[1:] >= idx[:-1]).all())


def test_requantize_rounds_half_to_even_and_saturates() -> None:
    """QuantizeLinear's arithmetic in closed form: ties to even, saturation, zero point 128 for uint8, per axis."""
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 0.75, 1000.0, -1000.0]) * 0.25
    scale = torch.tensor(0.25)
    assert requantize(x, scale, torch.tensor(0), -1, -128, 127).tolist() == [0, 2, 2, 0, -2, 1, 127, -128]
    assert requantize(x, scale, torch.tensor(128), -1, 0, 255).tolist() == [128, 130, 130, 128, 126, 129, 255, 0]
    per_channel = requantize(torch.ones(2, 3), torch.tensor([0.5, 0.25, 1.0]), torch.zeros(3), 1, -128, 127)
    assert per_channel.tolist() == [[2, 4, 1], [2, 4, 1]]


@pytest.mark.parametrize("zero_point", [0, 3])
def test_teacher_forced_matches_onnxruntime_on_ties(zero_point: int, tmp_path) -> None:
    """ONNX Runtime's QuantizeLinear and torch's requantize agree on every exact .5 tie (graph grid, no model);
    a hand-made graph whose Q node has no scope a quantizer could be matched by."""
    from _models import qdq_conv_onnx

    path = qdq_conv_onnx(tmp_path / "qdq.onnx", zero_point=zero_point)
    k = torch.arange(-300, 300, dtype=torch.float32)
    x = ((k + 0.5) / 32).repeat(2 * 16 * 64 // 600 + 1)[: 2 * 16 * 64].reshape(2, 16, 8, 8)  # all ties, some saturate
    rep = teacher_forced(None, path, x)
    (node,) = rep.nodes
    assert node.matched_by == "graph" and node.quantizer is None and node.graph_zero_point == zero_point
    assert node.codes == x.numel() and node.mismatched == 0, rep.format_table()


@pytest.mark.slow
def test_compare_teacher_forced_tensorrt_graph() -> None:
    """compare(teacher_forced=True) on the TensorRT Q/DQ graph (legacy exporter, so every Q node is matched
    to its quantizer by scope name): <= 0.01 % of the codes differ, none by more than one (measured 0 of
    1.33M), next to the end-to-end numbers and their chaos floor."""
    model = P.calibrated(MODEL)
    res = compare(model, P.exported(MODEL, "legacy"), [_images()], int8_kernels=False, teacher_forced=True)
    tf = res.teacher_forced
    print("\n" + res.format_table())
    assert tf is not None and len(tf.nodes) >= 20 and tf.target == "tensorrt"
    assert {n.matched_by for n in tf.nodes} == {"name"} and all(n.quantizer for n in tf.nodes)
    assert all(n.reference_scale == n.graph_scale for n in tf.nodes)
    assert tf.max_diff <= 1 and tf.share <= 1e-4 and not tf.flagged(), tf.format_table()
    (out,) = res.outputs
    assert res.input_noise == 1e-6 and out.noise_rel_l2 is not None and 0 < out.noise_rel_l2 < 0.5
    d = json.loads(json.dumps(res.to_dict()))
    assert d["teacher_forced"]["codes"] == tf.codes and d["outputs"][0]["noise_cosine"] == out.noise_cosine
    assert "teacher-forced" in res.format_table() and "noise rel L2" in res.format_table()


@pytest.mark.slow
def test_teacher_forced_flags_a_corrupted_scale(tmp_path) -> None:
    """One quantization point's scale x1.5 in the ONNX file (its Q and DQ, as a wrong amax would write):
    teacher forcing flags exactly that node (measured 62 % of its codes differ, by up to 35), every other
    node still agrees (each starts from ONNX Runtime's own input), while end to end the graph looks fine:
    measured cosine 0.9987, top-1 agreement 100 %, rel L2 5.2e-2 against a 1.4e-2 chaos floor."""
    model = P.calibrated(MODEL)
    proto = onnx.load(str(P.exported(MODEL, "legacy")))
    q = activation_quantize_nodes(proto)[10]
    scale = P.constants(proto)[q.input[1]]
    bad = onnx.numpy_helper.from_array((scale * np.float32(1.5)).astype(np.float32), q.input[1] + "_corrupt")
    proto.graph.initializer.append(bad)
    # This quantization point only: its Q and the DequantizeLinear nodes reading it, as a wrong amax would.
    for node in [q, *(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])]:
        node.input[1] = bad.name
    path = tmp_path / "corrupt.onnx"
    onnx.save(proto, str(path))

    x = _images()
    res = compare(model, path, [x], int8_kernels=False, teacher_forced=True)
    tf = res.teacher_forced
    print("\n" + res.format_table())
    flagged = tf.flagged()
    assert [n.node for n in flagged] == [q.name], tf.format_table()
    (node,) = flagged
    assert node.share > 0.3 and node.graph_scale == pytest.approx(1.5 * node.reference_scale, rel=1e-6)
    others = [n for n in tf.nodes if n.node != q.name]
    assert sum(n.mismatched for n in others) <= 1e-4 * sum(n.codes for n in others)
    # End to end, a cosine or top-1 threshold would pass this graph.
    assert res.outputs[0].cosine > 0.99 and res.outputs[0].top1_agreement >= 0.75


@pytest.mark.slow
def test_teacher_forced_onnxruntime_graph(tmp_path) -> None:
    """The ONNX Runtime target graph: uint8 codes (zero point 128 for signed quantizers, 0 for unsigned),
    requantization Q nodes on conv outputs; checked against the ONNX Runtime flavour of the model.
    Measured: 32 Q nodes, 0 of 2.35M codes differ."""
    model = P.calibrated(MODEL)
    path = tmp_path / "r18_ort.onnx"
    export_onnx(model, torch.zeros(1, 3, 64, 64), path, target="onnxruntime", exporter="legacy")
    rep = teacher_forced(model, path, _images())
    print("\n" + rep.summary())
    assert rep.target == "onnxruntime" and len(rep.nodes) >= 20
    assert {n.graph_zero_point for n in rep.nodes} == {0, 128}
    assert all(n.quantizer for n in rep.nodes)
    assert rep.max_diff <= 1 and rep.share <= 1e-4 and not rep.flagged(), rep.format_table()


class _ObservedBatchNorm(torch.nn.Module):
    """conv -> BatchNorm read by three quantized readers (a residual conv, its identity, a head): the ONNX
    Runtime flavour folds the BatchNorm and puts an output observer in its place, and its readers
    requantize the observer's codes - the LR-ASPP pattern (MobileNetV3 stage output read by the head)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = torch.nn.BatchNorm2d(8)
        self.conv1 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.bn0(self.conv0(x))
        return self.conv1(y) + y, self.head(torch.relu(y))


def test_requantization_nodes_are_matched_by_their_grid_not_the_producer_scope(tmp_path) -> None:
    import trtquant

    torch.manual_seed(0)
    model = _ObservedBatchNorm().eval()
    model.bn0.running_mean.uniform_(-0.5, 0.5)
    model.bn0.running_var.uniform_(0.5, 2.0)
    q = trtquant.quantize(model)
    trtquant.calibrate(q, [torch.randn(4, 3, 16, 16) for _ in range(2)], method="percentile", progress=False)
    observers = [n for n, m in q.named_modules() if n.endswith("ort_output_quantizer")]
    assert "bn0.ort_output_quantizer" in observers, observers
    x = torch.randn(2, 3, 16, 16)
    path = tmp_path / "observed_bn_ort.onnx"
    export_onnx(q, x, path, target="onnxruntime", exporter="legacy")
    report = teacher_forced(q, path, x)
    # Requantizations read a dequantized tensor; none stands for the folded BatchNorm's observer.
    requant = [n for n in report.nodes if n.tensor.endswith("__trtquant_dq")]
    assert requant, [n.tensor for n in report.nodes]
    assert all(n.quantizer != "bn0" and n.mismatched == 0 for n in requant), [
        (n.node, n.quantizer, n.matched_by, n.share) for n in requant]
    assert report.codes > 0 and not report.flagged(), [(n.node, n.quantizer, n.share) for n in report.flagged()]
