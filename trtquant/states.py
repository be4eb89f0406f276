"""Quantizer states as one explicit switch: ``set_state(model, 'calibrate' | 'validate' | 'qat' | 'float')``.

========== ======================================= ============== =================================
state      enabled quantizers                      model mode     checked when set
========== ======================================= ============== =================================
calibrate  collect statistics, pass values through  eval required  train mode: BatchNorm would learn
                                                                   running stats from calibration data
validate   fake-quantize (no statistics)            eval required  every quantizer has an amax that
                                                                   was computed from its statistics
qat        fake-quantize, straight-through grads    train required same as validate
float      all quantizers disabled                  any            -
========== ======================================= ============== =================================

Observe-only quantizers (``ort_only``, added by placement for the ONNX Runtime graph) collect in
'calibrate' and stay pass-through in 'validate'/'qat'. Quantizers that were disabled before (by placement, ``exclude`` or a layer fallback) stay disabled
in every state; ``'float'`` remembers which ones it turned off and the next state turns exactly
those back on.

The state is recorded on the model, and a forward pre-hook on the root module compares it with
``model.training`` on every call: a later ``model.eval()`` / ``model.train()`` that no longer fits
the state (``set_state(model, 'qat')`` then ``model.eval()`` to evaluate, or ``'validate'`` then
``model.train()``) warns once with what to call instead, or raises with ``strict=True``. A forward in
train mode while in ``'calibrate'`` always raises, before BatchNorm updates anything. In
``'calibrate'`` each forward of the root runs in its own ``trtquant.calibrate.CalibrationSession``
(opened by a pre-hook, closed by a forward hook), so quantizers of one tensor bin it once.

Deliberate per-model state: the record (``model._trtquant_state``) and the hooks live on the model
they describe - they must follow it through ``copy.deepcopy`` and be gone with it - and nothing is
kept at module level.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

from torch import Tensor, nn

from .calibrate import quantizers
from .convert import name_quantizers
from .errors import QuantizerNotCalibratedError, TrtQuantError
from .quantizer import TensorQuantizer

STATES = ("calibrate", "validate", "qat", "float")
_RECORD_ATTR = "_trtquant_state"

__all__ = ["STATES", "set_state", "get_state", "QuantStateError", "QuantStateWarning"]


class QuantStateError(TrtQuantError):
    """The model's train/eval mode does not fit its quantizer state."""


class QuantStateWarning(UserWarning):
    """The model's train/eval mode changed after set_state and no longer fits the state."""


@dataclass
class _Record:
    state: str
    strict: bool = False
    # Quantizers that 'float' disabled (and the next state re-enables).
    float_disabled: List[str] = field(default_factory=list)
    # amax identity of each collecting quantizer when 'calibrate' was entered, to spot statistics
    # collected afterwards but never turned into amax.
    calib_amax: Dict[str, Optional[Tuple[Tensor, int]]] = field(default_factory=dict)
    warned: bool = False
    suspended: int = 0
    # The CalibrationSession of the forward in progress ('calibrate' only), else None.
    session: Any = field(default=None, repr=False, compare=False)


def _observe_only(q: TensorQuantizer) -> bool:
    """Observe-only quantizers (placement's ``ort_only``) calibrate but never quantize the model."""
    return bool(getattr(q, "ort_only", False))


def _record(model: nn.Module) -> Optional[_Record]:
    return getattr(model, _RECORD_ATTR, None)


def _amax_id(q: TensorQuantizer) -> Optional[Tuple[Tensor, int]]:
    # The tensor itself (kept alive, so its identity cannot be reused) and its storage: compute_amax
    # assigns a new tensor (or, for a learned amax, new storage).
    a = q.amax
    return None if a is None else (a, a.data_ptr())


def _same_amax(q: TensorQuantizer, saved: Optional[Tuple[Tensor, int]]) -> bool:
    a = q.amax
    return saved is not None and a is saved[0] and a.data_ptr() == saved[1]


def _mode_problem(state: str, training: bool) -> Optional[str]:
    if state in ("calibrate", "validate") and training:
        if state == "calibrate":
            return ("set_state(model, 'calibrate') but the model is in train mode (model.train() was called "
                    "afterwards): calibrating in train mode updates BatchNorm running stats with calibration data "
                    "and keeps Dropout on; call model.eval() (or set_state(model, 'calibrate') again)")
        return ("set_state(model, 'validate') but the model is now in train mode (model.train() was called "
                "afterwards): BatchNorm normalises with batch statistics and overwrites its running stats, and "
                "Dropout is on, so these numbers will not match the deployed engine. To fine-tune with fake quant "
                "call set_state(model, 'qat'); to validate call model.eval()")
    if state == "qat" and not training:
        return ("set_state(model, 'qat') but the model is now in eval mode (model.eval() was called afterwards): "
                "BatchNorm uses its running stats and no amax or weight is being trained, so this is a validation "
                "pass, not QAT. Say so explicitly: set_state(model, 'validate') to evaluate, then "
                "set_state(model, 'qat') to resume training")
    return None


_SET_TIME_PROBLEMS = {
    ("calibrate", True): (
        "set_state(model, 'calibrate') needs model.eval(): calibrating in train mode updates BatchNorm running "
        "stats with calibration data (and keeps Dropout on), so the calibrated model is not the one you deploy; "
        "call model.eval() first"),
    ("validate", True): (
        "set_state(model, 'validate') needs model.eval(): in train mode BatchNorm normalises with batch "
        "statistics and overwrites its running stats, and Dropout is on; call model.eval() first (to fine-tune "
        "with fake quant use set_state(model, 'qat'))"),
    ("qat", False): (
        "set_state(model, 'qat') needs model.train(): QAT fine-tunes the model with BatchNorm and Dropout in "
        "training behaviour; call model.train() first (to evaluate use set_state(model, 'validate'))"),
}


def _check_mode_hook(module: nn.Module, args: Any) -> None:
    """Forward pre-hook on the root: the recorded state must still fit ``module.training``."""
    rec = _record(module)
    if rec is None or rec.suspended or rec.state == "float":
        return
    problem = _mode_problem(rec.state, module.training)
    if problem is None:
        rec.warned = False  # back in a fitting mode: warn again on the next misfit
        return
    if rec.state == "calibrate" or rec.strict:
        raise QuantStateError(problem)
    if not rec.warned:
        rec.warned = True
        warnings.warn(problem, QuantStateWarning, stacklevel=3)


def _begin_session_hook(module: nn.Module, args: Any) -> None:
    """Before each forward in 'calibrate': open a CalibrationSession over the collecting quantizers, so
    quantizers of one tensor bin it once (see trtquant.calibrate.CalibrationSession)."""
    rec = _record(module)
    if rec is None or rec.state != "calibrate":
        return
    if rec.session is not None:  # the previous forward raised before its end hook
        rec.session.close()
    from .calibrate import CalibrationSession

    rec.session = CalibrationSession(
        m for m in module.modules() if isinstance(m, TensorQuantizer) and m._if_calib and m._calibrator is not None
        and m.calib_session is None).open()


def _end_session_hook(module: nn.Module, args: Any, output: Any) -> None:
    """After each forward: close the session, so aliased quantizers hold their statistics and
    compute_amax and save_calibration see them without trtquant.calibrate's context manager."""
    rec = _record(module)
    if rec is None or rec.session is None:
        return
    session, rec.session = rec.session, None
    session.close()


def _install_hook(model: nn.Module) -> None:
    if not any(h is _check_mode_hook for h in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_check_mode_hook)
    if not any(h is _begin_session_hook for h in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_begin_session_hook)
    if not any(h is _end_session_hook for h in model._forward_hooks.values()):
        model.register_forward_hook(_end_session_hook)


def _uncalibrated(model: nn.Module, qs: Dict[str, TensorQuantizer], rec: Optional[_Record]) -> None:
    """Raise, naming them, when quantizers that must quantize have no amax or only a stale one."""
    missing = [n for n, q in qs.items() if q.amax is None]
    stale = []
    if rec is not None and rec.state == "calibrate":
        for n, q in qs.items():
            cal = q._calibrator
            if n in rec.calib_amax and q.amax is not None and cal is not None and cal.num_batches > 0 \
                    and _same_amax(q, rec.calib_amax[n]):
                stale.append(n)
    if not missing and not stale:
        return
    collected = [n for n in missing if getattr(qs[n]._calibrator, "num_batches", 0) > 0]
    parts = []
    if missing:
        shown = ", ".join(missing[:20]) + (f" ... ({len(missing) - 20} more)" if len(missing) > 20 else "")
        parts.append(f"{len(missing)} quantizer(s) still have no amax (scales at their initial, uncalibrated "
                     f"value): {shown}")
    if stale:
        shown = ", ".join(stale[:20]) + (f" ... ({len(stale) - 20} more)" if len(stale) > 20 else "")
        parts.append(f"{len(stale)} quantizer(s) collected new statistics in 'calibrate' state but their amax was "
                     f"not recomputed from them: {shown}")
    if collected or stale:
        hint = ("the statistics were collected: compute amax from them with trtquant.compute_amax(model, "
                "method='entropy') (or 'max', 'percentile', 'mse')")
    else:
        hint = ("calibrate first (set_state(model, 'calibrate'), run data, trtquant.compute_amax(model); or "
                "trtquant.calibrate(model, data)), load a calibrated checkpoint or calibration cache, or disable "
                "these quantizers")
    raise QuantizerNotCalibratedError("; ".join(parts) + "; " + hint)


def set_state(model: nn.Module, state: str, strict: bool = False, reset: bool = True,
              check_calibrated: bool = True) -> nn.Module:
    """Put every enabled quantizer of ``model`` into ``state`` and check the train/eval mode fits.

    Args:
        model: a quantized model (its train/eval mode is checked, never changed here).
        state: 'calibrate', 'validate', 'qat' or 'float' (see the module docstring).
        strict: a later train/eval change that no longer fits raises on the next forward instead of
            warning once.
        reset: 'calibrate' starts from empty statistics (False adds to what was collected).
        check_calibrated: 'validate'/'qat' raise when a quantizer has no amax or ignores statistics
            collected since the last amax.

    Raises:
        QuantStateError: the model's train/eval mode does not fit ``state``.
        QuantizerNotCalibratedError: 'validate'/'qat' with uncalibrated (or stale) quantizers.
    """
    if state not in STATES:
        raise ValueError(f"state must be one of {', '.join(repr(s) for s in STATES)}, got {state!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"set_state expects an nn.Module, got {type(model).__name__}")
    name_quantizers(model)
    all_qs = quantizers(model)
    if not all_qs:
        raise TrtQuantError("the model has no quantizers: call trtquant.quantize(model) first")
    rec = _record(model)
    if rec is not None and rec.session is not None:  # a calibrate forward raised before its end hook
        session, rec.session = rec.session, None
        session.close()
    if state != "float":
        wrong = _SET_TIME_PROBLEMS.get((state, model.training))
        if wrong is not None:
            raise QuantStateError(wrong)

    # Leaving 'float': turn back on exactly what it turned off.
    if rec is not None and rec.state == "float" and state != "float":
        for n in rec.float_disabled:
            if n in all_qs:
                all_qs[n].enable()
    qs = {n: q for n, q in all_qs.items() if q.is_enabled}

    if state in ("validate", "qat") and check_calibrated:
        try:
            _uncalibrated(model, {n: q for n, q in qs.items() if not _observe_only(q)}, rec)
        except QuantizerNotCalibratedError:
            if rec is not None and rec.state == "float":  # undo the re-enable: the model stays as it was
                for n in rec.float_disabled:
                    if n in all_qs:
                        all_qs[n].disable()
            raise
        if state == "qat":
            real = [n for n, q in qs.items() if not q.fake_quant]
            if real:
                raise ValueError(f"QAT needs fake quantization, but {', '.join(real)} output integer codes "
                                 "(QuantDescriptor(fake_quant=False)): no useful gradient flows through them")

    new = _Record(state, strict)
    if state == "calibrate":
        if not any(q._calibrator is not None for q in qs.values()):
            raise TrtQuantError("no enabled quantizer has a calibrator (every amax was fixed): nothing to calibrate")
        for n, q in qs.items():
            if q._calibrator is None:
                continue  # a fixed amax keeps quantizing, as in trtquant.calibrate
            if reset:
                q._calibrator.reset()
            q.disable_quant()
            q.enable_calib()
            new.calib_amax[n] = _amax_id(q)
    elif state in ("validate", "qat"):
        for q in qs.values():
            q.disable_calib()
            if _observe_only(q):
                q.disable_quant()
            else:
                q.enable_quant()
    else:  # float
        for n, q in qs.items():
            q.disable()
            new.float_disabled.append(n)
        if rec is not None and rec.state == "float":
            new.float_disabled = sorted(set(new.float_disabled) | set(rec.float_disabled))
    setattr(model, _RECORD_ATTR, new)
    _install_hook(model)
    return model


def get_state(model: nn.Module) -> Optional[str]:
    """The state the quantizers are in: the one ``set_state`` recorded while the quantizers still match it,
    else inferred from them ('float' when none is active, 'calibrate' when any collects, otherwise
    'qat' in train mode and 'validate' in eval mode). None for a model without quantizers."""
    qs = quantizers(model)
    if not qs:
        return None
    active = [q for q in qs.values() if q.is_enabled]
    if not active or not any(q._if_quant or q._if_calib for q in active):
        inferred = "float"
    elif any(q._if_calib for q in active):
        inferred = "calibrate"
    else:
        inferred = "qat" if model.training else "validate"
    rec = _record(model)
    if rec is not None and rec.state in (inferred, {"qat": "validate", "validate": "qat"}.get(inferred)):
        return rec.state  # the recorded state, even when the train/eval mode now misfits it
    return inferred


@contextlib.contextmanager
def suspend_checks(model: nn.Module) -> Iterator[None]:
    """No train/eval checks on forward inside the block (for tools that switch modes themselves)."""
    rec = _record(model)
    if rec is not None:
        rec.suspended += 1
    try:
        yield
    finally:
        if rec is not None:
            rec.suspended -= 1


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[Dict[str, TensorQuantizer]]:
    """Every quantizer's flags, the train/eval mode and the state record are restored on exit."""
    qs = quantizers(model)
    saved = {n: q.get_state() for n, q in qs.items()}
    training = {m: m.training for m in model.modules()}
    rec = _record(model)
    try:
        with suspend_checks(model):
            yield qs
    finally:
        for n, q in qs.items():
            q.set_state(saved[n])
        for m, t in training.items():
            m.training = t
        if rec is None:
            if hasattr(model, _RECORD_ATTR):
                delattr(model, _RECORD_ATTR)
        else:
            setattr(model, _RECORD_ATTR, rec)
