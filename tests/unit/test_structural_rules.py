"""The structural rules of trtquant.graph.dag, through both adapters: placement (torch.fx) and the
checker (ONNX) must make the same choice on the same block, and each rule has a minimal pattern."""

from __future__ import annotations

import io

import onnx
import pytest
import torch
import torch.fx as fx
import torchvision
from torch import nn

from trtquant.graph import ops
from trtquant.graph.dag import concat_quantizer_groups, residual_split, weighted_source
from trtquant.graph.index import GraphIndex
from trtquant.graph.onnx_dag import OnnxDag
from trtquant.placement.fx_dag import FxDag

pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning")


def _fx_choices(model: nn.Module):
    graph = fx.Tracer().trace(model)
    dag = FxDag(graph, dict(model.named_modules()))
    adds = [n for n in graph.nodes if dag.op(n) == "Add"]
    return [_summary(residual_split(dag, n), dag.op) for n in adds]


def _onnx_choices(model: nn.Module, x: torch.Tensor):
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, opset_version=17, dynamo=False, do_constant_folding=True)
    index = GraphIndex(onnx.shape_inference.infer_shapes(onnx.load_from_string(buf.getvalue())))
    dag = OnnxDag(index)
    adds = [i for i in range(len(index.nodes)) if dag.op(i) == "Add"]
    return [_summary(residual_split(dag, i), dag.op) for i in adds]


def _summary(split, op):
    """(identity slot, the branch layer's op) or None - what both adapters must agree on."""
    return None if split is None else (split.identity, op(split.source))


class _Tie(nn.Module):
    """Two equally long conv branches from one input: input 1 is the identity by convention."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.a(x) + self.b(x)


class _SourcedInputIsAncestor(nn.Module):
    """conv output x plus an opaque function of x: x is the block input, not a branch -> no split."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y + torch.flip(y, dims=[3])


class _SiluGeluBranch(nn.Module):
    """Identity + conv -> BN -> SiLU -> conv -> GELU: SiLU/GELU are epilogue for both adapters."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)
        self.act1, self.act2 = nn.SiLU(), nn.GELU()

    def forward(self, x):
        x = torch.flip(x, dims=[2])  # an opaque block input
        return x + self.act2(self.c2(self.act1(self.bn(self.c1(x)))))


def _tv(name: str, sl: slice):
    torch.manual_seed(0)
    return nn.Sequential(*list(getattr(torchvision.models, name)().features)[sl]).eval() if name != "resnet18" \
        else torchvision.models.resnet18().layer2.eval()


BLOCKS = {
    # name: (model factory, input channels/size, expected choices in Add order)
    "resnet18.layer2": (lambda: _tv("resnet18", slice(None)), (64, 16),
                        [(1, "Conv"), (1, "Conv")]),
    "mobilenet_v2.features[2:4]": (lambda: _tv("mobilenet_v2", slice(2, 4)), (16, 16), [(0, "Conv")]),
    "efficientnet_b0.features[2] (SiLU, SE, StochasticDepth)": (lambda: _tv("efficientnet_b0", slice(2, 3)),
                                                                (16, 16), [(1, "Conv")]),
    "convnext_tiny.features[1] (GELU, layer scale)": (lambda: _tv("convnext_tiny", slice(1, 2)), (96, 8),
                                                      [None, None, None]),
    "tie": (_Tie, (4, 8), [(1, "Conv")]),
    "sourced input is the LCA": (_SourcedInputIsAncestor, (4, 8), [None]),
    "SiLU/GELU branch": (_SiluGeluBranch, (4, 8), [(0, "Conv")]),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_placement_and_checker_adapters_make_the_same_residual_choice(name):
    make, (c, s), expected = BLOCKS[name]
    model = make().eval()
    x = torch.randn(1, c, s, s)
    fx_choice = _fx_choices(model)
    onnx_choice = _onnx_choices(model, x)
    assert fx_choice == onnx_choice, f"{name}: fx {fx_choice} vs ONNX {onnx_choice}"
    assert fx_choice == expected


def test_onnx_adapter_collapses_exporter_spellings():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.lin = nn.Conv2d(3, 4, 1), nn.Linear(4, 4)

        def forward(self, x):
            y = nn.functional.silu(self.conv(x) * 2.0)  # Affine, then SelfGated (Mul(x, Sigmoid(x)))
            y = nn.functional.gelu(y)  # erf form at opset 17: Div, Erf, Add, Mul, Mul
            return self.lin(y.mean((2, 3)))  # Gemm (2-D) - and MatMul+Add on 3-D input

    buf = io.BytesIO()
    torch.onnx.export(M().eval(), (torch.randn(1, 3, 4, 4),), buf, opset_version=17, dynamo=False)
    index = GraphIndex(onnx.load_from_string(buf.getvalue()))
    dag = OnnxDag(index)
    out = index.producer[index.outputs[0]]
    canon = [dag.op(i) for i in range(len(index.nodes))]
    assert ops.SELF_GATED in canon and ops.AFFINE in canon
    # From the GELU's output back to the conv: every step is epilogue for the shared rule.
    gelu_out = next(i for i in range(len(index.nodes)) if dag.op(i) == ops.AFFINE and i > canon.index(ops.SELF_GATED)
                    and index.nodes[i].op_type == "Mul")
    src = weighted_source(dag, gelu_out)
    assert src is not None and index.nodes[src].op_type == "Conv"
    assert dag.op(out) in ("Gemm", ops.AFFINE)


def test_weighted_source_stops_at_non_epilogue_ops():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x).softmax(1), nn.functional.relu(self.conv(x))

    graph = fx.Tracer().trace(M())
    dag = FxDag(graph, dict(M().named_modules()))
    out = [n for n in graph.nodes if n.op == "output"][0]
    soft, relu = out.args[0]
    assert weighted_source(dag, soft) is None
    assert weighted_source(dag, relu) is not None and dag.op(weighted_source(dag, relu)) == "Conv"


def test_concat_groups_name_the_quantizers_of_each_concat_input():
    import trtquant

    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.head(torch.cat([self.a(x), self.b(x)], 1))

    model = Cat().eval()
    trtquant.quantize(model)
    from trtquant.placement.fx_pass import trace_quantized

    graph = trace_quantized(model)
    dag = FxDag(graph, dict(model.named_modules()))
    groups = concat_quantizer_groups(dag, graph.nodes)
    # The convs' outputs go into the Concat unquantized: quantizers are on conv inputs, not here.
    assert groups == []

    class CatQ(Cat):
        def __init__(self):
            super().__init__()
            self.qa, self.qb = trtquant.nn.TensorQuantizer(), trtquant.nn.TensorQuantizer()

        def forward(self, x):
            return self.head(torch.cat([self.qa(self.a(x)), self.qb(self.b(x))], 1))

    m = CatQ().eval()
    graph = trace_quantized(m)
    dag = FxDag(graph, dict(m.named_modules()))
    ((node, qs),) = concat_quantizer_groups(dag, graph.nodes)
    assert dag.op(node) == "Concat" and qs == ["qa", "qb"]


@pytest.mark.parametrize("name", ["mobilenet_v2.features[2:4]", "efficientnet_b0.features[2] (SiLU, SE, StochasticDepth)"])
def test_placed_residual_quantizers_satisfy_the_checker(name, tmp_path):
    """End to end: the quantizer placement puts on a residual Add is the one the checker asks for."""
    import trtquant
    from trtquant.export import check_onnx, export_onnx
    from trtquant.placement import placement_report

    make, (c, s), expected = BLOCKS[name]
    model = make().eval()
    trtquant.quantize(model)
    residual = [e["quantizer"] for e in placement_report(model)["quantizers"] if "residual_quantizer" in e["quantizer"]]
    assert len(residual) == sum(e is not None for e in expected)
    data = [torch.randn(2, c, s, s) for _ in range(2)]
    trtquant.calibrate(model, data, method="max", progress=False)
    path = tmp_path / "block.onnx"
    export_onnx(model, data[0], str(path))
    report = check_onnx(str(path))
    assert not report.errors
    assert "C20-residual-add" not in report.rules(), report.format_table()
