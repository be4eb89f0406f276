"""Observe-only quantizers on conv outputs, for the ONNX Runtime INT8 graph (export target 'onnxruntime').

ONNX Runtime runs a conv as an INT8 kernel only with a QuantizeLinear on its output. A conv followed by
ReLU/MaxPool/Concat into the next layer's input quantizer gets it from there (the graph copies that Q
up), but one followed by HardSwish, SiLU, a sigmoid gate, LayerNorm or a BatchNorm after a Concat
(DenseNet) has none: the observer placed here calibrates a scale for it. Like the residual branch
observers it never quantizes the fake-quant model or the TensorRT graph (``ort_only``);
:func:`trtquant.export.ort_flavor.ort_flavor_` switches on only those no later quantizer covers.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Hashable, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn.base import QuantInputMixin, QuantMixin
from ..quantizer import TensorQuantizer

#: Name of the observe-only quantizer :func:`add_output_observers_` puts on a conv's output (on its
#: BatchNorm when one follows); a forward hook calls it on the module's output.
OUTPUT_OBSERVER = "ort_output_quantizer"


def _observe_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the module's output through its :data:`OUTPUT_OBSERVER` (module-level, so a deep
    copy of the model calls its own observer)."""
    return getattr(module, OUTPUT_OBSERVER)(output)


def add_output_observers_(model: nn.Module, graph: "fx.Graph | None" = None) -> List[str]:
    """Give each quantized conv whose output no later quantizer covers an observe-only quantizer on its
    output (after its BatchNorm); returns their names.

    Covered (no observer): every path from the output reaches, through ops the graph copies a Q up
    through, quantizers that read one tensor (one quantizer, or one :class:`SharedQuantResult` group) -
    a ResNet gets none. Whether quantizers of several tensors agree on one scale is known only after
    calibration: those convs get an observer and :func:`~trtquant.export.ort_flavor.ort_flavor_` decides.
    Max statistics: the scale only sizes ONNX Runtime's conv output (no clipping wanted), and a histogram
    per conv output would add a large share to the calibration cost. ``graph``: the model's
    :func:`~trtquant.placement.fx_pass.trace_quantized` graph when the caller has it. A model that cannot
    be traced gets none.
    """
    from .fx_pass import trace_quantized

    if graph is None:
        try:
            graph = trace_quantized(model)
        except Exception:  # untraceable: no observers, the ONNX Runtime graph keeps those convs float
            return []
    modules = dict(model.named_modules())
    added = []
    for n in graph.nodes:
        layer = modules.get(str(n.target)) if n.op == "call_module" else None
        if not _observable_conv(layer):
            continue
        end_name, end = _epilogue_end(n, modules)
        if hasattr(end, OUTPUT_OBSERVER):
            continue
        end_node = next(iter(n.users)) if end is not layer else n
        readers = covering_quantizers(end_node, modules, _tensor_key, through_pools=True)
        if readers is not None and len(readers) == 1:
            continue
        _attach(end, layer)
        added.append(f"{end_name}.{OUTPUT_OBSERVER}" if end_name else OUTPUT_OBSERVER)
    return added


def _attach(end: nn.Module, layer: nn.Module) -> None:
    """An observe-only max quantizer on ``end``'s output, with ``layer``'s input format."""
    desc = dataclasses.replace(layer.input_quantizer.quant_desc, axis=None, unsigned=False, calib_method="max")
    observer = TensorQuantizer(desc)
    observer.disable_quant()
    observer.ort_only = True
    end.add_module(OUTPUT_OBSERVER, observer)
    end.register_forward_hook(_observe_output)


def _observable_conv(layer: nn.Module) -> bool:
    return isinstance(layer, QuantMixin) and isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed \
        and not layer.input_quantizer.quant_desc.is_fp8  # the ONNX Runtime target is INT8 only


def add_untraced_output_observers_(model: nn.Module, traced: List[str]) -> List[str]:
    """Output observers on the quantized convs outside every ``traced`` subtree (called from Python code
    torch.fx cannot trace, such as a detection head looping over FPN levels); returns their names.

    Their readers are unknown until the model runs: :func:`~trtquant.export.ort_flavor.ort_flavor_` keeps
    those its run-time dataflow leaves without an output Q (a head's final conv: a model output).
    """
    added = []
    for name, layer in model.named_modules():
        if not _observable_conv(layer) or hasattr(layer, OUTPUT_OBSERVER) or \
                any(name == t or name.startswith(t + ".") for t in traced):
            continue
        _attach(layer, layer)
        added.append(f"{name}.{OUTPUT_OBSERVER}")
    return added


def _epilogue_end(n: fx.Node, modules: Dict[str, nn.Module]) -> Tuple[str, nn.Module]:
    """(name, module) whose output is the conv's output in the ONNX Runtime graph: its BatchNorm if that is
    its only reader (folded into it there), else the conv itself."""
    users = list(n.users)
    if len(users) == 1 and users[0].op == "call_module" and isinstance(
            modules.get(str(users[0].target)), nn.modules.batchnorm._BatchNorm):
        return str(users[0].target), modules[str(users[0].target)]
    return str(n.target), modules[str(n.target)]


def gives_q(m: TensorQuantizer) -> bool:
    """Whether ``m`` puts a per-tensor Q into the ONNX Runtime graph (it quantizes, or observes for it)."""
    return m.is_enabled and (m._if_quant or m.ort_only) and not m.quant_desc.per_channel


def _tensor_key(m: TensorQuantizer) -> Hashable:
    """Quantizers reading one tensor share a result slot (placement's same-tensor groups): one scale."""
    return id(m.shared_result) if m.shared_result is not None else id(m)


_UNSET = object()

# Modules, functions and methods the ONNX Runtime graph copies an output Q up through (ops.ORT_OUTPUT_COPY
# and ORT_OUTPUT_COPY_MOVES in PyTorch spelling).
_COPY_MODULES = (nn.ReLU, nn.ReLU6, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Identity, nn.Dropout,
                 nn.ZeroPad2d)
_COPY_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.flatten,
                   torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose, torch.permute, torch.cat,
                   torch.concat, F.dropout}
_COPY_METHODS = {"relu", "flatten", "view", "reshape", "squeeze", "unsqueeze", "contiguous", "permute",
                 "transpose"}


def copies_q(n: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    if n.op == "call_module":
        m = modules.get(str(n.target))
        if isinstance(m, nn.ConstantPad2d):
            return float(m.value) == 0.0
        if type(m).__name__ == "StochasticDepth":  # torchvision.ops: the identity in eval (nothing exported)
            return not m.training
        return isinstance(m, _COPY_MODULES) or (isinstance(m, nn.Hardtanh) and m.min_val >= 0)
    if n.op == "call_function":
        if n.target is F.pad:
            mode = n.kwargs.get("mode", n.args[2] if len(n.args) > 2 else _UNSET)
            value = n.kwargs.get("value", n.args[3] if len(n.args) > 3 else _UNSET)
            return mode in (_UNSET, "constant") and value in (_UNSET, None, 0, 0.0)
        return n.target in _COPY_FUNCTIONS
    return n.op == "call_method" and n.target in _COPY_METHODS


def covering_quantizers(v: fx.Node, modules: Dict[str, nn.Module], key: Callable[[TensorQuantizer], Hashable],
                        depth: int = 0, through_pools: bool = False) -> Optional[Set[Hashable]]:
    """``key`` of each quantizer every path from ``v`` reaches through ops the ONNX Runtime graph copies a
    Q up through; None when a path reaches anything else (a float reader). ``key`` returns None for a
    quantizer that gives no Q there (disabled, per-channel, not calibrated): that path is float too.
    ``through_pools``: a QuantMaxPool whose quantizer is off counts as the copy op it is (the graph
    copies a Q up through a MaxPool that is its tensor's only reader, not one beside other readers)."""
    if depth > 64 or not v.users:
        return None
    found: Set[Hashable] = set()
    for u in v.users:
        m = modules.get(str(u.target)) if u.op == "call_module" else None
        if isinstance(m, QuantInputMixin) and u.args and u.args[0] is v and v not in u.args[1:]:
            if through_pools and len(v.users) == 1 and not m.input_quantizer.is_enabled and copies_q(u, modules):
                m = None  # a QuantMaxPool with its quantizer off (placement's MaxPool rule): a copy op
            else:
                m = m.input_quantizer  # a quantized layer reads v through its own input quantizer
        if isinstance(m, TensorQuantizer):
            k = None if str(u.target).endswith(OUTPUT_OBSERVER) or not gives_q(m) else key(m)
            if k is None:
                return None
            found.add(k)
            continue
        if not copies_q(u, modules):
            return None
        below = covering_quantizers(u, modules, key, depth + 1, through_pools)
        if below is None:
            return None
        found |= below
    return found


