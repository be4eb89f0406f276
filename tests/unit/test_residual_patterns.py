"""The residual rule on the ways real code writes a residual block.

Each minimal model is one block: ``stem -> branch -> Add(branch, identity) -> head``. For every pattern
TensorRT can fuse (the branch reaches its last Conv through BN/activations/no-ops only) placement must
put one residual quantizer on the identity - the block input the branch is computed from - and the
exported graph must have it there and draw no C20 warning. For patterns TensorRT cannot fuse (the
branch ends in a tensor-valued Mul or a permute: SE-ResNet, torchvision's ConvNeXt) neither placement
nor the checker treats the Add as a Conv+Add fusion (docs/graph-model.md, "Which Adds are residual").
"""

from __future__ import annotations

import io
from typing import Callable

import onnx
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision
from torch import nn

import trtquant
from trtquant.export import check_onnx, export_onnx
from trtquant.graph.dag import residual_split
from trtquant.graph.index import GraphIndex
from trtquant.graph.onnx_dag import OnnxDag
from trtquant.placement import placement_report
from trtquant.placement.fx_dag import FxDag, is_constant
from trtquant.placement.fx_pass import quantizer_inputs, trace_quantized

pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning",
                                        "ignore::torch.jit.TracerWarning")

C = 16  # channels: >= 16 keeps the checker's small-channel rule (C23) out of the way


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The 2-core test machine is shared: two intra-op threads make the exports 3x slower under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- the patterns --------------------------------------------------------------------------------
def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """timm's drop path: a per-sample Bernoulli mask built from ``x``'s shape (traced in train mode)."""
    if p == 0.0 or not training:
        return x
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(1 - p)
    mask.div_(1 - p)
    return x * mask


class DropPath(nn.Module):
    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)


class FunctionalTail(nn.Module):
    """``torchvision.ops.stochastic_depth`` / ``F.dropout`` called in the block, not as a module."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "stochastic_depth":
            return torchvision.ops.stochastic_depth(x, 0.2, "row", self.training)
        return F.dropout(x, 0.2, self.training)


class SwishWritten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class HardSwishWritten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.relu6(x + 3.0) / 6.0


class Block(nn.Module):
    """stem -> ReLU -> conv/BN/act/conv/BN -> tail -> Add (spelled ``add``) -> ReLU -> head."""

    def __init__(self, add: str = "+=", tail: nn.Module | None = None, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.c1, self.b1, self.act = nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C), act()
        self.c2, self.b2 = nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C)
        self.tail = tail if tail is not None else nn.Identity()
        self.add = add
        self.head = nn.Conv2d(C, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        out = self.tail(self.b2(self.c2(self.act(self.b1(self.c1(x))))))
        if self.add == "+=":
            out += x
        elif self.add == "torch.add":
            out = torch.add(out, x)
        elif self.add == "a.add(b)":
            out = out.add(x)
        elif self.add == "a.add_(b)":
            out = out.add_(x)
        elif self.add == "alpha=1":
            out = torch.add(out, x, alpha=1)
        elif self.add == "identity + out":
            out = x + out
        elif self.add == "out=":
            out = torch.add(out, x, out=torch.empty_like(x))
        return self.head(F.relu(out))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, 8, 1), nn.Conv2d(8, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class InvertedResidualSE(nn.Module):
    """EfficientNet's MBConv: expand -> act -> dw -> act -> SE Mul -> project -> BN -> StochasticDepth -> +=."""

    def __init__(self, act: type[nn.Module] = nn.SiLU) -> None:
        super().__init__()
        self.stem, self.act = nn.Conv2d(3, C, 3, padding=1), act()
        self.expand, self.bn1 = nn.Conv2d(C, 2 * C, 1, bias=False), nn.BatchNorm2d(2 * C)
        self.dw, self.bn2 = nn.Conv2d(2 * C, 2 * C, 3, padding=1, groups=2 * C, bias=False), nn.BatchNorm2d(2 * C)
        self.se = SqueezeExcite(2 * C)
        self.project, self.bn3 = nn.Conv2d(2 * C, C, 1, bias=False), nn.BatchNorm2d(C)
        self.stochastic_depth = torchvision.ops.StochasticDepth(0.2, "row")
        self.head = nn.Conv2d(C, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        result = self.act(self.bn2(self.dw(self.act(self.bn1(self.expand(x))))))
        result = self.stochastic_depth(self.bn3(self.project(self.se(result))))
        result += x
        return self.head(result)


class ConvNeXtChannelsFirst(nn.Module):
    """ConvNeXt with 1x1 convs (timm's ``conv_mlp``): layer scale ``gamma.reshape(1, -1, 1, 1)`` -> DropPath."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, C, 4, stride=4)
        self.dw = nn.Conv2d(C, C, 7, padding=3, groups=C)
        self.fc1, self.fc2 = nn.Conv2d(C, 4 * C, 1), nn.Conv2d(4 * C, C, 1)
        self.gamma = nn.Parameter(torch.full((C,), 0.5))
        self.drop_path = DropPath(0.1)
        self.head = nn.Conv2d(C, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.fc2(F.gelu(self.fc1(self.dw(x)))).mul(self.gamma.reshape(1, -1, 1, 1))
        return self.head(self.drop_path(y) + x)


class ConvNeXtLinear(nn.Module):
    """torchvision's CNBlock: dw -> permute -> LN -> Linear -> GELU -> Linear -> permute -> layer scale ->
    StochasticDepth -> + input. Not a Conv+Add fusion: the Add is behind a permute."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, C, 4, stride=4)
        self.dw = nn.Conv2d(C, C, 7, padding=3, groups=C)
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(C), nn.Linear(C, 4 * C), nn.Linear(4 * C, C)
        self.layer_scale = nn.Parameter(torch.full((C, 1, 1), 0.5))
        self.stochastic_depth = torchvision.ops.StochasticDepth(0.1, "row")
        self.head = nn.Conv2d(C, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.fc2(F.gelu(self.fc1(self.ln(self.dw(x).permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        return self.head(self.stochastic_depth(self.layer_scale * y) + x)


class SEScaledEnd(nn.Module):
    """SE-ResNet: conv -> BN -> SE Mul at the branch end -> Add. The Mul has a tensor operand, so
    TensorRT cannot fuse the Add into the conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.c1, self.b1 = nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)
        self.se = SqueezeExcite(C)
        self.head = nn.Conv2d(C, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        return self.head(F.relu(self.se(self.b1(self.c1(x))) + x))


class ChannelShuffleUnit(nn.Module):
    """ShuffleNetV2's stride-1 unit: chunk -> branch on one half -> concat -> view/transpose/view."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 2 * C, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C), nn.ReLU(),
                                    nn.Conv2d(C, C, 3, padding=1, groups=C, bias=False), nn.BatchNorm2d(C),
                                    nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C), nn.ReLU())
        self.head = nn.Conv2d(2 * C, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = F.relu(self.stem(x)).chunk(2, dim=1)
        y = torch.cat((a, self.branch(b)), 1)
        n, c, hh, ww = y.size()
        y = y.view(n, 2, c // 2, hh, ww).transpose(1, 2).contiguous().view(n, -1, hh, ww)
        return self.head(y)


FUSIBLE: dict[str, Callable[[], nn.Module]] = {
    "out += identity": lambda: Block("+="),
    "torch.add(a, b)": lambda: Block("torch.add"),
    "a.add(b)": lambda: Block("a.add(b)"),
    "a.add_(b)": lambda: Block("a.add_(b)"),
    "torch.add(a, b, alpha=1)": lambda: Block("alpha=1"),
    "identity + out": lambda: Block("identity + out"),
    "StochasticDepth module": lambda: Block(tail=torchvision.ops.StochasticDepth(0.2, "row")),
    "stochastic_depth function": lambda: Block(tail=FunctionalTail("stochastic_depth")),
    "Dropout module": lambda: Block(tail=nn.Dropout(0.2)),
    "F.dropout": lambda: Block(tail=FunctionalTail("dropout")),
    "Identity module": lambda: Block(tail=nn.Identity()),
    "DropPath (timm style)": lambda: Block(tail=DropPath(0.1)),
    "Hardswish in branch": lambda: Block(act=nn.Hardswish),
    "SiLU in branch": lambda: Block(act=nn.SiLU),
    "x * sigmoid(x) at branch end": lambda: Block(tail=SwishWritten()),
    "x * relu6(x + 3) / 6 at branch end": lambda: Block(tail=HardSwishWritten()),
    "SE Mul inside branch (SiLU)": lambda: InvertedResidualSE(nn.SiLU),
    "SE Mul inside branch (Hardswish)": lambda: InvertedResidualSE(nn.Hardswish),
    "ConvNeXt channels-first layer scale": ConvNeXtChannelsFirst,
}
NOT_FUSIBLE: dict[str, Callable[[], nn.Module]] = {
    "SE-scaled branch end": SEScaledEnd,
    "ConvNeXt Linear on permuted tensor": ConvNeXtLinear,
    "channel shuffle (concat, no Add)": ChannelShuffleUnit,
}


# --- helpers -------------------------------------------------------------------------------------
def _placed(make: Callable[[], nn.Module], train: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = make().train(train)
    trtquant.quantize(model)
    return model.eval()


def _residual_quantizers(model: nn.Module) -> list[str]:
    return [e["quantizer"] for e in placement_report(model)["quantizers"]
            if e["quantizer"].rsplit(".", 1)[-1].startswith("residual_quantizer")]


def _ancestors(n: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [n]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def _assert_on_identity(model: nn.Module, name: str) -> None:
    """The residual quantizer reads the identity: the Add's other input is computed from it."""
    graph = trace_quantized(model)
    reads = quantizer_inputs(model, graph)[name]
    assert len(reads) == 1 and reads[0] is not None
    q_node = next(n for n in graph.nodes if n.op == "call_module" and n.target == name)
    (add,) = q_node.users
    other = next(a for a in add.args[:2] if isinstance(a, fx.Node) and a is not q_node)
    assert reads[0] in _ancestors(other), f"{name} reads {reads[0]}, which the branch {other} does not come from"


def _export_check(model: nn.Module, path: str, exporter: str = "legacy"):
    data = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    trtquant.calibrate(model, data, method="max", progress=False)
    export_onnx(model, data[0], path, exporter=exporter)
    return check_onnx(path), GraphIndex(onnx.load(path))


def _onnx_identity_quantized(index: GraphIndex) -> list[tuple[bool, bool]]:
    """Per residual Add of the exported graph: (identity behind a DQ, branch behind a DQ)."""
    dag = OnnxDag(index)
    out = []
    for i in range(len(index.nodes)):
        split = residual_split(dag, i) if dag.op(i) == "Add" else None
        if split is not None:
            qs = dag.input_quantizers(i)
            out.append((qs[split.identity] is not None, qs[split.branch] is not None))
    return out


# --- tests ---------------------------------------------------------------------------------------
class Chain(nn.Module):
    """Every block on the same input, outputs concatenated: one export checks them all."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x).flatten(1) for b in self.blocks], 1)


@pytest.mark.parametrize("name", list(FUSIBLE))
def test_fusible_pattern_puts_the_residual_quantizer_on_the_identity(name):
    model = _placed(FUSIBLE[name])
    (q,) = _residual_quantizers(model)
    _assert_on_identity(model, q)


@pytest.mark.parametrize("name", ["DropPath (timm style)", "ConvNeXt channels-first layer scale",
                                  "stochastic_depth function"])
def test_train_mode_drop_path_is_seen_through(name):
    """Placed in train mode (QAT), fx traces the drop-path mask: a shape-only Mul, not the branch end."""
    model = _placed(FUSIBLE[name], train=True)
    (q,) = _residual_quantizers(model)
    _assert_on_identity(model, q)


def test_exported_fusible_patterns_have_the_identity_quantized_and_no_c20(tmp_path):
    """(b) for every fusible pattern at once: each block's residual Add reads its identity through a
    Q/DQ pair and its branch without one, and the checker has no C20 warning."""
    names = list(FUSIBLE)
    model = _placed(lambda: Chain([FUSIBLE[n]() for n in names]))
    quantizers = _residual_quantizers(model)
    assert [q.split(".")[1] for q in quantizers] == [str(i) for i in range(len(names))]
    report, index = _export_check(model, str(tmp_path / "m.onnx"))
    assert not report.errors, report.format_table()
    assert "C20-residual-add" not in report.rules(), report.format_table()
    assert _onnx_identity_quantized(index) == [(True, False)] * len(names)


def test_dynamo_export_keeps_the_identity_quantizer(tmp_path):
    """The torch.export-based exporter spells SiLU, SE and StochasticDepth its own way; same result."""
    model = _placed(FUSIBLE["SE Mul inside branch (SiLU)"])
    report, index = _export_check(model, str(tmp_path / "m.onnx"), exporter="dynamo")
    assert not report.errors, report.format_table()
    assert "C20-residual-add" not in report.rules(), report.format_table()
    assert _onnx_identity_quantized(index) == [(True, False)]


def test_non_fusible_adds_get_no_residual_quantizer_and_no_warning(tmp_path):
    model = _placed(lambda: Chain([make() for make in NOT_FUSIBLE.values()]))
    assert _residual_quantizers(model) == []
    report, index = _export_check(model, str(tmp_path / "m.onnx"))
    assert not report.errors, report.format_table()
    assert not report.rules() & {"C20-residual-add", "C21-concat"}, report.format_table()
    assert _onnx_identity_quantized(index) == []


def test_add_with_out_argument_is_placed_but_only_dynamo_exports_it():
    """fx records ``torch.add(a, b, out=buf)`` as an add with an ``out`` keyword: placement quantizes
    the identity; the TorchScript (legacy) exporter rejects ``out=`` whatever trtquant does."""
    model = _placed(lambda: Block("out="))
    (q,) = _residual_quantizers(model)
    _assert_on_identity(model, q)
    with pytest.raises(Exception, match="add"):
        torch.onnx.export(Block("out=").eval(), (torch.randn(1, 3, 16, 16),), io.BytesIO(), dynamo=False)


def test_both_adapters_agree_on_every_pattern():
    """The float models, plainly traced and exported: placement's and the checker's choices match."""
    for name, make in {**FUSIBLE, **NOT_FUSIBLE}.items():
        torch.manual_seed(0)
        model = make().eval()
        graph = fx.Tracer().trace(model)
        fdag = FxDag(graph, dict(model.named_modules()))
        fx_choice = [(s.identity, fdag.op(s.source)) for n in graph.nodes
                     if fdag.op(n) == "Add" and (s := residual_split(fdag, n)) is not None]
        buf = io.BytesIO()
        torch.onnx.export(model, (torch.randn(1, 3, 16, 16),), buf, opset_version=17, dynamo=False)
        odag = OnnxDag(GraphIndex(onnx.load_from_string(buf.getvalue())))
        onnx_choice = [(s.identity, odag.op(s.source)) for i in range(len(odag.g.nodes))
                       if odag.op(i) == "Add" and (s := residual_split(odag, i)) is not None]
        assert [op for _, op in fx_choice] == (["Conv"] if name in FUSIBLE else []), name
        assert fx_choice == onnx_choice, f"{name}: fx {fx_choice} vs ONNX {onnx_choice}"


def test_fx_constants_and_self_gated_activations():
    """The two fx readings the patterns rely on, on one graph: parameters reshaped and shape-only masks
    are constants (their Mul is an Affine step), ``x * sigmoid(x)`` is one SelfGated activation."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.gamma = nn.Parameter(torch.ones(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            y = y * self.gamma.reshape(1, -1, 1, 1)
            y = y * torch.sigmoid(y)
            mask = y.new_empty((y.shape[0], 1, 1, 1)).bernoulli_(0.9)
            return y * mask, y * torch.sigmoid(self.conv(x))

    m = M()
    graph = fx.Tracer().trace(m)
    dag = FxDag(graph, dict(m.named_modules()))
    muls = [n for n in graph.nodes if n.op == "call_function" and n.target.__name__ == "mul"]
    assert [dag.op(n) for n in muls] == ["Affine", "SelfGated", "Affine", "Mul"]
    assert is_constant(muls[0].args[1]) and not is_constant(muls[0].args[0])
    assert dag.inputs(muls[1]) == [muls[0]]  # the gate is part of the activation, not a second input
    conv = next(n for n in graph.nodes if n.op == "call_module")
    from trtquant.graph.dag import weighted_source

    assert weighted_source(dag, muls[2]) is conv  # Affine (mask) -> SelfGated -> Affine (scale) -> conv
    assert weighted_source(dag, muls[3]) is None  # a Mul of two tensors ends the epilogue


def test_functional_conv_branch_is_a_residual_branch(tmp_path):
    """``x + bn(F.conv2d(x, self.weight))``: the functional rule quantizes the call, so the Add gets its identity
    quantizer like a module conv's (Conv+Add fuses in INT8), and the checker agrees (no C20)."""
    import torch.nn.functional as F

    from trtquant.export import check_onnx, export_onnx
    from trtquant.placement import rules as R
    from trtquant.placement.fx_pass import placement_report

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(8, 8, 3, padding=1)
            self.weight = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            return torch.relu(x + self.bn(F.conv2d(x, self.weight, padding=1)))

    torch.manual_seed(0)
    model = trtquant.quantize(nn.Sequential(Block()).eval())
    rules = {e["quantizer"]: e["rule"] for e in placement_report(model)["quantizers"] if e["enabled"]}
    assert sum(r == R.RULE_RESIDUAL for r in rules.values()) == 1, rules
    x = torch.randn(2, 8, 8, 8)
    trtquant.calibrate(model, [x], method="max", progress=False)
    export_onnx(model, x, tmp_path / "m.onnx", exporter="legacy")
    report = check_onnx(str(tmp_path / "m.onnx"))
    assert not report.errors and not [f for f in report.findings if f.rule == "C20-residual-add"], report.format_table()
