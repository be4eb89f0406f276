"""SmoothQuant: move activation outliers of Linear inputs into the weights, before calibration.

Xiao et al. 2022, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models" (ICML 2023, arXiv:2211.10438). ``Y = X W^T = (X diag(s)^-1) (W diag(s))^T``: dividing input
channel ``j`` by ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` and multiplying weight column ``j`` by it
leaves the function unchanged and flattens the per-tensor activation range (a few outlier channels
no longer set the INT8 step for all of them); alpha moves difficulty between activations and weights.

Where the ``1/s`` goes (``fold``):

* folded (``"auto"`` where exact, ``"fold"``): into the producer of the Linear's input when it is a
  LayerNorm (gamma and beta divided by s) or a Linear (its output rows and bias divided by s) whose
  output feeds nothing but the smoothed Linears (found with torch.fx). Nothing is added to the graph:
  the TensorRT Q/DQ graph is the unsmoothed one with other weights. This is the path we choose.
* explicit ``Mul`` (``"auto"`` elsewhere, ``"mul"``): the Linear's ``input_quantizer.pre_quant_scale``,
  exported as ``Mul(x, 1/s)`` by a constant right before the input's QuantizeLinear. It is a standard
  ONNX op (no plugin) and ONNX Runtime runs it as such. TensorRT treats it as a pointwise layer; its
  pointwise fusion can merge it with the Q (and a preceding pointwise op such as GELU) but not into a
  LayerNorm or GEMM, so it may cost one extra pointwise kernel; this was not measured here (no GPU on
  the development machine), which is why folding is preferred wherever it is exact. Needed for BERT-style
  post-LN blocks, where the LayerNorm output also feeds the residual Add, and after GELU.

Runs BEFORE calibration: on the float model (folding only; ``"auto"`` skips non-foldable inputs with a
warning) or on the model returned by :func:`trtquant.quantize` (both paths). The input amax must be
computed from the smoothed activations, so a calibrated model is refused.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List, Optional, Union

import torch
from torch import Tensor, fx, nn

from ..calibrate import _model_device, _to_device, run_batch
from ..convert import Selector, _as_list, _matches
from ..nn.base import QuantMixin
from .bias_correction import float_mode
from ._graph import module_of, require_uncalibrated, trace

logger = logging.getLogger(__name__)


def _collect(model: nn.Module, names: List[str], batches: List[Any]) -> tuple:
    """Per-input-channel max|x| of each Linear, and which Linears read the very same tensor."""
    amax: Dict[str, Tensor] = {}
    reader: Dict[str, int] = {}
    first_pass: Dict[int, List[str]] = {}
    hooks = []
    state = {"batch": 0}
    alive: List[Tensor] = []  # first batch's inputs stay referenced, so no two tensors share an id()
    for n in names:
        def pre(mod: Any, args: Any, n: str = n) -> None:
            x = args[0].detach()
            a = x.abs().reshape(-1, x.shape[-1]).amax(0).float()
            amax[n] = torch.maximum(amax[n], a) if n in amax else a
            if state["batch"] == 0:
                if n in reader:  # one module called on several tensors: one scale cannot serve them all
                    reader[n] = -1
                    return
                alive.append(args[0])
                first_pass.setdefault(id(args[0]), []).append(n)
                reader[n] = id(args[0])
        hooks.append(model.get_submodule(n).register_forward_pre_hook(pre))
    device = _model_device(model)
    try:
        with torch.no_grad(), float_mode(model):
            for b in batches:
                run_batch(model, _to_device(b, device))
                state["batch"] += 1
    finally:
        for h in hooks:
            h.remove()
    reused = {n for n, r in reader.items() if r == -1}
    groups = [g for g in first_pass.values() if not reused.intersection(g)]
    return amax, groups, sorted(reused)


def _fold_target(model: nn.Module, graph: Optional[fx.Graph], group: List[str]) -> Optional[str]:
    """The LayerNorm/Linear whose output feeds exactly these Linears (and nothing else), or None."""
    if graph is None:
        return None
    calls = [n for n in graph.nodes if n.op == "call_module" and str(n.target) in group]
    if len(calls) != len(group) or any(not c.args or not isinstance(c.args[0], fx.Node) for c in calls):
        return None
    src = calls[0].args[0]
    if any(c.args[0] is not src for c in calls) or set(src.users) != set(calls):
        return None
    prod: Any = module_of(model, src)
    if isinstance(prod, nn.LayerNorm) and prod.elementwise_affine and prod.weight is not None:
        return str(src.target)
    if isinstance(prod, nn.Linear) and sum(1 for n in graph.nodes if n.op == "call_module"
                                           and n.target == src.target) == 1:
        return str(src.target)
    return None


@torch.no_grad()
def smooth_quant(model: nn.Module, data: Iterable[Any], alpha: float = 0.5,
                 include: Union[None, Selector, List[Selector]] = None,
                 exclude: Union[None, Selector, List[Selector]] = None, fold: str = "auto",
                 num_batches: Optional[int] = None) -> Dict[str, str]:
    """Smooth the inputs of the selected Linear layers in place; returns layer name -> where 1/s went.

    Args:
        model: float model, or quantized by :func:`trtquant.quantize` and not yet calibrated; eval mode.
        data: batches to measure max|X_j| on (the calibration set).
        alpha: migration strength in [0, 1]; 0.5 in the paper, larger for stronger outliers.
        include/exclude: module-name globs or types, as in :func:`trtquant.quantize`; default every
            Linear of a float model, every quantized Linear of a quantized one.
        fold: ``"auto"`` (fold where exact, else Mul), ``"fold"`` (fold only, skip the rest) or ``"mul"``.
        num_batches: use only the first batches of ``data``.

    The values of the returned dict are ``"folded into <module>"``, ``"mul"`` or ``"skipped (...)"``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if fold not in ("auto", "fold", "mul"):
        raise ValueError(f"fold must be 'auto', 'fold' or 'mul', got {fold!r}")
    require_uncalibrated(model, "smooth_quant")
    inc, exc = _as_list(include), _as_list(exclude)
    # Default on a quantized model: its quantized Linears (smoothing a float one gains nothing).
    quantized = any(isinstance(m, nn.Linear) and isinstance(m, QuantMixin) for m in model.modules())
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and (isinstance(m, QuantMixin) or not quantized or inc is not None)
             and (inc is None or _matches(n, m, inc)) and not (exc is not None and _matches(n, m, exc))]
    if not names:
        raise ValueError(f"smooth_quant: no nn.Linear selected in {type(model).__name__} (include={include!r}, "
                         f"exclude={exclude!r})")
    batches = list(data)[:num_batches] if num_batches is not None else list(data)
    if not batches:
        raise ValueError("smooth_quant: data yielded no batches")
    was_training = model.training
    model.eval()
    try:
        amax, groups, reused = _collect(model, names, batches)
    finally:
        model.train(was_training)
    graph = trace(model) if fold != "mul" else None
    report: Dict[str, str] = {n: "skipped (never ran on the data)" for n in names if n not in amax}
    report.update({n: "skipped (called more than once per forward)" for n in reused})
    grouped = {n for g in groups for n in g}
    report.update({n: "skipped (shares its input with a reused layer)" for n in amax if n not in grouped
                   and n not in report})
    for group in groups:
        linears: List[Any] = [model.get_submodule(n) for n in group]
        a = torch.stack([amax[n] for n in group]).amax(0)
        w = torch.stack([m.weight.detach().abs().amax(0).float() for m in linears]).amax(0)
        s = a.clamp_min(1e-5).pow(alpha) / w.clamp_min(1e-5).pow(1 - alpha)
        s = torch.where((a > 0) & (w > 0), s, torch.ones_like(s))
        target = _fold_target(model, graph, group)
        if target is not None:
            prod: Any = model.get_submodule(target)
            if isinstance(prod, nn.LayerNorm):
                prod.weight.div_(s.to(prod.weight.dtype))
                if prod.bias is not None:
                    prod.bias.div_(s.to(prod.bias.dtype))
            else:
                prod.weight.div_(s.view(-1, 1).to(prod.weight.dtype))
                if prod.bias is not None:
                    prod.bias.div_(s.to(prod.bias.dtype))
            how = f"folded into {target}"
        elif fold != "fold" and all(isinstance(m, QuantMixin) for m in linears):
            for m in linears:
                q = m.input_quantizer
                old = q.pre_quant_scale
                q.pre_quant_scale = (1.0 / s) if old is None else old.to(s.device) / s
            how = "mul"
        else:
            why = "no LayerNorm/Linear producer that feeds only these layers"
            if fold != "fold":
                why += ", and no input quantizer to carry a Mul: quantize first"
            for n in group:
                report[n] = f"skipped ({why})"
            continue
        for m in linears:
            m.weight.mul_(s.view(1, -1).to(m.weight.dtype))
        for n in group:
            report[n] = how
    skipped = [n for n, v in report.items() if v.startswith("skipped")]
    if skipped:
        logger.warning("smooth_quant: %d Linear layer(s) not smoothed: %s", len(skipped),
                       "; ".join(f"{n}: {report[n]}" for n in skipped[:5]))
    return report
