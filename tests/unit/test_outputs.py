"""Outputs of any structure: flatten_outputs, ONNX output naming and pairing, compare and sensitivity per leaf."""

from __future__ import annotations

import collections
from typing import Dict

import pytest
import torch
from torch import nn

import trtquant
from trtquant.outputs import flatten_outputs, onnx_output_names, output_tensors

Pair = collections.namedtuple("Pair", ["logits", "features"])


class _Stem(nn.Module):
    """conv -> relu -> conv, shared by the structured-output models below (every leaf a distinct shape)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 3, stride=2, padding=1)
        self.relu = nn.ReLU()

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv1(x))


class SegDict(_Stem):
    """torchvision segmentation style: OrderedDict(out=..., aux=...), 'out' deliberately first (not sorted)."""

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        h = self.stem(x)
        return collections.OrderedDict([("out", self.conv2(h)), ("aux", h[:, :2])])


class NamedOut(_Stem):
    def forward(self, x: torch.Tensor) -> Pair:
        h = self.stem(x)
        return Pair(self.conv2(h).mean((2, 3)), h)


class Nested(_Stem):
    """(tensor, {'b': (tensor, tensor), 'a': tensor}): a tuple holding a dict holding a tuple."""

    def forward(self, x: torch.Tensor):
        h = self.stem(x)
        y = self.conv2(h)
        return h[:, :1], {"b": (y, y.mean((2, 3))), "a": h.amax(1)}


LEAVES = {SegDict: ["out", "aux"], NamedOut: ["logits", "features"], Nested: ["0", "1.b.0", "1.b.1", "1.a"]}
ONNX_NAMES = {SegDict: ["out", "aux"], NamedOut: ["logits", "features"],
              Nested: ["output_0", "output_1.b.0", "output_1.b.1", "output_1.a"]}


def _calibrated(cls) -> nn.Module:
    model = cls().eval()
    trtquant.quantize(model)
    g = torch.Generator().manual_seed(1)
    trtquant.calibrate(model, [torch.randn(2, 3, 16, 16, generator=g) for _ in range(2)], method="max", progress=False)
    return model.eval()


def test_flatten_names_and_order() -> None:
    t = torch.zeros(1)
    assert flatten_outputs(t) == [("output", t)]
    nested = collections.OrderedDict([("z", (t, Pair(t, [t, None, 3]))), ("a", {"k": t})])
    assert [n for n, _ in flatten_outputs(nested)] == ["z.0", "z.1.logits", "z.1.features.0", "a.k"]
    assert len(output_tensors(nested)) == 4
    assert onnx_output_names((t,)) == ["output"] and onnx_output_names((t, t)) == ["output_0", "output_1"]
    with pytest.raises(TypeError, match=r"at 'a\.k' is a object"):
        flatten_outputs({"a": {"k": object()}})


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("cls", [SegDict, NamedOut, Nested])
def test_export_names_and_compare_pairs_every_leaf(cls, exporter: str, tmp_path) -> None:
    """torch.onnx flattens dicts in insertion order, like flatten_outputs, with both exporters: ONNX output
    i has leaf i's name and shape, and compare reports every leaf by name."""
    pytest.importorskip("onnxruntime")
    import onnx

    from trtquant.export import compare, export_onnx

    model = _calibrated(cls)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    res = export_onnx(model, x, tmp_path / "m.onnx", exporter=exporter)
    assert res.output_names == ONNX_NAMES[cls]
    graph = onnx.load(str(res.path)).graph
    assert [o.name for o in graph.output] == ONNX_NAMES[cls]
    with torch.no_grad():
        leaves = flatten_outputs(model(x))
    for (name, t), o in zip(leaves, graph.output):  # the pairing is by position: shapes must agree
        dims = [d.dim_value if d.HasField("dim_value") else None for d in o.type.tensor_type.shape.dim]
        assert dims[1:] == list(t.shape[1:]), f"{name} -> {o.name}: {dims} vs {list(t.shape)}"
    cmp = compare(model, res.path, [x], int8_kernels=False)
    assert [o.name for o in cmp.outputs] == LEAVES[cls]
    assert [o.onnx_name for o in cmp.outputs] == ONNX_NAMES[cls]
    for o in cmp.outputs:
        assert o.cosine > 0.999 and o.rel_l2 < 0.05, cmp.format_table()
        assert o.noise_rel_l2 is not None and o.noise_cosine > 0.999
    table = cmp.format_table()
    assert all(f"| {leaf} |" in table for leaf in LEAVES[cls]) and "noise" in table


def test_output_names_must_match_the_leaves(tmp_path) -> None:
    from trtquant.export import export_onnx

    with pytest.raises(ValueError, match=r"output_names has 1 name\(s\) but SegDict returns 2 tensor\(s\) \(out, aux\)"):
        export_onnx(_calibrated(SegDict), torch.zeros(1, 3, 16, 16), tmp_path / "m.onnx", exporter="legacy",
                    output_names=["out"])


@pytest.mark.slow
def test_lraspp_mobilenet_v3_end_to_end(tmp_path) -> None:
    """torchvision LR-ASPP (returns OrderedDict(out=...)): quantize, calibrate max, export, compare per leaf,
    teacher-forced. BatchNorm statistics are re-estimated first: with the random-init defaults the output
    hardly depends on the input (measured 5e-4 change for 0.1 input noise). Measured: cosine 1.000000,
    rel L2 1e-7 against a 1e-6-noise floor of 4.5e-2; 74 activation Q nodes, 0 of 1.07M codes differ."""
    tv = pytest.importorskip("torchvision")
    pytest.importorskip("onnxruntime")
    import _parity as P
    from trtquant.export import compare, export_onnx

    torch.manual_seed(0)
    model = tv.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3).eval()
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(2, 3, 64, 64, generator=g)]
    P.reestimate_bn(model, data)
    trtquant.quantize(model)
    trtquant.calibrate(model, data, method="max", progress=False)
    x = torch.randn(2, 3, 64, 64, generator=g)
    res = export_onnx(model, x, tmp_path / "lraspp.onnx", exporter="legacy")
    assert res.output_names == ["out"] and res.num_qdq > 100
    cmp = compare(model, res.path, [x], int8_kernels=False, teacher_forced=True)
    print("\n" + cmp.format_table())
    (out,) = cmp.outputs
    assert out.name == "out" and out.onnx_name == "out"
    assert out.cosine > 0.99 and out.rel_l2 <= max(out.noise_rel_l2, 1e-5), cmp.format_table()
    assert out.noise_rel_l2 > 1e-4  # the output depends on the input
    tf = cmp.teacher_forced
    assert len(tf.nodes) > 50 and tf.max_diff <= 1 and tf.share <= 1e-4, tf.format_table()
    assert cmp.to_dict()["outputs"][0]["name"] == "out"


def test_sensitivity_on_a_dict_output_model() -> None:
    """Every quantized layer ranked by SQNR over both leaves of an OrderedDict output."""
    from trtquant.sensitivity import sensitivity

    model = _calibrated(SegDict)
    data = [torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))]
    ranking = sensitivity(model, data)
    assert {r.name for r in ranking} >= {"conv1", "conv2"}
    assert all(r.sqnr_db is not None and 5.0 < r.sqnr_db < 80.0 for r in ranking), ranking
