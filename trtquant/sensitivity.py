"""Which layers cost accuracy in INT8, and automatic fallback of the worst ones to higher precision.

:func:`sensitivity` quantizes one layer at a time - a quantized Conv/Linear with its input and
weight quantizers, or a stand-alone quantizer such as a residual-Add or pool input - with every
other quantizer disabled, and measures how far the output moves from the float output on the
given (calibration) data: SQNR in dB and MSE, no labels needed, one pass over the data per layer.
A user metric ``metric(model) -> float`` (higher is better, e.g. validation accuracy) can rank
instead.

:func:`auto_fallback` starts from the fully quantized model and disables the most sensitive layers
one at a time, re-evaluating ``metric``, until it is within ``budget`` of the float metric. The
layers it disables stay in float (FP16/FP32 in TensorRT); every other quantizer, the train/eval mode
and the recorded :func:`trtquant.states.set_state` state are restored.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .calibrate import _model_device, _to_device, quantizers, run_batch
from .convert import name_quantizers
from .errors import QuantizerNotCalibratedError, TrtQuantError
from .nn.base import QuantMixin
from .outputs import output_tensors
from .quantizer import TensorQuantizer
from .states import _observe_only, preserved

logger = logging.getLogger(__name__)

Metric = Callable[[nn.Module], float]

__all__ = ["LayerSensitivity", "FallbackStep", "FallbackReport", "sensitivity", "auto_fallback", "quant_groups",
           "format_sensitivity"]


@dataclass
class LayerSensitivity:
    """The output error when only ``name`` is quantized (every other quantizer disabled)."""

    name: str  # the layer (module) name, or a stand-alone quantizer's name
    kind: str  # module type: 'Conv2d', 'Linear', ... or 'TensorQuantizer'
    quantizers: List[str]
    sqnr_db: Optional[float]  # 10 log10(signal / noise) over all outputs; inf when identical
    mse: Optional[float]
    metric: Optional[float] = None  # the user metric with only this layer quantized

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class FallbackStep:
    layer: Optional[str]  # None: the fully quantized starting point
    metric: float


@dataclass
class FallbackReport:
    float_metric: float
    quantized_metric: float  # all quantizers on
    final_metric: float
    budget: float
    met: bool
    fallback_layers: List[str]  # stay in high precision
    steps: List[FallbackStep]
    quantized_layers: Dict[str, int]  # layer type -> quantized layers left (Conv2d: 9, Linear: 1)
    float_layers: Dict[str, int]  # layer type -> weighted layers left in float
    num_qdq: int  # Q/DQ pairs the ONNX export will hold (one per active quantizer)
    ranking: List[LayerSensitivity] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        lines = [f"float metric {self.float_metric:.4f}, fully quantized {self.quantized_metric:.4f}, "
                 f"budget {self.budget:g}: {'met' if self.met else 'NOT met'} with {self.final_metric:.4f}",
                 "| step | layer left in float | metric |", "|---|---|---|"]
        for i, s in enumerate(self.steps):
            lines.append(f"| {i} | {s.layer or '(all quantized)'} | {s.metric:.4f} |")
        q = ", ".join(f"{n} {t}" for t, n in sorted(self.quantized_layers.items())) or "none"
        f = ", ".join(f"{n} {t}" for t, n in sorted(self.float_layers.items())) or "none"
        lines.append(f"export: quantized layers {q}; float layers {f}; {self.num_qdq} Q/DQ pairs")
        if self.fallback_layers:
            lines.append(f"to reproduce: trtquant.quantize(model, exclude={self.fallback_layers!r})")
        return "\n".join(lines)


def quant_groups(model: nn.Module) -> Dict[str, Tuple[str, List[str]]]:
    """Enabled quantizers grouped by layer: ``{layer: (kind, [quantizer names])}``.

    A quantized Conv/Linear (its input and weight quantizers) is one group; every other enabled
    quantizer (residual Add input, pool input, ...) is a group of its own. Observe-only quantizers
    (``ort_only``) never quantize the model and are left out.
    """
    name_quantizers(model)
    qs = quantizers(model)
    groups: Dict[str, Tuple[str, List[str]]] = {}
    owned = set()
    for name, m in model.named_modules():
        if isinstance(m, QuantMixin):
            members = [f"{name}.{a}" if name else a for a in ("input_quantizer", "weight_quantizer")]
            members = [n for n in members if n in qs and qs[n].is_enabled and not _observe_only(qs[n])]
            owned.update(members)
            if members:
                groups[name] = (m._float_type.__name__, members)
    for n, q in qs.items():
        if n not in owned and q.is_enabled and not _observe_only(q):
            groups[n] = ("TensorQuantizer", [n])
    return groups


def _flat_outputs(out: Any) -> List[Tensor]:
    """The floating-point leaves of any output structure (dicts, namedtuples, nested), in export order."""
    return [t.detach().float() for t in output_tensors(out) if t.is_floating_point()]


def _run_all(model: nn.Module, batches: Sequence[Any], device: torch.device) -> List[List[Tensor]]:
    with torch.no_grad():
        return [[t.cpu() for t in _flat_outputs(run_batch(model, _to_device(b, device)))] for b in batches]


def _error(ref: List[List[Tensor]], out: List[List[Tensor]]) -> Tuple[float, float]:
    sig = noise = 0.0
    n = 0
    for rb, ob in zip(ref, out):
        for r, o in zip(rb, ob):
            r64, o64 = r.double(), o.double()
            sig += float((r64 * r64).sum())
            noise += float(((r64 - o64) ** 2).sum())
            n += r.numel()
    return _sqnr(sig, noise), noise / max(n, 1)


def _sqnr(sig: float, noise: float) -> float:
    """10 log10(signal / noise) in dB: inf when the noise is zero, -inf when the signal is (shared with debug)."""
    if noise == 0:
        return math.inf
    if sig == 0:
        return -math.inf
    return 10.0 * math.log10(sig / noise)


def _materialise(data: Optional[Iterable[Any]], num_batches: Optional[int]) -> List[Any]:
    if data is None:
        return []
    if isinstance(data, Tensor):
        return [data]
    out = []
    for b in data:
        out.append(b)
        if num_batches is not None and len(out) >= num_batches:
            break
    return out


def _only(qs: Dict[str, TensorQuantizer], active: Iterable[str]) -> None:
    """Exactly ``active`` quantize (no statistics); every other quantizer is disabled."""
    on = set(active)
    for n, q in qs.items():
        if n in on:
            q.enable()
            q.disable_calib()
            q.enable_quant()
        else:
            q.disable()


def sensitivity(model: nn.Module, data: Optional[Iterable[Any]] = None, metric: Optional[Metric] = None,
                num_batches: Optional[int] = None) -> List[LayerSensitivity]:
    """Rank the model's quantized layers, most sensitive first, by what quantizing each one alone costs.

    Args:
        model: a calibrated quantized model (every enabled quantizer needs an amax).
        data: batches (tensors, ``(inputs, labels)`` tuples or kwargs dicts), e.g. the calibration
            data. The float output on it is the reference for SQNR/MSE; no labels are used.
        metric: optional ``metric(model) -> float``, higher is better (e.g. validation accuracy);
            when given the ranking is by it (lowest first), else by SQNR (lowest first).
        num_batches: use only the first ``num_batches`` batches of ``data``.

    The model runs in eval mode under ``torch.no_grad``; its quantizer states, train/eval mode and
    set_state record are restored afterwards.
    """
    if data is None and metric is None:
        raise ValueError("sensitivity needs data (for output SQNR/MSE) or a metric(model) -> float")
    groups = quant_groups(model)
    if not groups:
        raise TrtQuantError("the model has no enabled quantizers: call trtquant.quantize(model) and calibrate first")
    qs_all = quantizers(model)
    missing = [n for _, (_, members) in groups.items() for n in members if qs_all[n].amax is None]
    if missing:
        raise QuantizerNotCalibratedError(
            f"{len(missing)} quantizer(s) have no amax: {', '.join(missing[:20])}; calibrate the model (or load a "
            "calibration) before sensitivity analysis, or disable them")
    batches = _materialise(data, num_batches)
    if data is not None and not batches:
        raise ValueError("the data yielded no batches")
    device = _model_device(model)
    results: List[LayerSensitivity] = []
    with preserved(model) as qs:
        model.eval()
        _only(qs, [])
        ref = _run_all(model, batches, device) if batches else []
        for layer, (kind, members) in groups.items():
            _only(qs, members)
            sqnr = mse = None
            if batches:
                sqnr, mse = _error(ref, _run_all(model, batches, device))
            value = float(metric(model)) if metric is not None else None
            results.append(LayerSensitivity(layer, kind, list(members), sqnr, mse, value))
    if metric is not None:
        results.sort(key=lambda r: (r.metric, r.sqnr_db if r.sqnr_db is not None else 0.0))
    else:
        results.sort(key=lambda r: r.sqnr_db)  # type: ignore[arg-type,return-value]
    return results


def format_sensitivity(results: Sequence[LayerSensitivity]) -> str:
    """A markdown table, most sensitive first."""
    lines = ["| rank | layer | kind | SQNR (dB) | MSE | metric |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(results, 1):
        sq = "-" if r.sqnr_db is None else f"{r.sqnr_db:.2f}"
        ms = "-" if r.mse is None else f"{r.mse:.3e}"
        me = "-" if r.metric is None else f"{r.metric:.4f}"
        lines.append(f"| {i} | {r.name} | {r.kind} | {sq} | {ms} | {me} |")
    return "\n".join(lines)


def _export_summary(model: nn.Module) -> Tuple[Dict[str, int], Dict[str, int], int]:
    quantized: Counter = Counter()
    floating: Counter = Counter()
    for _, m in model.named_modules():
        if isinstance(m, QuantMixin):
            t = m._float_type.__name__
            active = [q for q in (m.input_quantizer, m.weight_quantizer) if q.is_enabled and q._if_quant]
            (quantized if active else floating)[t] += 1
    num_qdq = sum(1 for q in quantizers(model).values() if q.is_enabled and q._if_quant)
    return dict(quantized), dict(floating), num_qdq


def auto_fallback(model: nn.Module, data: Optional[Iterable[Any]], metric: Metric, budget: float,
                  max_layers: Optional[int] = None, ranking: Optional[Sequence[LayerSensitivity]] = None,
                  num_batches: Optional[int] = None, relative: bool = False,
                  rank_by: str = "output") -> FallbackReport:
    """Disable the most sensitive layers, one at a time, until ``metric`` is within ``budget`` of float.

    Args:
        model: a calibrated quantized model; changed in place: the fallback layers' quantizers end
            disabled, everything else as it was.
        data: batches for the sensitivity ranking (output SQNR; see :func:`sensitivity`). None ranks
            by ``metric`` itself (one metric evaluation per layer).
        metric: ``metric(model) -> float``, higher is better, called with the model in eval mode.
        budget: allowed drop from the float metric (absolute, in the metric's units; with
            ``relative=True`` a fraction of the float metric).
        max_layers: stop after this many layers even if the budget is not met.
        ranking: a precomputed :func:`sensitivity` result (most sensitive first), or
            :meth:`trtquant.debug.DebugReport.ranking`.
        rank_by: without ``ranking``: 'output' ranks by :func:`sensitivity` (each layer quantized
            alone, one pass over ``data`` per layer); 'teacher_forced' by the layer-wise debugger's
            teacher-forced SQNR (:func:`trtquant.debug.debug`: each layer's own error on its FP32
            input; per batch two model passes and one call per layer). Needs ``data``.

    Returns a :class:`FallbackReport`; ``met`` is False (and a warning logged) when the budget was not
    reached - the layers disabled so far stay disabled.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if max_layers is not None and max_layers < 0:
        raise ValueError(f"max_layers must be >= 0 or None, got {max_layers}")
    if rank_by not in ("output", "teacher_forced"):
        raise ValueError(f"unknown rank_by {rank_by!r}; known: output, teacher_forced")
    if ranking is None and rank_by == "teacher_forced":
        if data is None:
            raise ValueError("rank_by='teacher_forced' needs data (the debugger runs the model on it); pass data "
                             "or rank_by='output'")
        from .debug import debug

        ranking = debug(model, data, num_batches=num_batches).ranking()
    if ranking is None:
        ranking = sensitivity(model, data, metric=None if data is not None else metric, num_batches=num_batches)
    groups = quant_groups(model)
    fallback: List[str] = []
    with preserved(model) as qs:
        model.eval()
        active = [n for _, (_, members) in groups.items() for n in members]
        _only(qs, [])
        float_metric = float(metric(model))
        allowed = budget * abs(float_metric) if relative else budget
        _only(qs, active)
        current = float(metric(model))
        quantized_metric = current
        steps = [FallbackStep(None, current)]
        for r in ranking:
            if float_metric - current <= allowed:
                break
            if max_layers is not None and len(fallback) >= max_layers:
                break
            if r.name not in groups:
                continue
            fallback.append(r.name)
            off = {n for layer in fallback for n in groups[layer][1]}
            _only(qs, [n for n in active if n not in off])
            current = float(metric(model))
            steps.append(FallbackStep(r.name, current))
    # Restored: now disable exactly the fallback layers.
    for layer in fallback:
        for n in groups[layer][1]:
            qs[n].disable()
    met = float_metric - current <= allowed
    if not met:
        logger.warning("auto_fallback: metric %.4f is still %.4f below float (%.4f) after %d layer(s); budget %g",
                       current, float_metric - current, float_metric, len(fallback), budget)
    quantized, floating, num_qdq = _export_summary(model)
    return FallbackReport(float_metric, quantized_metric, current, budget, met, fallback, steps, quantized, floating,
                          num_qdq, list(ranking))
