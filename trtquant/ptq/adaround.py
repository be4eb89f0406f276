"""AdaRound: learn, layer by layer, whether each weight rounds up or down.

Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization" (ICML 2020,
arXiv:2004.10568). Rounding to nearest minimizes each weight's own error, not the layer's output
error. AdaRound keeps the grid (the calibrated weight amax) and learns ``V`` per weight in
``W~ = s * clamp(floor(W / s) + h(V), qmin, qmax)`` with the rectified sigmoid
``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)`` (zeta = 1.1, gamma = -0.1), minimizing
``||f(W~ x_q) - f(W x_fp)||^2 + lambda * sum(1 - |2 h(V) - 1|^beta)``; beta is annealed from 20 to 2
after a warm-up so that every ``h`` ends at 0 or 1. ``x_q`` is the layer's input in the quantized model
(earlier layers already rounded), ``x_fp`` the FP32 model's (the paper's asymmetric reconstruction).
Conv2d inputs are sampled as im2col patches at random output positions, so a step costs one small
matmul whatever the image size (Linear, and zero-padded Conv2d incl. depthwise/grouped, are supported).

Runs on the QUANTIZED, CALIBRATED model, after :func:`trtquant.calibrate` (it needs the weight amax).
The result is written back as float weights that lie exactly on the quantization grid: the weight
quantizer reproduces them, so export gives the same Q/DQ graph (no custom op) for TensorRT and ONNX
Runtime. Do not recalibrate the weights afterwards (a new amax would move the grid). A layer keeps
nearest rounding when the learned rounding is not better on its calibration loss. Weights are edited in
place, and they are the float model's parameter objects too (``trtquant.quantize`` shares them).

The paper reconstructs each layer's output with BatchNorm folded into the conv. Here BatchNorm stays in the
graph (TensorRT fuses it) and the loss is the raw conv output's. ``batchnorm_gain=True`` weighs each output
channel's error by the gain ``|gamma| / sqrt(var + eps)`` of the BatchNorm that follows: the folded layer's
loss, and the same rounding whether or not :func:`~trtquant.ptq.equalize` has moved per-channel scales into
the BatchNorm. It is not the default because it measured worse on EfficientNet-Lite0 at 4 bits (KL 0.078
against 0.066) and no better at 8 (docs/ptq.md).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..calibrate import _model_device, _to_device, run_batch
from ..functional import amax_to_scale, quant_bounds
from ..quantizer import TensorQuantizer
from ._graph import batchnorm_after, batchnorm_gain, trace
from .bias_correction import weighted_layers

logger = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1


@dataclass
class LayerResult:
    """One layer's calibration loss with nearest and with learned rounding, and which was kept."""

    nearest_loss: float
    adaround_loss: float
    kept: str  # "adaround" or "nearest"
    iterations: int
    flipped: float  # fraction of weights rounded differently from nearest
    optimize_s: float = 0.0  # seconds in the optimizer loop


def rectified_sigmoid(v: Tensor) -> Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def _init_v(rest: Tensor) -> Tensor:
    """V such that h(V) equals the fractional part: the soft weight starts at the float weight."""
    p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def _rows(m: Any, x: Tensor) -> Tensor:
    """The layer's input as rows [samples, fan-in] that its weight multiplies (im2col for a Conv2d)."""
    if isinstance(m, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    p = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)  # [N, fan-in, L]
    return p.transpose(1, 2).reshape(-1, p.shape[1])


def _supported(m: Any) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.padding_mode == "zeros"
                                        and not isinstance(m.padding, str))


def _apply(m: Any, rows: Tensor, w: Tensor) -> Tensor:
    """The layer's output channels for each row: grouped matmul (depthwise and grouped convs too) + bias."""
    g = int(getattr(m, "groups", 1))
    out_c = w.shape[0]
    y = torch.einsum("mgd,god->mgo", rows.reshape(rows.shape[0], g, -1), w.reshape(g, out_c // g, -1))
    y = y.reshape(rows.shape[0], out_c)
    return y if m.bias is None else y + m.bias.detach()


def _recon(out: Tensor, target: Tensor, gain: Optional[Tensor] = None) -> Tensor:
    """Squared error summed over output channels (each scaled by ``gain``: its BatchNorm's), averaged over samples."""
    d = out - target
    return (d if gain is None else d * gain).pow(2).sum(-1).mean()


def _output_gains(model: nn.Module, names: List[str]) -> Dict[str, Tensor]:
    """Layer name -> gain of the BatchNorm that is its only consumer (none for an untraceable model)."""
    graph = trace(model)
    if graph is None:
        logger.info("adaround: torch.fx cannot trace %s; output errors are not weighted by BatchNorm gains",
                    type(model).__name__)
        return {}
    pairs = batchnorm_after(model, graph)
    return {n: batchnorm_gain(pairs[n][1]).float() for n in names if n in pairs}


def _capture_rows(model: nn.Module, name: str, batches: List[Any], max_samples: int, seed: int,
                  quantize_input: bool) -> Tensor:
    """Up to ``max_samples`` input rows of one layer, the same positions in every call (seeded per batch)."""
    got: List[Tensor] = []
    m = model.get_submodule(name)
    per_batch = -(-max_samples // len(batches))

    def pre(mod: Any, args: Any) -> None:
        x = args[0].detach()
        if quantize_input:
            x = mod.input_quantizer(x)
        rows = _rows(mod, x)
        idx = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed + len(got)))[:per_batch]
        got.append(rows[idx.to(rows.device)])
    h = m.register_forward_pre_hook(pre)
    device = _model_device(model)
    try:
        with torch.no_grad():
            for b in batches:
                run_batch(model, _to_device(b, device))
    finally:
        h.remove()
    if not got:
        raise ValueError(f"adaround: the data never reached {name}; feed batches that run it")
    return torch.cat(got)[:max_samples]


def _grid(m: Any) -> Optional[tuple]:
    """(scale broadcast to the weight, qmin, qmax) of the layer's INT weight quantizer, or None."""
    wq = m.weight_quantizer
    d = wq.quant_desc
    if d.is_fp8 or wq.amax is None or wq.axis not in (None, (0,)) or wq.pre_quant_scale is not None:
        return None
    qmin, qmax, bound = quant_bounds(d.num_bits, d.unsigned, d.narrow_range)
    amax = wq.amax.detach().float()
    w = m.weight
    amax = amax.reshape(()) if amax.numel() == 1 else amax.reshape(-1, *([1] * (w.dim() - 1)))
    return amax_to_scale(amax, bound).to(w.device), qmin, qmax


def adaround(model: nn.Module, data: Iterable[Any], layers: Optional[List[str]] = None, iterations: int = 500,
             batch_size: int = 256, lr: float = 1e-2, reg_weight: float = 0.01, beta_range: tuple = (20.0, 2.0),
             warmup: float = 0.2, max_samples: int = 4096, time_budget_s: Optional[float] = 600.0,
             num_batches: Optional[int] = None, progress: bool = True, seed: int = 0,
             batchnorm_gain: bool = False) -> Dict[str, LayerResult]:
    """Learn the rounding of every quantized Conv/Linear weight, one layer at a time, in place.

    Args:
        model: quantized and calibrated, eval mode; INT weight quantizers (per tensor or per channel on axis 0).
        data: calibration batches (tensors, (inputs, labels) or kwargs dicts).
        layers: names to round, in execution order; default every quantized Conv/Linear.
        iterations: optimizer steps per layer (the paper: 10k; fewer is most of the gain on small layers).
        batch_size: input rows per step (a Linear's tokens; a conv's output positions, as im2col patches).
        lr: Adam learning rate on V.
        reg_weight: lambda of the rounding regularizer.
        beta_range: (start, end) of the annealed regularizer exponent.
        warmup: fraction of the steps without the regularizer.
        max_samples: input rows kept per layer, sampled evenly over the batches (one layer's at a time).
        time_budget_s: wall-clock budget for the whole model (None: no limit). The capture passes still
            to do are reserved (estimated from the layers done), the rest is shared evenly among the
            layers still to do; a layer whose slice runs out stops early (its rounding is still hard
            and checked against nearest).
        num_batches: use only the first batches of ``data``.
        progress: tqdm bar over layers.
        seed: for the sampling of mini-batches.
        batchnorm_gain: weigh each output channel's error by the gain of the BatchNorm that follows the layer
            (the loss of the folded layer, as in the paper); False (default): the raw conv output's error.

    Returns layer name -> :class:`LayerResult`.
    """
    batches = list(data)[:num_batches] if num_batches is not None else list(data)
    if not batches:
        raise ValueError("adaround: data yielded no batches")
    names = layers if layers is not None else weighted_layers(model)
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    gains = _output_gains(model, names) if batchnorm_gain else {}
    ref = copy.deepcopy(model)  # the FP32 function, with the original weights, for the targets
    for q in ref.modules():
        if isinstance(q, TensorQuantizer):
            q.disable()
    start = time.monotonic()
    overhead = 0.0  # seconds spent outside the optimizer loops (capture passes, final checks)
    results: Dict[str, LayerResult] = {}
    it: Iterable[str] = names
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(names, desc="adaround", unit="layer", leave=False)
    try:
        for i, name in enumerate(it):
            m: Any = model.get_submodule(name)
            grid = _grid(m)
            if grid is None or not _supported(m):
                logger.warning("adaround: %s skipped (only Linear and zero-padded Conv2d layers with a calibrated INT "
                               "weight quantizer, per tensor or on axis 0, are rounded)", name)
                continue
            budget = None
            if time_budget_s is not None:
                # the capture passes of the layers still to do come out of the budget first
                left = len(names) - i
                spent = time.monotonic() - start
                reserve = overhead / max(1, i) * left
                budget = max(0.0, time_budget_s - spent - reserve) / left
            t_layer = time.monotonic()
            r = _round_layer(model, ref, name, grid, batches, iterations, batch_size, lr, reg_weight,
                             beta_range, warmup, max_samples, budget, gen, seed + i, gains.get(name))
            overhead += time.monotonic() - t_layer - r.optimize_s
            results[name] = r
    finally:
        model.train(was_training)
    return results


def _round_layer(model: nn.Module, ref: nn.Module, name: str, grid: tuple, batches: List[Any], iterations: int,
                 batch_size: int, lr: float, reg_weight: float, beta_range: tuple, warmup: float,
                 max_samples: int, budget: Optional[float], gen: torch.Generator, seed: int,
                 gain: Optional[Tensor] = None) -> LayerResult:
    m: Any = model.get_submodule(name)
    scale, qmin, qmax = grid
    rows_fp = _capture_rows(ref, name, batches, max_samples, seed, quantize_input=False)
    x_q = _capture_rows(model, name, batches, max_samples, seed, quantize_input=True)
    with torch.no_grad():
        ref_layer: Any = ref.get_submodule(name)
        target = _apply(ref_layer, rows_fp, ref_layer.weight.detach())
    del rows_fp
    gain = None if gain is None else gain.to(target.device, target.dtype)

    def fn(x: Tensor, w: Tensor) -> Tensor:
        return _apply(m, x, w)

    w = m.weight.detach()
    w_floor = torch.floor(w / scale)
    v = nn.Parameter(_init_v(w / scale - w_floor))
    opt = torch.optim.Adam([v], lr=lr)
    n = x_q.shape[0]
    t0 = time.monotonic()
    done = 0
    for step in range(iterations):
        if budget is not None and time.monotonic() - t0 > budget:
            break
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen).to(x_q.device)
        h = rectified_sigmoid(v)
        w_soft = scale * torch.clamp(w_floor + h, qmin, qmax)
        loss = _recon(fn(x_q[idx], w_soft), target[idx], gain)
        frac = step / max(1, iterations)
        if frac >= warmup:
            t = (frac - warmup) / (1 - warmup)
            beta = beta_range[1] + 0.5 * (beta_range[0] - beta_range[1]) * (1 + math.cos(t * math.pi))
            loss = loss + reg_weight * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done += 1
    with torch.no_grad():
        w_ada = scale * torch.clamp(w_floor + (v >= 0).to(w.dtype), qmin, qmax)
        w_near = scale * torch.clamp(torch.round(w / scale), qmin, qmax)
        loss_ada = float(_recon(fn(x_q, w_ada), target, gain))
        loss_near = float(_recon(fn(x_q, w_near), target, gain))
        flipped = float((w_ada != w_near).float().mean())
        kept = "adaround" if loss_ada < loss_near else "nearest"
        if kept == "adaround":
            m.weight.copy_(w_ada)  # in place on the parameter: bumps its version, so cached fake-quant weights refresh
    return LayerResult(loss_near, loss_ada, kept, done, flipped, time.monotonic() - t0)
