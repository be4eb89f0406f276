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
from typing import Dict, List, Tuple

import torch
from torch import fx, nn

from ..nn.base import QuantMixin
from ..quantizer import TensorQuantizer

#: Name of the observe-only quantizer :func:`add_output_observers_` puts on a conv's output (on its
#: BatchNorm when one follows); a forward hook calls it on the module's output.
OUTPUT_OBSERVER = "ort_output_quantizer"


def _observe_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the module's output through its :data:`OUTPUT_OBSERVER` (module-level, so a deep
    copy of the model calls its own observer)."""
    return getattr(module, OUTPUT_OBSERVER)(output)


def add_output_observers_(model: nn.Module, graph: "fx.Graph | None" = None) -> List[str]:
    """Give every quantized conv an observe-only quantizer on its output (after its BatchNorm); returns names.

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
        if not isinstance(layer, QuantMixin) or not isinstance(layer, nn.modules.conv._ConvNd) or layer.transposed:
            continue
        end_name, end = _epilogue_end(n, modules)
        if hasattr(end, OUTPUT_OBSERVER):
            continue
        desc = dataclasses.replace(layer.input_quantizer.quant_desc, axis=None, unsigned=False, calib_method="max")
        observer = TensorQuantizer(desc)
        observer.disable_quant()
        observer.ort_only = True
        end.add_module(OUTPUT_OBSERVER, observer)
        end.register_forward_hook(_observe_output)
        added.append(f"{end_name}.{OUTPUT_OBSERVER}" if end_name else OUTPUT_OBSERVER)
    return added


def _epilogue_end(n: fx.Node, modules: Dict[str, nn.Module]) -> Tuple[str, nn.Module]:
    """(name, module) whose output is the conv's output in the ONNX Runtime graph: its BatchNorm if that is
    its only reader (folded into it there), else the conv itself."""
    users = list(n.users)
    if len(users) == 1 and users[0].op == "call_module" and isinstance(
            modules.get(str(users[0].target)), nn.modules.batchnorm._BatchNorm):
        return str(users[0].target), modules[str(users[0].target)]
    return str(n.target), modules[str(n.target)]
