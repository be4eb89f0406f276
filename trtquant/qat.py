"""Quantization-aware training: fine-tune a calibrated model through fake quantization.

Recipe::

    trtquant.quantize(model); model.eval()
    trtquant.calibrate(model, calib_data)                # or load_calibration(...)
    prepare_qat(model, learn_amax=True)                   # checks amax, model.train(), set_state 'qat'
    model = DDP(model)                                    # optional: after prepare_qat
    opt = torch.optim.SGD(amax_param_groups(model, lr=1e-3, amax_lr=1e-2, weight_decay=1e-4), momentum=0.9)
    ... train a few epochs (about 10 % of the float schedule, lr about 1 % of the float one) ...
    set_state(model, 'validate') after model.eval()       # evaluate; export_onnx(model, ...)

Gradients: weights and activations get the straight-through estimator (gradient 1 inside
[-amax, amax], 0 where clipped); with ``learn_amax=True`` each activation quantizer's amax becomes
an ``nn.Parameter`` (same state-dict key ``..._amax``) with the LSQ-style gradient of
:mod:`trtquant.functional`. Weight amax stays as calibrated (per channel, max) unless
``learn_weight_amax=True``.

BatchNorm, consistent with export: BN stays a separate module and in train mode during QAT (batch
statistics, running stats updated), exactly like float training; the quantized Conv sees the
unfolded weight, quantized per output channel. At export the model is in eval mode and BN is written
as ``BatchNormalization`` after the Q/DQ Conv; TensorRT folds it into the convolution. Per-channel
weight quantization makes that fold exact: scaling output channel c by gamma_c/sigma_c scales its
amax by the same factor and leaves the INT8 codes unchanged, so what QAT trained is what TensorRT
runs. (Per-tensor weight quantization does not have this property.) Late in QAT, when batch
statistics are noisy, :func:`freeze_bn_stats` makes BN use - and keep - its running statistics,
as in the deployed engine.

Dropout: in train mode inverted dropout scales the kept activations by 1/(1-p), so a quantizer
right after a Dropout clips them against an amax calibrated in eval mode (and the STE passes no
gradient where it clips); with p = 0.5 most of the signal is cut. Keep p small, or let
``learn_amax=True`` adapt the range.

DDP: learned amax values are ordinary parameters, so DistributedDataParallel all-reduces their
gradients like any weight; call :func:`prepare_qat` before wrapping the model in DDP (DDP fixes its
parameter list at construction). Non-learned amax values are buffers, which DDP broadcasts from rank 0.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Set

import torch
from torch import nn

from .calibrate import quantizers
from .convert import name_quantizers
from .nn.base import QuantMixin
from .quantizer import TensorQuantizer
from .states import _observe_only, _uncalibrated, set_state

logger = logging.getLogger(__name__)

__all__ = ["prepare_qat", "amax_param_groups", "amax_parameters", "freeze_bn_stats", "unfreeze_bn_stats",
           "clamp_learned_amax", "weight_quantizer_names"]

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
_FROZEN_ATTR = "_trtquant_frozen_bn"


def weight_quantizer_names(model: nn.Module) -> Set[str]:
    """Names of the weight quantizers (``<layer>.weight_quantizer`` of each quantized Conv/Linear)."""
    out = set()
    for name, m in model.named_modules():
        if isinstance(m, QuantMixin):
            out.add(f"{name}.weight_quantizer" if name else "weight_quantizer")
    return out


def prepare_qat(model: nn.Module, learn_amax: bool = False, learn_weight_amax: bool = False,
                strict: bool = False, tie_shared_amax: bool = True) -> nn.Module:
    """Get a calibrated model ready for QAT: optional learnable amax, ``model.train()``, state 'qat'.

    Args:
        learn_amax: make the amax of every enabled activation (input/residual/pool) quantizer an
            ``nn.Parameter`` trained with the LSQ-style gradient.
        learn_weight_amax: the same for weight quantizers (usually left as calibrated).
        strict: passed to :func:`set_state` (raise, not warn, when a later eval()/train() misfits).
        tie_shared_amax: with ``learn_amax``, quantizers that read one tensor (a block input read by
            conv1 and the residual quantizer) learn one shared amax, as they were calibrated: the
            exported graph then keeps one Q/DQ per tensor (TensorRT fuses it; ONNX Runtime's producer
            stays an INT8 kernel) instead of two scales on one tensor.

    Raises:
        QuantizerNotCalibratedError: a quantizer that must quantize has no amax (names them).
        ValueError: learnable amax asked for on a model already wrapped in DDP.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel) and (learn_amax or learn_weight_amax):
        raise ValueError("prepare_qat(learn_amax=True) must run before wrapping the model in "
                         "DistributedDataParallel: DDP fixes its parameter list at construction, so amax parameters "
                         "created afterwards would not be synchronised. Call prepare_qat(model.module, ...) on a fresh "
                         "DDP-free model, then wrap it")
    name_quantizers(model)
    qs = {n: q for n, q in quantizers(model).items() if q.is_enabled and not _observe_only(q)}
    _uncalibrated(model, qs, None)
    weights = weight_quantizer_names(model)
    for n, q in qs.items():
        is_weight = n in weights
        if (learn_amax and not is_weight) or (learn_weight_amax and is_weight):
            q.init_learn_amax()
    if learn_amax and tie_shared_amax:
        _tie_shared_amax(model, qs)
    model.train()
    return set_state(model, "qat", strict=strict)


def _tie_shared_amax(model: nn.Module, qs: Dict[str, TensorQuantizer]) -> int:
    """Make quantizers that read one tensor (and hold equal learned amax) share one amax Parameter."""
    from .placement.fx_pass import same_tensor_groups

    tied = 0
    for group in same_tensor_groups(model):
        members = [qs[n] for n in group if n in qs and qs[n].learn_amax]
        if len(members) < 2:
            continue
        first = members[0]
        for q in members[1:]:
            if q._amax is first._amax or q._amax.shape != first._amax.shape \
                    or not torch.equal(q._amax.detach(), first._amax.detach()):
                continue  # calibrated apart (or set by hand): leave them independent
            q._parameters["_amax"] = first._amax
            tied += 1
    return tied


def amax_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The learnable amax parameters (after ``prepare_qat(..., learn_amax=True)``)."""
    seen: Set[int] = set()
    out: List[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, TensorQuantizer) and isinstance(m._amax, nn.Parameter) and id(m._amax) not in seen:
            seen.add(id(m._amax))
            out.append(m._amax)
    return out


def amax_param_groups(model: nn.Module, lr: float, amax_lr: Optional[float] = None, weight_decay: float = 0.0,
                      decay_norm_and_bias: bool = False, **group_options: Any) -> List[Dict[str, Any]]:
    """Optimizer parameter groups: weights (with ``weight_decay``), biases and norm parameters (no weight
    decay unless ``decay_norm_and_bias``), learned amax (``amax_lr``, default ``lr``; never weight decay:
    decay would pull every clipping range towards zero).

    Works on a DDP-wrapped model too. Frozen parameters (``requires_grad=False``) are left out; empty
    groups are dropped. Each group carries a ``name`` ('weights', 'no_decay', 'amax') and
    ``group_options`` (e.g. ``momentum``) are copied into every group.
    """
    amax_ids = {id(p) for p in amax_parameters(model)}
    no_decay_ids: Set[int] = set()
    for m in model.modules():
        if isinstance(m, _NORM_TYPES):
            no_decay_ids.update(id(p) for p in m.parameters(recurse=False))
    groups: Dict[str, List[nn.Parameter]] = {"weights": [], "no_decay": [], "amax": []}
    for name, p in model.named_parameters():  # deduplicated: shared parameters appear once
        if not p.requires_grad:
            continue
        if id(p) in amax_ids:
            groups["amax"].append(p)
        elif not decay_norm_and_bias and (id(p) in no_decay_ids or name.endswith("bias") or p.dim() <= 1):
            groups["no_decay"].append(p)
        else:
            groups["weights"].append(p)
    settings = {"weights": (lr, weight_decay), "no_decay": (lr, 0.0 if not decay_norm_and_bias else weight_decay),
                "amax": (lr if amax_lr is None else amax_lr, 0.0)}
    out = []
    for key, params in groups.items():
        if params:
            g_lr, g_wd = settings[key]
            out.append({**group_options, "params": params, "lr": g_lr, "weight_decay": g_wd, "name": key})
    return out


@torch.no_grad()
def clamp_learned_amax(model: nn.Module, min_amax: float = 1e-6) -> None:
    """Keep learned amax values positive (call after ``optimizer.step()`` when amax_lr is large)."""
    for p in amax_parameters(model):
        p.clamp_(min=min_amax)


def _frozen_bn_pre_hook(module: nn.Module, args: Any) -> None:
    # model.train() flips every child back to train mode; a frozen BN goes back to eval on each call.
    if getattr(module, _FROZEN_ATTR, False):
        module.training = False


def freeze_bn_stats(model: nn.Module) -> int:
    """BatchNorm layers normalise with - and stop updating - their running statistics, as the deployed
    engine does, also across later ``model.train()`` calls; the affine weight/bias still train.
    Returns the number of BN layers frozen. Undo with :func:`unfreeze_bn_stats`."""
    n = 0
    for m in model.modules():
        if isinstance(m, _BN_TYPES):
            setattr(m, _FROZEN_ATTR, True)
            m.training = False
            if not any(h is _frozen_bn_pre_hook for h in m._forward_pre_hooks.values()):
                m.register_forward_pre_hook(_frozen_bn_pre_hook)
            n += 1
    return n


def unfreeze_bn_stats(model: nn.Module) -> int:
    """Undo :func:`freeze_bn_stats`; BN follows the model's train/eval mode again."""
    n = 0
    root_training = model.training
    for m in model.modules():
        if getattr(m, _FROZEN_ATTR, False):
            setattr(m, _FROZEN_ATTR, False)
            m.training = root_training
            n += 1
    return n
