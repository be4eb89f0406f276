"""Graph queries shared by the PTQ steps: trace once with torch.fx, read producer/consumer links.

Quantized layers and quantizers are leaves (:func:`trtquant.placement.fx_pass.trace_quantized`), so the
same queries work on a float model and on one that :func:`trtquant.quantize` has already swapped.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..quantizer import TensorQuantizer

#: Weighted layers whose output channels (weight dim 0) the PTQ steps rescale.
WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def trace(model: nn.Module) -> Optional[fx.Graph]:
    """The model's fx graph, or None when torch.fx cannot trace it (data-dependent control flow).

    Conv/Linear layers are leaves even when they are subclasses with their own ``forward`` (TF-style "same"
    padding: pad, then ``F.conv2d`` with the module's weight): the PTQ steps rescale modules, so they must see
    the module, not the functional call inside it.
    """
    from ..placement.fx_pass import _QuantTracer, trace_recording

    class _LayerTracer(_QuantTracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, WEIGHTED) or super().is_leaf_module(m, qualname)

    try:
        return trace_recording(model, _LayerTracer())[0]
    except Exception:  # torch.fx raises many types (TraceError, TypeError, AttributeError...)
        return None


def module_of(model: nn.Module, node: fx.Node) -> Optional[nn.Module]:
    if node.op != "call_module":
        return None
    return model.get_submodule(str(node.target))


def activation_kind(model: nn.Module, node: fx.Node) -> Optional[str]:
    """'relu', 'relu6' or None for any other node."""
    m = module_of(model, node)
    if isinstance(m, nn.ReLU):
        return "relu"
    if isinstance(m, nn.Hardtanh) and float(m.min_val) == 0.0 and float(m.max_val) == 6.0:
        return "relu6"  # nn.ReLU6 is a Hardtanh(0, 6)
    if node.op == "call_function":
        if node.target in (F.relu, torch.relu):
            return "relu"
        if node.target is F.relu6:
            return "relu6"
        if node.target is F.hardtanh and tuple(node.args[1:3]) == (0.0, 6.0):
            return "relu6"
    if node.op == "call_method" and node.target == "relu":
        return "relu"
    return None


def call_counts(graph: fx.Graph) -> Dict[str, int]:
    """How often each submodule is called: a reused module cannot be rescaled for one call site."""
    counts: Dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            counts[str(n.target)] = counts.get(str(n.target), 0) + 1
    return counts


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def require_uncalibrated(model: nn.Module, step: str) -> None:
    """Steps that rewrite weights or input ranges must run before calibration: amax would be stale after."""
    stale = [n for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and m.amax is not None]
    if stale:
        raise ValueError(f"{step} changes weights and activation ranges, but {len(stale)} quantizer(s) already have "
                         f"an amax ({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}); run {step} before "
                         "trtquant.calibrate (on the float model or right after trtquant.quantize)")


def batchnorm_after(model: nn.Module, graph: fx.Graph) -> Dict[str, Tuple[str, Any]]:
    """Weighted layer name -> (name, module) of the BatchNorm that is its output's only consumer, both called
    once and the BN keeping running statistics: the pairs TensorRT fuses, which the PTQ steps fold, rescale or
    weigh together."""
    counts = call_counts(graph)
    pairs: Dict[str, Tuple[str, Any]] = {}
    for node in graph.nodes:
        bn: Any = module_of(model, node)
        if not isinstance(bn, BATCHNORMS) or not bn.track_running_stats or bn.running_mean is None:
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or not isinstance(module_of(model, src), WEIGHTED) or len(src.users) != 1 \
                or counts[str(src.target)] != 1 or counts[str(node.target)] != 1:
            continue
        pairs[str(src.target)] = (str(node.target), bn)
    return pairs


def batchnorm_gain(bn: Any) -> Tensor:
    """|gamma| / sqrt(var + eps) per channel: how much the BatchNorm scales an error in its input."""
    std = torch.sqrt(bn.running_var.detach().double() + bn.eps)
    gamma = bn.weight.detach().double() if bn.affine else torch.ones_like(std)
    return gamma.abs() / std
