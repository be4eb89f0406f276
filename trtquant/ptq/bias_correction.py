"""Empirical bias correction: remove the mean output shift that quantization adds to each layer.

Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction" (ICCV,
arXiv:1906.04721), section 4.2: quantization error ``W~x - Wx`` often has a non-zero mean per output
channel, which biases every later layer; subtracting ``E[W~x] - E[Wx]`` from the bias removes it. The
paper estimates the expectation from BatchNorm statistics (data-free) and, in its appendix,
empirically from data; this is the empirical variant: the means are measured on the calibration
data, with the quantized model's own (already corrected) upstream layers, so activation quantization
and accumulated error are corrected too.

``error="weight"`` is the paper's correction itself (section 4.2, eq. 11-13): only the bias that the layer's own
weight quantization adds, ``E[(W~ - W) x]``, with ``x`` the layer's actual (quantized) input - measured on the
data instead of derived from BatchNorm statistics, so padding, ReLU6 clipping and strides are exact. It leaves
activation clipping and upstream error alone, which the accumulated correction also tries to cancel through
mean shifts that do not always help the output distribution (measured on EfficientNet-Lite0: the accumulated
correction raises KL(FP32 || INT8) while this one does not; see docs/ptq.md).

Runs on the QUANTIZED, CALIBRATED model (the quantized means need amax), after :func:`trtquant.calibrate`.
Only biases change (a conv without one gets one), so the exported Q/DQ graph is the same. Cost: one
FP32 pass plus one quantized pass per corrected layer over ``data`` ("accumulated"); one quantized pass
that runs each layer twice ("weight").
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from torch import Tensor, nn

from ..calibrate import _model_device, _to_device, run_batch
from ..nn.base import QuantMixin
from ..quantizer import TensorQuantizer
from ._graph import WEIGHTED

logger = logging.getLogger(__name__)


def weighted_layers(model: nn.Module) -> List[str]:
    """Quantized Conv/Linear layers whose weight quantizer is enabled, in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, QuantMixin) and isinstance(m, WEIGHTED)
            and m.weight_quantizer.is_enabled]


class float_mode:
    """Every quantizer of ``model`` disabled inside the block (the FP32 function), states restored after."""

    def __init__(self, model: nn.Module):
        self.qs = [m for m in model.modules() if isinstance(m, TensorQuantizer)]

    def __enter__(self) -> None:
        self.saved = [q.get_state() for q in self.qs]
        for q in self.qs:
            q.disable()

    def __exit__(self, *exc: Any) -> None:
        for q, s in zip(self.qs, self.saved):
            q.set_state(s)


def _channel_sums(out: Tensor, m: Any) -> Tensor:
    """Sum over everything but the output-channel axis (dim 1 for convs, last for Linear), float64."""
    if isinstance(m, nn.Linear):
        return out.detach().reshape(-1, out.shape[-1]).double().sum(0)
    return out.detach().transpose(0, 1).reshape(out.shape[1], -1).double().sum(1)


def _count(out: Tensor, m: Any) -> int:
    return out.numel() // (out.shape[-1] if isinstance(m, nn.Linear) else out.shape[1])


def _channel_means(model: nn.Module, names: List[str], data: Iterable[Any],
                   per_call: Callable[[Any, Any, Any, Tensor], Optional[Tensor]]) -> Dict[str, Tensor]:
    """One pass over ``data``: per named layer, the mean per output channel of ``per_call(module, args, kwargs,
    output)`` (channel sums; None skips the call)."""
    sums: Dict[str, Tensor] = {}
    counts: Dict[str, int] = {}
    hooks = []
    for n in names:
        def hook(mod: Any, args: Any, kwargs: Any, out: Tensor, n: str = n) -> None:
            s = per_call(mod, args, kwargs, out)
            if s is None:
                return
            sums[n] = sums[n] + s if n in sums else s
            counts[n] = counts.get(n, 0) + _count(out, mod)
        hooks.append(model.get_submodule(n).register_forward_hook(hook, with_kwargs=True))
    device = _model_device(model)
    try:
        with torch.no_grad():
            for batch in data:
                run_batch(model, _to_device(batch, device))
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in names if n not in sums]
    if missing:
        raise ValueError(f"bias_correction: the data never reached {', '.join(missing)}; feed batches that run them")
    return {n: sums[n] / counts[n] for n in names}


def output_means(model: nn.Module, names: List[str], data: Iterable[Any]) -> Dict[str, Tensor]:
    """Mean output per channel of each named layer over ``data`` (one pass)."""
    return _channel_means(model, names, data, lambda mod, args, kwargs, out: _channel_sums(out, mod))


def weight_error_means(model: nn.Module, names: List[str], data: Iterable[Any]) -> Dict[str, Tensor]:
    """Per named layer, the mean per output channel of (output with quantized weights - output with float
    weights) on the same quantized input: the bias its weight quantization adds (one pass over ``data``)."""
    inside: set = set()

    def diff(mod: Any, args: Any, kwargs: Any, out: Tensor) -> Optional[Tensor]:
        if id(mod) in inside:  # the float-weight rerun below
            return None
        quantized = _channel_sums(out, mod)  # before the rerun: outputs may come from a reused buffer
        wq = mod.weight_quantizer
        state = wq.get_state()
        inside.add(id(mod))
        wq.disable()
        try:
            return quantized - _channel_sums(mod(*args, **kwargs), mod)
        finally:
            wq.set_state(state)
            inside.discard(id(mod))
    return _channel_means(model, names, data, diff)


@torch.no_grad()
def bias_correction(model: nn.Module, data: Iterable[Any], layers: Optional[List[str]] = None,
                    num_batches: Optional[int] = None, error: str = "weight") -> Dict[str, float]:
    """Correct the bias of every quantized weighted layer so its mean output matches FP32, in place.

    Args:
        model: quantized and calibrated (``trtquant.quantize`` then ``trtquant.calibrate``), eval mode.
        data: calibration batches (tensors, (inputs, labels) or kwargs dicts); a list is best (read
            once per layer).
        layers: module names to correct, in execution order; default every quantized Conv/Linear.
        num_batches: use only the first batches of ``data``.
        error: ``"accumulated"`` matches each layer's mean output to FP32 with the quantized model's own upstream
            (weight and activation quantization and everything before it, layer by layer in order);
            ``"weight"`` removes only the bias of each layer's own weight quantization (the paper's eq. 13),
            all layers from one pass.

    Returns layer name -> largest absolute bias change.
    """
    if error not in ("accumulated", "weight"):
        raise ValueError(f"bias_correction: error must be 'accumulated' or 'weight', got {error!r}")
    batches = list(data)[:num_batches] if num_batches is not None else list(data)
    if not batches:
        raise ValueError("bias_correction: data yielded no batches")
    names = layers if layers is not None else weighted_layers(model)
    unknown = [n for n in names if not isinstance(model.get_submodule(n), WEIGHTED)]
    if unknown:
        raise ValueError(f"bias_correction corrects Conv/Linear layers; {', '.join(unknown)} are not")
    wqs = {n: layer.weight_quantizer for n in names if isinstance(layer := model.get_submodule(n), QuantMixin)}
    uncal = [n for n, wq in wqs.items() if wq.is_enabled and wq.amax is None]
    if uncal:
        raise ValueError(f"bias_correction needs calibrated quantizers; {', '.join(uncal)} have no weight amax: "
                         "run trtquant.calibrate first")
    was_training = model.training
    model.eval()
    changes: Dict[str, float] = {}
    try:
        if error == "weight":
            errs = weight_error_means(model, names, batches)
        else:
            with float_mode(model):
                ref = output_means(model, names, batches)  # before any bias moves: the FP32 target
        for n in names:
            m: Any = model.get_submodule(n)
            err = errs[n] if error == "weight" else output_means(model, [n], batches)[n] - ref[n]
            delta = err.to(m.weight.dtype)
            if m.bias is None:
                m.bias = nn.Parameter(-delta)
            else:
                m.bias.sub_(delta.to(m.bias.dtype))
            changes[n] = float(delta.abs().max())
    finally:
        model.train(was_training)
    logger.info("bias_correction: %d layer(s) corrected, largest change %.3g", len(changes),
                max(changes.values(), default=0.0))
    return changes
