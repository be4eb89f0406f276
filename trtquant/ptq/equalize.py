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

ReLU6 is not homogeneous (``relu6(x / s) != relu6(x) / s``): with ``relu6="skip"`` (default) such
chains are left alone, so the FP32 function is unchanged exactly; ``relu6="relu"`` replaces those
ReLU6 by ReLU and equalizes, as the paper did for MobileNetV2 (the FP32 function changes wherever an
activation exceeded 6).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, cast

import torch
from torch import Tensor, fx, nn

from ._graph import WEIGHTED, activation_kind, call_counts, module_of, require_uncalibrated, set_submodule, trace

logger = logging.getLogger(__name__)

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PASS_THROUGH = (nn.Identity, nn.Dropout)


@dataclass
class Chain:
    """``first -> activation -> second``: output channel i of ``first`` feeds input channel i of ``second``."""

    first: str
    second: str
    activation: Optional[str]  # 'relu', 'relu6' or None (a purely linear link)
    activation_node: Optional[str] = None


def fold_batchnorm_(model: nn.Module, graph: Optional[fx.Graph] = None) -> Dict[str, Tuple[Tensor, Tensor]]:
    """Fold every BatchNorm that is the only consumer of a Conv/Linear into it (BN replaced by Identity).

    Returns conv name -> (beta, |gamma|) of the folded BN: mean and spread of the pre-activation per
    channel, which high-bias absorption reads. Needs eval mode (running statistics).
    """
    graph = graph if graph is not None else trace(model)
    if graph is None:
        raise ValueError(f"fold_batchnorm_: torch.fx cannot trace {type(model).__name__}; fold its BatchNorms by hand")
    counts = call_counts(graph)
    stats: Dict[str, Tuple[Tensor, Tensor]] = {}
    for node in graph.nodes:
        bn: Any = module_of(model, node)
        if not isinstance(bn, _BN) or not bn.track_running_stats or bn.running_mean is None:
            continue
        src = node.args[0] if node.args else None
        conv: Any = module_of(model, src) if isinstance(src, fx.Node) else None
        if not isinstance(src, fx.Node) or not isinstance(conv, WEIGHTED) or len(src.users) != 1 or counts[str(src.target)] != 1 \
                or counts[str(node.target)] != 1:
            continue
        with torch.no_grad():
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
        stats[str(src.target)] = (beta.detach().clone(), gamma.detach().abs().clone())
        set_submodule(model, str(node.target), nn.Identity())
    return stats


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
            if kind is None and not isinstance(m, _PASS_THROUGH):
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
        if _out_channels(first) != _in_channels(second):
            continue
        chains.append(Chain(str(src.target), str(node.target), act, act_node))
    return chains


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


def _equalize_pair(first: Any, second: Any) -> Tensor:
    """Scale one pair in place; returns s (conv1's output channels were divided by it)."""
    groups = int(getattr(second, "groups", 1))
    r1 = first.weight.detach().abs().reshape(first.weight.shape[0], -1).amax(1).double()
    r2 = _in_view(second.weight.detach().abs(), groups).amax(1).double()
    s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 * r2) / r2.clamp_min(1e-30), torch.ones_like(r1))
    s = s.to(first.weight.dtype)
    _scale_out_(first, 1.0 / s)
    _scale_in_(second.weight, s, groups)
    return s


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
             relu6: str = "skip") -> List[Chain]:
    """Cross-layer equalization of every Conv/Linear -> [BN] -> ReLU/ReLU6 -> Conv/Linear chain, in place.

    Args:
        model: a float model in eval mode (or a quantized one before calibration); torch.fx must trace it.
        iterations: sweeps over all chains (a layer in two chains moves twice; the paper iterates to convergence).
        tol: stop when no scale in a sweep differs from 1 by more than this.
        absorb_bias: high-bias absorption from the folded BatchNorms' statistics (ReLU chains only).
        relu6: ``"skip"`` leaves ReLU6 chains untouched (exact); ``"relu"`` replaces their ReLU6 by ReLU and
            equalizes them (the paper's MobileNetV2 recipe; changes the function where activations exceed 6).

    Returns the chains that were equalized.
    """
    if relu6 not in ("skip", "relu"):
        raise ValueError(f"relu6 must be 'skip' or 'relu', got {relu6!r}")
    if model.training:
        raise ValueError(f"equalize folds BatchNorm running statistics: call {type(model).__name__}.eval() first")
    require_uncalibrated(model, "equalize")
    graph = trace(model)
    if graph is None:
        raise ValueError(f"equalize: torch.fx cannot trace {type(model).__name__}, so its Conv->ReLU->Conv chains are "
                         "unknown; make the forward traceable (no data-dependent control flow)")
    bn_stats = fold_batchnorm_(model, graph)
    graph = trace(model)
    assert graph is not None  # traced once already; folding only swapped leaves
    chains = find_chains(model, graph)
    if relu6 == "skip":
        skipped = [c for c in chains if c.activation == "relu6"]
        if skipped:
            logger.info("equalize: %d chain(s) through ReLU6 left alone (relu6='skip'): %s", len(skipped),
                        ", ".join(f"{c.first}->{c.second}" for c in skipped))
        chains = [c for c in chains if c.activation != "relu6"]
    else:
        for c in chains:
            if c.activation == "relu6":
                _relu6_to_relu(model, graph, c)
    for _ in range(iterations):
        worst = 0.0
        for c in chains:
            s = _equalize_pair(model.get_submodule(c.first), model.get_submodule(c.second))
            if c.first in bn_stats:
                beta, gamma = bn_stats[c.first]
                bn_stats[c.first] = (beta / s, gamma / s)
            worst = max(worst, float((s - 1).abs().max()))
        if worst <= tol:
            break
    if absorb_bias:
        for c in chains:
            if c.activation is not None and c.first in bn_stats and model.get_submodule(c.first).bias is not None:
                beta, gamma = bn_stats[c.first]
                _absorb_high_bias(model.get_submodule(c.first), model.get_submodule(c.second), beta, gamma)
    return chains


def _relu6_to_relu(model: nn.Module, graph: fx.Graph, chain: Chain) -> None:
    node = next(n for n in graph.nodes if n.name == chain.activation_node)
    if node.op != "call_module":
        raise ValueError(f"equalize(relu6='relu'): the ReLU6 before {chain.second} is a function call ({node.target}); "
                         "only nn.ReLU6 modules can be replaced - use nn.ReLU6 or relu6='skip'")
    set_submodule(model, str(node.target), nn.ReLU(inplace=getattr(model.get_submodule(str(node.target)), "inplace",
                                                                       False)))
    chain.activation = "relu"
