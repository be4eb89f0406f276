"""Cross-layer equalization (CLE) with BatchNorm folding and high-bias absorption.

Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction" (ICCV,
arXiv:1906.04721), section 4. For a chain ``conv1 -> [BN] -> ReLU -> conv2`` the ReLU is positively
homogeneous, so output channel ``i`` of conv1 may be divided by ``s_i > 0`` and input channel ``i`` of
conv2 multiplied by it without changing the function. With ``r1_i`` the range of conv1's output
channel ``i`` and ``r2_i`` the range of conv2's input channel ``i``, ``s_i = sqrt(r1_i * r2_i) / r2_i``
makes both ranges ``sqrt(r1_i * r2_i)``: per-tensor weight quantization then loses no channel to a
neighbour with a much larger range (the depthwise convs of MobileNet-style models are the case).

Runs on the FLOAT model, before :func:`trtquant.quantize` (or after it, before calibration): it edits
weights and biases only, so the exported TensorRT Q/DQ graph is the same graph with other numbers.
BatchNorms that follow a conv are folded into it first (TensorRT folds them too) and replaced by
``nn.Identity``; their statistics drive the high-bias absorption (section 4.1).

ReLU6 is not homogeneous (``relu6(x / s) != relu6(x) / s``), but ``relu6(x) / s = clamp(x / s, 0, 6 / s)``:
``relu6="clip"`` equalizes such chains exactly, with every ``s >= 1`` and a per-channel ceiling ``6 / s`` in the
folded BatchNorm's place (one ``Min`` per chain in the exported graph). ``relu6="skip"`` (default) leaves them
alone, so the exported graph is the same graph; ``relu6="relu"`` replaces those ReLU6 by ReLU, as the paper did
for MobileNetV2 (the FP32 function changes wherever an activation exceeded 6 - on EfficientNet-Lite0 that costs
KL 0.69 before any quantization, so prefer "clip").

Convs whose BatchNorm was folded but that start no equalized chain get their BatchNorm back: folding alone
widens the spread of per-channel ranges a per-tensor weight quantizer sees.

``batchnorm="keep"`` equalizes every conv against the BatchNorm it feeds instead of folding it: output channel
``i`` is divided by ``s_i = r_i / max(r)`` and the BatchNorm takes ``s_i`` back exactly (its running mean divided
by ``s_i``, its gamma multiplied by it; the variance and eps are untouched, so FP32 is unchanged to rounding). Every
weight row then spans the same range and a per-tensor weight quantizer loses no channel. The exported TensorRT
graph is the same Q/DQ Conv -> BatchNorm graph; TensorRT fuses the BatchNorm into the quantized conv after the
weight Q/DQ, keeping the unfused execution order (TensorRT developer guide, Q/DQ layer-placement
recommendations: BN folding need not be simulated). In the engine the per-tensor weight scale times the
BatchNorm gain is then a per-output-channel scale: per-channel accuracy where only a per-tensor weight scale
is accepted, not a new kernel. Chains without a BatchNorm still get
classic CLE. The BatchNorm's running statistics no longer describe the conv's raw output: train mode (QAT) would
renormalize them, so run it before calibration and export, not before training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, cast

import torch
from torch import Tensor, fx, nn

from ._graph import (WEIGHTED, activation_kind, batchnorm_after, call_counts, module_of, require_uncalibrated,
                     set_submodule, trace)

logger = logging.getLogger(__name__)

_PASS_THROUGH = (nn.Identity, nn.Dropout)


def _passes_through(m: Any) -> bool:
    """Identity, Dropout (eval) and zero padding commute with a positive per-channel scale."""
    if isinstance(m, _PASS_THROUGH):
        return True
    pads = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
    return isinstance(m, pads) and float(m.value) == 0.0


@dataclass
class Chain:
    """``first -> activation -> second``: output channel i of ``first`` feeds input channel i of ``second``."""

    first: str
    second: str
    activation: Optional[str]  # 'relu', 'relu6' or None (a purely linear link)
    activation_node: Optional[str] = None


@dataclass
class _Folded:
    """What folding one BatchNorm changed, to put back when its conv ends up in no chain."""

    bn_name: str
    bn: nn.Module
    weight: Tensor
    bias: Optional[Tensor]


def fold_batchnorm_(model: nn.Module, graph: Optional[fx.Graph] = None) -> Dict[str, Tuple[Tensor, Tensor]]:
    """Fold every BatchNorm that is the only consumer of a Conv/Linear into it (BN replaced by Identity).

    Returns conv name -> (beta, |gamma|) of the folded BN: mean and spread of the pre-activation per
    channel, which high-bias absorption reads. Needs eval mode (running statistics).
    """
    return _fold_batchnorm(model, graph)[0]


def _fold_batchnorm(model: nn.Module, graph: Optional[fx.Graph]
                    ) -> Tuple[Dict[str, Tuple[Tensor, Tensor]], Dict[str, _Folded]]:
    graph = graph if graph is not None else trace(model)
    if graph is None:
        raise ValueError(f"fold_batchnorm_: torch.fx cannot trace {type(model).__name__}; fold its BatchNorms by hand")
    stats: Dict[str, Tuple[Tensor, Tensor]] = {}
    undo: Dict[str, _Folded] = {}
    for conv_name, (bn_name, bn) in batchnorm_after(model, graph).items():
        conv: Any = model.get_submodule(conv_name)
        with torch.no_grad():
            undo[conv_name] = _Folded(bn_name, bn, conv.weight.detach().clone(),
                                      None if conv.bias is None else conv.bias.detach().clone())
            std = torch.sqrt(cast(Tensor, bn.running_var) + bn.eps)
            gamma = bn.weight if bn.affine else torch.ones_like(std)
            beta = bn.bias if bn.affine else torch.zeros_like(std)
            k = gamma / std
            w = conv.weight
            w.mul_(k.view(-1, *([1] * (w.dim() - 1))).to(w.dtype))
            b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            new_b = beta + (b - bn.running_mean) * k
            if conv.bias is None:
                conv.bias = nn.Parameter(new_b.detach().to(w.dtype))
            else:
                conv.bias.copy_(new_b)
        stats[conv_name] = (beta.detach().clone(), gamma.detach().abs().clone())
        set_submodule(model, bn_name, nn.Identity())
    return stats, undo


@torch.no_grad()
def _unfold(model: nn.Module, conv_name: str, f: _Folded) -> None:
    conv: Any = model.get_submodule(conv_name)
    conv.weight.copy_(f.weight)
    if f.bias is None:
        conv.bias = None
    else:
        conv.bias.copy_(f.bias)
    set_submodule(model, f.bn_name, f.bn)


class ChannelCeiling(nn.Module):
    """``min(x, bound[c])`` per channel (dim 1): ReLU6 after an equalized conv stays exact.

    relu6(y) / s = clamp(y / s, 0, 6 / s): with every s >= 1 the ReLU6 that follows supplies the 0 and the
    ceiling 6 / s <= 6 is this module's. Exported as one ``Min`` with a [1, C, 1, 1] constant.
    """

    def __init__(self, bound: Tensor):
        super().__init__()
        self.register_buffer("bound", bound.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        b = cast(Tensor, self.bound)
        return torch.minimum(x, b.view(1, -1, *([1] * (x.dim() - 2))).to(x.dtype))


def find_chains(model: nn.Module, graph: fx.Graph) -> List[Chain]:
    """Conv/Linear pairs linked only through ReLU/ReLU6/Identity/Dropout nodes, each used once."""
    counts = call_counts(graph)
    chains: List[Chain] = []
    for node in graph.nodes:
        second = module_of(model, node)
        if not isinstance(second, WEIGHTED) or counts[str(node.target)] != 1 or not node.args:
            continue
        act: Optional[str] = None
        act_node: Optional[str] = None
        src = node.args[0]
        ok = True
        while isinstance(src, fx.Node):
            kind = activation_kind(model, src)
            m = module_of(model, src)
            if kind is None and not _passes_through(m):
                break
            if len(src.users) != 1 or (kind is not None and act is not None):
                ok = False
                break
            if kind is not None:
                act, act_node = kind, src.name
            src = src.args[0] if src.args else None
        first = module_of(model, src) if ok and isinstance(src, fx.Node) else None
        if not isinstance(src, fx.Node) or not isinstance(first, WEIGHTED) or len(src.users) != 1 or counts[str(src.target)] != 1:
            continue
        if _out_channels(first) != _in_channels(second) or not _scales_linearly(first) \
                or not _scales_linearly(second):
            continue
        chains.append(Chain(str(src.target), str(node.target), act, act_node))
    return chains


_BASE_FORWARD = {cls: cls.forward for cls in WEIGHTED}


@torch.no_grad()
def _scales_linearly(m: Any) -> bool:
    """True when the layer's output channel ``o`` is linear in ``weight[o]`` and input channel ``i`` enters through
    ``weight[:, i]`` - true of nn.Conv*d/nn.Linear, and checked numerically for subclasses with their own
    ``forward`` (TF-style "same" padding passes; weight standardization, which undoes any rescaling, does not)."""
    base = next(c for c in WEIGHTED if isinstance(m, c))
    if type(m).forward is _BASE_FORWARD[base]:
        return True
    w = m.weight
    if isinstance(m, nn.Linear):
        x = torch.randn(2, w.shape[1], dtype=w.dtype, generator=torch.Generator().manual_seed(0))
    else:
        k = max(int(v) for v in m.kernel_size)
        x = torch.randn(1, _in_channels(m), *([2 * k + 3] * (w.dim() - 2)), dtype=w.dtype,
                        generator=torch.Generator().manual_seed(0))
    bias = m.bias.detach().clone() if m.bias is not None else None
    orig = w.detach().clone()
    try:
        if bias is not None:
            m.bias.zero_()
        y1 = m(x)
        k_out = torch.linspace(0.5, 2.0, w.shape[0], dtype=w.dtype).view(-1, *([1] * (w.dim() - 1)))
        w.mul_(k_out)
        y2 = m(x)
        shape = [1, -1] + [1] * (y1.dim() - 2) if not isinstance(m, nn.Linear) else [1, -1]
        return bool(torch.allclose(y2, y1 * k_out.view(shape), rtol=1e-4, atol=1e-5))
    except Exception:  # a forward that cannot run on a probe input: not rescaled
        return False
    finally:
        w.copy_(orig)
        if bias is not None:
            m.bias.copy_(bias)


def _out_channels(m: Any) -> int:
    return int(m.weight.shape[0])


def _in_channels(m: Any) -> int:
    return int(m.weight.shape[1]) * int(getattr(m, "groups", 1))


def _in_view(w: Tensor, groups: int) -> Tensor:
    """``w`` as [in_channels, everything that input channel touches] (grouped and depthwise convs too)."""
    out_c, cpg = w.shape[0], w.shape[1]
    v = w.reshape(groups, out_c // groups, cpg, -1).permute(0, 2, 1, 3)
    return v.reshape(groups * cpg, -1)


def _scale_in_(w: Tensor, s: Tensor, groups: int) -> None:
    out_c, cpg = w.shape[0], w.shape[1]
    w.view(groups, out_c // groups, cpg, -1).mul_(s.view(groups, 1, cpg, 1).to(w.dtype))


def _scale_out_(m: Any, inv: Tensor) -> None:
    m.weight.mul_(inv.view(-1, *([1] * (m.weight.dim() - 1))).to(m.weight.dtype))
    if m.bias is not None:
        m.bias.mul_(inv.to(m.bias.dtype))


#: A channel whose weight range is below this fraction of its layer's largest is left unscaled (dead).
DEAD = 1e-4


def _equalize_pair(first: Any, second: Any, at_least_one: bool = False, total: Optional[Tensor] = None,
                   max_scale: float = float("inf")) -> Tensor:
    """Scale one pair in place; returns s (conv1's output channels were divided by it).

    ``at_least_one``: divide s by its smallest entry so every s >= 1 (a ReLU6 chain: the ceiling 6 / s must not
    exceed 6). One common factor changes no per-tensor range ratio, so the equalization is the same.
    """
    groups = int(getattr(second, "groups", 1))
    r1 = first.weight.detach().abs().reshape(first.weight.shape[0], -1).amax(1).double()
    r2 = _in_view(second.weight.detach().abs(), groups).amax(1).double()
    # A channel with (almost) no weight is dead: its output is its bias, which rescaling would blow up.
    live = (r1 > DEAD * r1.max()) & (r2 > DEAD * r2.max())
    s = torch.where(live, torch.sqrt(r1 * r2) / r2.clamp_min(1e-30), torch.ones_like(r1))
    if at_least_one:
        s = s / s.min()
    if total is not None:  # keep the pair's accumulated scale within [1 / max_scale, max_scale] ([1, ...] for ReLU6)
        t = total.to(s.dtype)
        s = (t * s).clamp(1.0 if at_least_one else 1.0 / max_scale, max_scale) / t
    s = s.to(first.weight.dtype)
    _scale_out_(first, 1.0 / s)
    _scale_in_(second.weight, s, groups)
    return s


@torch.no_grad()
def _normalize_into_batchnorm(model: nn.Module, graph: fx.Graph) -> List[Chain]:
    """Divide each output channel of every Conv/Linear that feeds only an affine BatchNorm by ``r_i / max(r)``
    and let the BatchNorm multiply it back (running_mean / s, gamma * s): exact, eps included."""
    pairs: List[Chain] = []
    for conv_name, (bn_name, bn) in batchnorm_after(model, graph).items():
        conv: Any = model.get_submodule(conv_name)
        if not bn.affine or not _scales_linearly(conv) or _out_channels(conv) != bn.num_features:
            continue
        w = conv.weight
        r = w.detach().abs().reshape(w.shape[0], -1).amax(1).double()
        live = r > DEAD * r.max()  # a dead row stays as it is (s = 1): its output is its bias
        s = torch.where(live, r / r.max(), torch.ones_like(r))
        _scale_out_(conv, (1.0 / s).to(w.dtype))
        rm = bn.running_mean
        rm.copy_((rm.double() / s).to(rm.dtype))
        bn.weight.copy_((bn.weight.double() * s).to(bn.weight.dtype))
        pairs.append(Chain(conv_name, bn_name, None))
    return pairs


def _absorb_high_bias(first: Any, second: Any, beta: Tensor, gamma: Tensor) -> Tensor:
    """Section 4.1: move c = max(0, beta - 3 gamma) of conv1's bias through the ReLU into conv2's bias.

    Exact where the pre-activation stays above c (about 99.9 % of a Gaussian's mass) and away from
    conv2's zero padding, where the paper's approximation applies.
    """
    c = (beta - 3 * gamma).clamp_min(0).to(first.weight.dtype)
    if not bool((c > 0).any()):
        return c
    groups = int(getattr(second, "groups", 1))
    w2 = second.weight.detach()
    out_c, cpg = w2.shape[0], w2.shape[1]
    wsum = w2.reshape(out_c, cpg, -1).sum(-1)  # [out, cpg]
    delta = (wsum.view(groups, out_c // groups, cpg) * c.view(groups, 1, cpg)).sum(-1).reshape(out_c)
    first.bias.sub_(c)
    if second.bias is None:
        second.bias = nn.Parameter(delta.clone())
    else:
        second.bias.add_(delta.to(second.bias.dtype))
    return c


@torch.no_grad()
def equalize(model: nn.Module, iterations: int = 20, tol: float = 1e-6, absorb_bias: bool = True,
             relu6: str = "skip", max_scale: float = 16.0, batchnorm: str = "keep") -> List[Chain]:
    """Cross-layer equalization of every Conv/Linear -> [BN] -> ReLU/ReLU6 -> Conv/Linear chain, in place.

    Args:
        model: a float model in eval mode (or a quantized one before calibration); torch.fx must trace it.
        iterations: sweeps over all chains (a layer in two chains moves twice; the paper iterates to convergence).
        tol: stop when no scale in a sweep differs from 1 by more than this.
        max_scale: bound on each channel's accumulated scale (within [1 / max_scale, max_scale]): a nearly dead
            channel would otherwise be scaled without limit, and the activation range grows with 1 / s.
        absorb_bias: high-bias absorption from the folded BatchNorms' statistics (ReLU chains only).
        relu6: ``"skip"`` leaves ReLU6 chains untouched (exact, same graph); ``"clip"`` equalizes them exactly
            with every scale >= 1 and a per-channel ceiling 6 / s (:class:`ChannelCeiling`, one ``Min`` per chain
            in the exported graph) where the folded BatchNorm was; ``"relu"`` replaces their ReLU6 by ReLU (the
            paper's MobileNetV2 recipe; changes the function wherever an activation exceeded 6).
        batchnorm: ``"fold"`` (the paper) folds each BatchNorm into its conv and equalizes conv against conv;
            ``"keep"`` leaves the BatchNorms in the graph and equalizes each conv against its BatchNorm (every
            weight row to the same range; what per-tensor weights need on BatchNorm models - see the module
            docstring). With "keep", ``relu6`` and ``absorb_bias`` concern only the chains without a BatchNorm.

    Returns the chains that were equalized (with "keep", a conv->BatchNorm pair is a chain with no activation).
    """
    if relu6 not in ("skip", "relu", "clip"):
        raise ValueError(f"relu6 must be 'skip', 'clip' or 'relu', got {relu6!r}")
    if batchnorm not in ("fold", "keep"):
        raise ValueError(f"batchnorm must be 'fold' or 'keep', got {batchnorm!r}")
    if model.training:
        raise ValueError(f"equalize folds BatchNorm running statistics: call {type(model).__name__}.eval() first")
    require_uncalibrated(model, "equalize")
    graph = trace(model)
    if graph is None:
        raise ValueError(f"equalize: torch.fx cannot trace {type(model).__name__}, so its Conv->ReLU->Conv chains are "
                         "unknown; make the forward traceable (no data-dependent control flow)")
    if batchnorm == "keep":
        bn_stats: Dict[str, Tuple[Tensor, Tensor]] = {}
        folded: Dict[str, _Folded] = {}
    else:
        bn_stats, folded = _fold_batchnorm(model, graph)
        graph = trace(model)
        assert graph is not None  # traced once already; folding only swapped leaves
    chains = find_chains(model, graph)
    relu6_chains = [c for c in chains if c.activation == "relu6"]
    if relu6 == "skip" and relu6_chains:
        logger.info("equalize: %d chain(s) through ReLU6 left alone (relu6='skip'): %s", len(relu6_chains),
                    ", ".join(f"{c.first}->{c.second}" for c in relu6_chains))
        chains = [c for c in chains if c.activation != "relu6"]
    elif relu6 == "clip":
        no_slot = [c for c in relu6_chains if c.first not in folded]
        if no_slot:
            logger.info("equalize: %d ReLU6 chain(s) left alone: relu6='clip' puts the per-channel ceiling where the "
                        "folded BatchNorm was, and %s have none", len(no_slot), ", ".join(c.first for c in no_slot))
        chains = [c for c in chains if c not in no_slot]
    elif relu6 == "relu":
        chains = _replaceable_relu6(model, graph, chains)
        for c in chains:
            if c.activation == "relu6":
                _relu6_to_relu(model, graph, c)
    # A conv whose BatchNorm was folded but which starts no chain gets its BN back: folding alone changes what a
    # per-tensor weight quantizer sees (BN's per-channel gain widens the range spread) and buys nothing.
    firsts = {c.first for c in chains}
    for conv_name, f in folded.items():
        if conv_name not in firsts:
            _unfold(model, conv_name, f)
            bn_stats.pop(conv_name, None)
    totals = {c.first: torch.ones(_out_channels(model.get_submodule(c.first)), dtype=torch.float64) for c in chains}
    for _ in range(iterations):
        worst = 0.0
        for c in chains:
            s = _equalize_pair(model.get_submodule(c.first), model.get_submodule(c.second),
                               at_least_one=c.activation == "relu6", total=totals[c.first], max_scale=max_scale)
            totals[c.first] = totals[c.first] * s.double()
            if c.first in bn_stats:
                beta, gamma = bn_stats[c.first]
                bn_stats[c.first] = (beta / s, gamma / s)
            worst = max(worst, float((s - 1).abs().max()))
        if worst <= tol:
            break
    for c in chains:  # relu6(y) / S = min(y / S, 6 / S), then the model's own ReLU6
        if c.activation == "relu6":
            first: Any = model.get_submodule(c.first)
            bound = (6.0 / totals[c.first]).to(first.weight.dtype)
            set_submodule(model, folded[c.first].bn_name, ChannelCeiling(bound))
    if absorb_bias:
        for c in chains:
            if c.activation == "relu" and c.first in bn_stats and model.get_submodule(c.first).bias is not None:
                beta, gamma = bn_stats[c.first]
                _absorb_high_bias(model.get_submodule(c.first), model.get_submodule(c.second), beta, gamma)
    if batchnorm == "keep":  # last: a conv that is also the second layer of a chain above has its final columns
        chains = _normalize_into_batchnorm(model, graph) + chains
    return chains


def _replaceable_relu6(model: nn.Module, graph: fx.Graph, chains: List[Chain]) -> List[Chain]:
    """Drop ReLU6 chains whose nn.ReLU6 module is also called elsewhere (a model-wide ``self.act`` reused at the
    head): replacing the module would change those other call sites too."""
    in_chain = {c.activation_node for c in chains if c.activation == "relu6"}
    by_module: Dict[str, List[str]] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            by_module.setdefault(str(n.target), []).append(n.name)
    node_target = {n.name: str(n.target) for n in graph.nodes if n.op == "call_module"}
    keep: List[Chain] = []
    for c in chains:
        target = node_target.get(c.activation_node or "")
        if c.activation == "relu6" and target is not None and any(n not in in_chain for n in by_module[target]):
            logger.info("equalize: %s->%s left alone: its ReLU6 (%s) is also called outside an equalized chain",
                        c.first, c.second, target)
            continue
        keep.append(c)
    return keep


def _relu6_to_relu(model: nn.Module, graph: fx.Graph, chain: Chain) -> None:
    node = next(n for n in graph.nodes if n.name == chain.activation_node)
    if node.op != "call_module":
        raise ValueError(f"equalize(relu6='relu'): the ReLU6 before {chain.second} is a function call ({node.target}); "
                         "only nn.ReLU6 modules can be replaced - use nn.ReLU6 or relu6='skip'")
    set_submodule(model, str(node.target), nn.ReLU(inplace=getattr(model.get_submodule(str(node.target)), "inplace",
                                                                       False)))
    chain.activation = "relu"
