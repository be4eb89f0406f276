"""The ONNX Runtime flavour of a quantized model: what export_onnx(target='onnxruntime') computes.

The ONNX Runtime INT8 graph differs from the TensorRT one in three exact, deliberate ways, and
``ort_flavor_`` makes a PyTorch copy compute the same thing op for op (the copy is what is exported,
and what parity tests compare ONNX Runtime against):

* observe-only quantizers (the conv branch of residual Adds) quantize: QLinearAdd needs both scales;
* Conv+BN are folded into int8 weight codes with int32-grid biases;
* activation quantizers whose input is non-negative by construction (after ReLU/ReLU6/Clip(min>=0),
  through MaxPool/AvgPool/Flatten/...) become unsigned 8-bit with the same amax: [0, 255] codes with
  zero point 0. ONNX Runtime then deletes the ReLU/Clip (the integer output Q clamps at 0, and at
  amax <= the Clip's max) instead of running a float DQ -> ReLU -> Q island per activation.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import ExportError
from ..placement.ort_observers import OUTPUT_OBSERVER, covering_quantizers
from ..quantizer import TensorQuantizer


def ort_flavor_(model: nn.Module, example_inputs: Any = None) -> nn.Module:
    """Make ``model`` (in place) compute what its ONNX Runtime INT8 graph computes; returns it.

    ``example_inputs`` (a tensor or a tuple of positional arguments): for a model torch.fx cannot trace,
    one run on them decides which conv output observers the graph needs (:func:`output_observers_needed`);
    without them such a model's observers stay off.
    """
    if getattr(model, "_trtquant_ort_flavor", False):
        return model  # already flavoured: folding BatchNorm twice would be wrong
    missing, observers = [], []
    for name, q in model.named_modules():
        if not (isinstance(q, TensorQuantizer) and q.ort_only and q.is_enabled):
            continue
        if name.endswith(OUTPUT_OBSERVER):
            observers.append((name, q))  # decided below, once the quantizers after them are known
            continue
        if q.amax is None:
            missing.append(name)
        q.enable_quant()
    unsigned_nonnegative_inputs_(model)
    needed = output_observers_needed(model, example_inputs) if observers and not missing else set()
    for name, q in observers:
        if name not in needed:
            q.disable()  # the conv gets its output Q from the quantizer after it (copied up in the graph)
            continue
        if q.amax is None:
            missing.append(name)
        q.enable_quant()
    if missing:
        raise ExportError(f"the ONNX Runtime graph needs amax for {', '.join(missing[:10])}: calibrate the model "
                          "after trtquant.quantize (these observe-only quantizers calibrate with the others)")
    _emulate_int32_bias_(model)
    model._trtquant_ort_flavor = True
    return model


def _scale_key(m: TensorQuantizer) -> Optional[tuple]:
    """After calibration, quantizers of one scale give one Q: (amax, unsigned); None when uncalibrated."""
    return None if m.amax is None else (float(m.amax.reshape(-1)[0]), bool(m.unsigned))


def output_observers_needed(model: nn.Module, example_inputs: Any = None) -> Set[str]:
    """Output observers (:func:`~trtquant.placement.ort_observers.add_output_observers_`) whose conv has
    no output Q without them.

    A conv is covered when every path from its output (after its BatchNorm) goes through ops the graph
    copies a Q through (ReLU, MaxPool, Concat, zero Pad, reshapes) into quantizers of one scale: then
    that Q moves up to the conv. Otherwise its own observer gives it one. A model torch.fx cannot trace
    (a detection head looping over FPN levels) is asked the same question of its run-time dataflow on
    ``example_inputs`` (:func:`~trtquant.placement.dataflow.record_dataflow`); without them: none.
    """
    from ..placement.fx_pass import trace_quantized

    observers = {name for name, m in model.named_modules() if name.endswith(OUTPUT_OBSERVER)
                 and isinstance(m, TensorQuantizer) and m.ort_only}
    if not observers:
        return set()
    try:
        graph = trace_quantized(model)
    except Exception:
        return _observers_needed_at_run_time(model, observers, example_inputs)
    modules = dict(model.named_modules())
    needed = set()
    for n in graph.nodes:
        if n.op != "call_module":
            continue
        target = str(n.target)
        name = f"{target}.{OUTPUT_OBSERVER}"
        if name not in observers:
            continue
        scales = covering_quantizers(n, modules, _scale_key)
        if scales is None or len(scales) != 1:
            needed.add(name)
    return needed


def _observers_needed_at_run_time(model: nn.Module, observers: Set[str], example_inputs: Any) -> Set[str]:
    """:func:`output_observers_needed` on the dataflow of one run (an observer its run never calls: not needed)."""
    if example_inputs is None:
        return set()
    from ..placement.dataflow import record_dataflow

    flow = record_dataflow(model, example_inputs)
    needed = set()
    for name in observers:
        scales: Optional[Set] = set()
        for seen in flow.seen_by.get(name, []):  # a head's conv: one call per FPN level, each must be covered
            below = flow.covering(seen, _scale_key)
            scales = None if below is None or scales is None else scales | below
        if name in flow.seen_by and (scales is None or len(scales) != 1):
            needed.add(name)
    return needed


def _emulate_int32_bias_(model: nn.Module) -> None:
    """Make this (exported) copy compute what the ONNX Runtime INT8 graph computes, op for op.

    That graph folds BatchNorm into the int8 weight codes (codes * sign(g), scale * |g|) and adds
    biases as int32 codes of s_in * s_w. Here each Conv+BN becomes one conv with those folded weights
    and the rounded bias (BN -> Identity), and Linear biases are rounded the same way.

    export_onnx(target='onnxruntime') exports this copy, so the folded weight must stay a per-channel
    weight Q/DQ: the weight quantizer stays enabled with an amax whose scale is the folded one, and the
    weight is codes * that scale (fake quant returns it unchanged). The graph rewrite then finds no BN
    and re-derives the same int8 codes and int32 bias codes, exactly; with the weight quantizer
    disabled the graph would carry float weights, which ONNX Runtime re-quantizes per tensor itself.
    """
    import numpy as np

    from ..functional import amax_to_scale, quant_bounds
    from ..nn.base import QuantMixin
    from .ort_graph import fold_bn_scale, int32_bias

    def scales(layer: nn.Module):
        """(input scale, weight scales: per channel or one) of a layer both of whose quantizers quantize
        (8-bit, per-tensor input), else None: exactly the layers whose bias the graph makes int32."""
        iq, wq = layer.input_quantizer, layer.weight_quantizer
        if not (iq.is_enabled and iq._if_quant and wq.is_enabled and wq._if_quant) or iq.amax is None or wq.amax is None \
                or iq.quant_desc.per_channel or iq.num_bits != 8 or wq.num_bits != 8:
            return None
        return (float(amax_to_scale(iq.amax, quant_bounds(8, iq.unsigned)[2]).reshape(())),
                amax_to_scale(wq.amax, quant_bounds(8, wq.unsigned, wq.narrow_range)[2]).reshape(-1).cpu().numpy())

    bn_folded: set = set()
    for root, graph in _traced_parts(model):
        modules = dict(root.named_modules())
        for n in graph.nodes:
            layer = modules.get(str(n.target)) if n.op == "call_module" else None
            if not isinstance(layer, QuantMixin) or not isinstance(layer, nn.modules.conv._ConvNd) or layer.transposed \
                    or scales(layer) is None:
                continue
            s_in, s_w = scales(layer)
            wq = layer.weight_quantizer
            users = list(n.users)
            bn_name = str(users[0].target) if len(users) == 1 and users[0].op == "call_module" else None
            bn = modules.get(bn_name) if bn_name else None
            w = layer.weight.detach().cpu().float()
            # A twin whose own forward transforms its weight (weight standardization) would transform a folded
            # weight again: its BatchNorm stays separate (only the bias goes onto the int32 grid below).
            transforms_weight = hasattr(layer, "weight_transformed") and layer.weight_transformed is not False
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats and bn.affine \
                    and not transforms_weight:
                qmin, qmax, bound = quant_bounds(wq.num_bits, wq.unsigned, wq.narrow_range)
                shape = [-1] + [1] * (w.dim() - 1)
                with torch.no_grad():
                    w_fq = wq(layer.weight.detach()).cpu().float()  # the fake-quant weight the model uses
                    codes = torch.round(w_fq / torch.from_numpy(s_w).reshape(shape))
                bias0 = None if layer.bias is None else layer.bias.detach().cpu().numpy()
                s_f, b_f, sign = fold_bn_scale(s_w, bn.weight.detach().cpu().numpy(), bn.bias.detach().cpu().numpy(),
                                               bn.running_mean.cpu().numpy(), bn.running_var.cpu().numpy(), bn.eps, bias0)
                # amax whose float32 scale (amax / bound) is s_f; where no float32 amax hits s_f exactly, the
                # nearest reachable scale is used on both sides (the graph exports this quantizer's scale).
                amax_f = _amax_for_scales(torch.from_numpy(s_f), bound)
                s_f = amax_to_scale(amax_f, bound).numpy()
                folded_codes = (codes * torch.from_numpy(sign.astype(np.float32)).reshape(shape)).clamp_(qmin, qmax)
                folded = folded_codes * torch.from_numpy(s_f).reshape(shape)
                b_codes, s_b = int32_bias(b_f, s_in, s_f, layer.weight[0].numel())
                with torch.no_grad():
                    layer.weight.data = folded.to(layer.weight.device)
                    bias = torch.from_numpy(b_codes.astype(np.float32) * s_b).to(layer.weight.device)
                    if layer.bias is None:
                        layer.bias = nn.Parameter(bias)
                    else:
                        layer.bias.data = bias
                    if not wq.quant_desc.per_channel:
                        # A per-tensor weight scale times |gamma| per channel is a per-channel scale: the
                        # folded weight is quantized along the output channels (the graph's weight DQ, axis 0).
                        wq.quant_desc = dataclasses.replace(wq.quant_desc, axis=0)
                    wq.amax = amax_f.reshape(shape)
                layer._wq_cache = None
                bn_folded.add(id(layer))
                parent, _, child = bn_name.rpartition(".")
                # The BatchNorm's output observer (if any) now quantizes the folded conv's output.
                setattr(root.get_submodule(parent) if parent else root, child, getattr(bn, OUTPUT_OBSERVER, nn.Identity()))
    # Every other Conv/Linear bias goes onto the int32 grid as the graph adds it (Conv/Gemm: int32 DQ;
    # a Linear on 3-D input, MatMul + Add: the rounded constant). This needs no graph.
    for layer in model.modules():
        if id(layer) in bn_folded or not isinstance(layer, QuantMixin) or getattr(layer, "bias", None) is None:
            continue
        if not (isinstance(layer, nn.Linear) or (isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed)):
            continue
        sc = scales(layer)
        if sc is None:
            continue
        b_codes, s_b = int32_bias(layer.bias.detach().cpu().numpy(), sc[0], sc[1], layer.weight[0].numel())
        with torch.no_grad():
            layer.bias.copy_(torch.from_numpy(b_codes.astype(np.float32) * s_b))


def _traced_parts(model: nn.Module) -> List[Tuple[nn.Module, fx.Graph]]:
    """(module, its torch.fx graph): the model, or where it does not trace, its largest submodules that do
    (a Conv's only reader inside one of them is its only reader in the model)."""
    from ..placement.fx_pass import trace_quantized, traceable_subtrees

    try:
        return [(model, trace_quantized(model))]
    except Exception:
        return [(root, graph) for _, root, graph, _ in traceable_subtrees(model) if graph is not None]


def _amax_for_scales(scale: torch.Tensor, bound: int) -> torch.Tensor:
    """float32 amax per element with amax_to_scale(amax, bound) == scale where one exists, else the nearest."""
    from ..functional import amax_to_scale

    target = scale.to(torch.float32)
    amax = target * bound
    for _ in range(4):
        got = amax_to_scale(amax, bound)
        step = torch.where(got < target, torch.full_like(amax, float("inf")), torch.full_like(amax, -float("inf")))
        amax = torch.where(got == target, amax, torch.nextafter(amax, step))
    # Among the candidates around the target keep the one whose scale is closest (exact where reachable).
    cands = torch.stack([torch.nextafter(amax, torch.full_like(amax, -float("inf"))), amax,
                         torch.nextafter(amax, torch.full_like(amax, float("inf")))])
    err = (amax_to_scale(cands, bound).double() - target.double()).abs()
    return cands.gather(0, err.argmin(0, keepdim=True)).squeeze(0)


# Ops whose output is >= 0 whatever their input, and ops that keep a non-negative input non-negative.
_NONNEG_MODULES = (nn.ReLU, nn.ReLU6)
_NONNEG_FUNCTIONS = {F.relu, F.relu6, torch.relu, torch.relu_}
_NONNEG_METHODS = {"relu", "relu_"}
_PRESERVING_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                       nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                       nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Flatten, nn.Identity, nn.Dropout,
                       TensorQuantizer)
_PRESERVING_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                         F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.dropout,
                         torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, operator.getitem}
_PRESERVING_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "contiguous", "permute", "transpose"}


_UNSET = object()


def _arg(n: fx.Node, name: str, position: int):
    return n.kwargs.get(name, n.args[position] if len(n.args) > position else _UNSET)


def _clamp_nonnegative(n: fx.Node, lo_name: str, hi_name: str, input_nonneg) -> bool:
    """clamp/hardtanh-like op: >= 0 iff its max is absent or a number >= 0, and its min a number >= 0 or
    its input non-negative (torch.clamp with min > max returns max)."""
    lo, hi = _arg(n, lo_name, 1), _arg(n, hi_name, 2)
    if hi is not _UNSET and hi is not None and not (isinstance(hi, (int, float)) and hi >= 0):
        return False
    if isinstance(lo, (int, float)) and not isinstance(lo, bool) and lo >= 0:
        return True
    return (lo is _UNSET or lo is None) and input_nonneg()


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
                      operator.irshift, operator.imatmul}
_KEEPS_NONNEG_INPLACE = (nn.ReLU, nn.ReLU6, nn.Dropout)


def _mutated(n: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    """Whether a user may overwrite ``n`` in place with values that can be negative."""
    for u in n.users:
        if not u.args or u.args[0] is not n:
            continue
        if u.op == "call_function":
            name = getattr(u.target, "__name__", "")
            if u.target in _INPLACE_OPERATORS or u.kwargs.get("inplace") is True or name.endswith("_"):
                if u.target not in (torch.relu_, F.relu, F.relu6, F.dropout):
                    return True
        elif u.op == "call_method" and str(u.target).endswith("_") and u.target != "relu_":
            return True
        elif u.op == "call_module":
            m = modules.get(str(u.target))
            if getattr(m, "inplace", False) and not isinstance(m, _KEEPS_NONNEG_INPLACE):
                if not (isinstance(m, nn.Hardtanh) and m.min_val >= 0):
                    return True
    return False


def _nonnegative(n: object, modules: Dict[str, nn.Module], memo: Dict[fx.Node, bool]) -> bool:
    """True when the value of fx node ``n`` is >= 0 for every input (structure, not observed data)."""
    if not isinstance(n, fx.Node):
        return False
    if n in memo:
        return memo[n]
    memo[n] = False  # cycles cannot occur in an fx graph; this only guards re-entry
    first = n.args[0] if n.args else None

    def input_nonneg() -> bool:
        return _nonnegative(first, modules, memo)

    result = False
    if n.op == "call_module":
        from ..nn.base import QuantInputMixin, QuantMixin

        m = modules.get(str(n.target))
        if isinstance(m, _NONNEG_MODULES):
            result = True
        elif isinstance(m, nn.Hardtanh):
            result = m.min_val >= 0 and m.max_val >= 0
        elif isinstance(m, _PRESERVING_MODULES) or (isinstance(m, QuantInputMixin) and not isinstance(m, QuantMixin)):
            result = input_nonneg()
    elif n.op == "call_function":
        if n.target in _NONNEG_FUNCTIONS:
            result = True
        elif n.target in (F.hardtanh, F.hardtanh_):
            lo, hi = _arg(n, "min_val", 1), _arg(n, "max_val", 2)
            lo = -1.0 if lo is _UNSET else lo
            hi = 1.0 if hi is _UNSET else hi
            result = isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo >= 0 and hi >= 0
        elif n.target in (torch.clamp, torch.clip):
            result = _clamp_nonnegative(n, "min", "max", input_nonneg)
        elif n.target in (torch.cat, torch.concat):
            result = isinstance(first, (list, tuple)) and all(_nonnegative(a, modules, memo) for a in first)
        elif n.target in _PRESERVING_FUNCTIONS:
            result = input_nonneg()
    elif n.op == "call_method":
        if n.target in _NONNEG_METHODS:
            result = True
        elif n.target in ("clamp", "clamp_", "clip", "clip_"):
            result = _clamp_nonnegative(n, "min", "max", input_nonneg)
        elif n.target in _PRESERVING_METHODS:
            result = input_nonneg()
    result = result and not _mutated(n, modules)
    memo[n] = result
    return result


def nonnegative_input_quantizers(model: nn.Module) -> Optional[Set[str]]:
    """Names of per-tensor activation quantizers that only ever see values >= 0; None if untraceable.

    A quantizer called at several sites must see non-negative values at all of them, and quantizers
    that read one tensor get one verdict (the ONNX Runtime graph has one output Q per tensor).
    """
    from ..placement.fx_pass import quantizer_inputs

    traced = quantizer_inputs(model)
    if traced is None:
        return None
    modules = dict(model.named_modules())
    memo: Dict[fx.Node, bool] = {}
    names = {name for name, inputs in traced.items() if all(_nonnegative(i, modules, memo) for i in inputs)}
    changed = True
    while changed:  # a signed reader of a tensor makes every reader of that tensor signed
        changed = False
        for name, inputs in traced.items():
            if name in names:
                continue
            for other, other_inputs in traced.items():
                if other in names and any(i is not None and i in other_inputs for i in inputs):
                    names.discard(other)
                    changed = True
    return names


def unsigned_nonnegative_inputs_(model: nn.Module) -> int:
    """Switch enabled per-tensor 8-bit activation quantizers with non-negative inputs to unsigned (same amax).

    Returns how many were switched. On the symmetric int8 grid half of the codes of a post-ReLU
    tensor are never used; unsigned keeps amax (the same clipping) with twice the resolution, and is
    what lets ONNX Runtime drop the activation op.
    """
    names = nonnegative_input_quantizers(model)
    if not names:
        return 0
    modules = dict(model.named_modules())
    switched = 0
    for name in sorted(names):
        q = modules.get(name)
        if not isinstance(q, TensorQuantizer) or not q.is_enabled or not q._if_quant or q.unsigned:
            continue
        d = q.quant_desc
        if d.per_channel or d.num_bits != 8 or q.amax is None:
            continue
        q.quant_desc = dataclasses.replace(d, unsigned=True)
        switched += 1
    return switched
