"""calibrate(): run data through a quantized model and set every quantizer's amax.

Quantizers go into calibration state for the pass and get their previous state back afterwards,
also when the data loop raises. The pass runs inside a :class:`CalibrationSession`, which owns the
"this tensor was already binned by calibrator X" sharing between quantizers of one tensor and
resolves it (aliases take their source's statistics) when it closes. No state is kept at module level.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Union

import torch
from torch import nn

from .calib.base import Calibrator
from .calib.histogram import HistogramCalibrator
from .calib.max import MaxCalibrator
from .convert import name_quantizers
from .errors import CalibrationError
from .quantizer import ZERO_AMAX, TensorQuantizer, end_shared_observations

logger = logging.getLogger(__name__)

Data = Union[Iterable[Any], Callable[[nn.Module], None]]


def quantizers(model: nn.Module) -> Dict[str, TensorQuantizer]:
    """Every TensorQuantizer of the model by fully qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}


class CalibrationSession:
    """One calibration pass: quantizers that observe a tensor another quantizer of the session just
    binned alias that calibrator instead of binning the same values again.

    Several quantizers often read one tensor (a block input feeds conv1's input quantizer and the
    residual quantizer). Use as a context manager (or :meth:`open` / :meth:`close`): while open, the
    quantizers report their observations to it; :meth:`close` resolves every alias (the aliased
    calibrator copies its source's statistics) and detaches the quantizers. The statistics are
    identical to every quantizer collecting by itself, which is what happens without a session.
    """

    def __init__(self, quantizers: Iterable[TensorQuantizer]):
        self.quantizers: List[TensorQuantizer] = list(quantizers)
        # id(tensor) -> (weakref to it, its _version when binned, the calibrator that binned it)
        self._observed: Dict[int, tuple] = {}
        # quantizer -> the calibrator whose statistics it shares (it skipped binning the same data)
        self._aliases: Dict[TensorQuantizer, Calibrator] = {}
        self.is_open = False

    def open(self) -> "CalibrationSession":
        for q in self.quantizers:
            prev = q.calib_session
            if prev is not None and prev is not self:
                prev.resolve(q)
            q.calib_session = self
        self.is_open = True
        return self

    def close(self) -> None:
        """Resolve every alias and detach the quantizers (idempotent)."""
        self.resolve_all()
        for q in self.quantizers:
            if q.calib_session is self:
                q.calib_session = None
        self._observed.clear()
        self.is_open = False

    def __enter__(self) -> "CalibrationSession":
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __deepcopy__(self, memo: dict) -> None:
        return None  # a copied model is not part of this pass

    @property
    def aliases(self) -> Dict[TensorQuantizer, Calibrator]:
        """Quantizers currently sharing another calibrator's statistics (read-only view for tests)."""
        return dict(self._aliases)

    def observe(self, q: TensorQuantizer, x: torch.Tensor) -> None:
        """``q`` observes ``x``: alias the calibrator that already binned this very tensor, or collect."""
        cal = q._calibrator
        assert cal is not None  # enable_calib() checked
        seen = self._observed.get(id(x))
        alias = self._aliases.get(q)
        if seen is not None and seen[0]() is x and seen[1] == x._version and seen[2] is not cal \
                and seen[2].config_key() == cal.config_key() and (alias is None or alias is seen[2]) \
                and (alias is not None or cal.num_batches == 0):
            self._aliases[q] = seen[2]
            return
        if alias is not None:  # the alias broke: until now both saw the same data
            cal.copy_from(alias)
            del self._aliases[q]
        cal.collect(x)
        try:
            self._observed[id(x)] = (weakref.ref(x), x._version, cal)
        except TypeError:
            pass

    def resolve(self, q: TensorQuantizer) -> None:
        """``q`` takes its source's statistics now (if it aliased one) and collects by itself from here."""
        src = self._aliases.pop(q, None)
        if src is not None and q._calibrator is not None:
            q._calibrator.copy_from(src)

    def resolve_all(self) -> None:
        for q in list(self._aliases):
            self.resolve(q)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def takes_image_list(model: nn.Module) -> bool:
    """True for models whose forward takes a list of [C, H, W] images (torchvision detection models).

    Their calibration batches are such lists, which :func:`run_batch` must not read as (inputs, labels).
    """
    if getattr(model, "takes_image_list", False):
        return True
    try:
        from torchvision.models.detection.transform import GeneralizedRCNNTransform
    except ImportError:  # torchvision is optional
        return False
    return isinstance(getattr(model, "transform", None), GeneralizedRCNNTransform)


def _is_image_list(batch: Any) -> bool:
    return isinstance(batch, (list, tuple)) and len(batch) > 0 \
        and all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in batch)


def run_batch(model: nn.Module, batch: Any) -> Any:
    """Call the model on one batch: a tensor, a dict of kwargs, or an (inputs, labels) tuple/list.

    For a model that takes a list of images (:func:`takes_image_list`: torchvision Faster R-CNN,
    RetinaNet, FCOS, SSD), a list of [C, H, W] tensors is one batch of images and is fed whole; an
    (images, targets) pair feeds its images.
    """
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise ValueError("empty batch")
        if _is_image_list(batch) and takes_image_list(model):
            return model(list(batch))
        # DataLoader convention (inputs, labels): feed the first element only.
        return model(batch[0])
    raise TypeError(f"cannot feed a batch of type {type(batch).__name__}: use tensors, tuples, dicts or forward_loop")


def _progress(it: Iterable[Any], total: Optional[int], desc: str, show: bool) -> Iterator[Any]:
    if not show:
        yield from it
        return
    from tqdm.auto import tqdm

    yield from tqdm(it, total=total, desc=desc, leave=False, unit="batch")


@contextlib.contextmanager
def calibration_mode(model: nn.Module, ignore_nonfinite: bool = False) -> Iterator[Dict[str, TensorQuantizer]]:
    """Enabled quantizers collect (and do not quantize) inside one :class:`CalibrationSession`; states and
    train/eval mode restored on exit."""
    qs = {n: q for n, q in quantizers(model).items() if q.is_enabled}
    saved = {n: q.get_state() for n, q in qs.items()}
    was_training = model.training
    model.eval()
    session = CalibrationSession(q for q in qs.values() if q._calibrator is not None)
    try:
        for q in session.quantizers:
            q.resolve_shared_observation()  # a session left open elsewhere: settle it before resetting
            cal = q._calibrator
            assert cal is not None
            cal.reset()
            cal.ignore_nonfinite = ignore_nonfinite
            q.disable_quant()
            q.enable_calib()
        with session:
            yield qs
    finally:
        session.close()
        for n, q in qs.items():
            q.set_state(saved[n])
        model.train(was_training)


def collect_statistics(model: nn.Module, data: Data, num_batches: Optional[int] = None, progress: bool = True,
                       ignore_nonfinite: bool = False) -> Dict[str, TensorQuantizer]:
    """Run the data through the model in calibration state; returns the quantizers that collected."""
    name_quantizers(model)
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be >= 1 or None, got {num_batches}")
    device = _model_device(model)
    with calibration_mode(model, ignore_nonfinite) as qs, torch.no_grad():
        if not qs:
            raise CalibrationError("the model has no enabled quantizers: call trtquant.quantize(model) first")
        if callable(data) and not hasattr(data, "__iter__"):
            data(model)
        else:
            total = num_batches
            if total is None and hasattr(data, "__len__"):
                total = len(data)  # type: ignore[arg-type]
            seen = 0
            for batch in _progress(data, total, "calibrate", progress):
                if seen == 0 and _untraced(model):
                    from .placement.dataflow import recording  # placement's run-time view, for its groups

                    with recording(model) as flow:
                        run_batch(model, _to_device(batch, device))
                    _tie_run_time_readers(model, flow, qs)
                    del flow
                else:
                    run_batch(model, _to_device(batch, device))
                seen += 1
                if num_batches is not None and seen >= num_batches:
                    break
            if seen == 0:
                raise CalibrationError("the calibration data yielded no batches")
        if _distributed():
            merge_across_ranks(qs)
    return qs


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def merge_across_ranks(qs: Dict[str, TensorQuantizer], group: Any = None) -> None:
    """Merge every calibrator over the process group: maxima by MAX; histograms agree on range, then sum.

    Every rank must hold the same quantizers (same model); the result equals single-process
    calibration on the union of all ranks' data.
    """
    import torch.distributed as dist

    end_shared_observations(qs.values())
    names = sorted(qs)
    # Ranks that saw no data for a quantizer still take part, with an empty contribution.
    seen = torch.tensor([1 if qs[n]._calibrator is not None and qs[n]._calibrator.num_batches else 0 for n in names],
                        dtype=torch.int64)
    flags = seen.clone()
    dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=group)
    any_seen = seen.clone()
    dist.all_reduce(any_seen, op=dist.ReduceOp.MAX, group=group)
    for i, n in enumerate(names):
        cal = qs[n]._calibrator
        if cal is None or not bool(any_seen[i]):
            continue
        if not bool(flags[i]):
            raise CalibrationError(
                f"{n} saw data on some ranks but not on this one (rank {dist.get_rank()}); give every rank at least "
                "one batch that reaches every layer"
            )
        cal.all_reduce_(group)


def compute_amax(model: nn.Module, method: str = "entropy", strict: bool = False, **method_kwargs: Any) -> None:
    """Set amax of every collected quantizer: histogram ones by ``method``, max ones by max.

    Quantizers that saw no data are disabled (their layer runs in float) with one warning listing
    them, or, with ``strict=True``, a CalibrationError names them. Quantizers that saw only zeros
    (zero-initialized layers) get amax :data:`~trtquant.quantizer.ZERO_AMAX`, with one warning.
    """
    name_quantizers(model)
    end_shared_observations(quantizers(model).values())
    # Every histogram's amax in one batch (a few large tensor operations); the loop below reads them.
    histograms = [q._calibrator for q in quantizers(model).values()
                  if q.is_enabled and isinstance(q._calibrator, HistogramCalibrator) and q._calibrator.num_batches
                  and not q._calibrator.saw_nonfinite()]
    if histograms:
        HistogramCalibrator.precompute_amax(histograms, method, **method_kwargs)
    empty: List[str] = []
    nonfinite: List[str] = []
    zero: List[str] = []
    for name, q in quantizers(model).items():
        cal = q._calibrator
        if cal is None or not q.is_enabled:
            continue
        if cal.num_batches == 0:
            if q.ort_only:  # an observer for the ONNX Runtime graph: its layer's quantizers are reported
                q.disable()
            else:
                empty.append(name)
            continue
        if cal.saw_nonfinite():
            nonfinite.append(name)
            continue
        dead = q.apply_calib_amax("max" if isinstance(cal, MaxCalibrator) else method,
                                  **({} if isinstance(cal, MaxCalibrator) else method_kwargs))
        if dead:
            zero.append(name if dead == "all values" else f"{name} ({dead})")
    if nonfinite:
        raise CalibrationError(
            f"NaN or inf activations reached {len(nonfinite)} quantizer(s): {', '.join(nonfinite)}; "
            "fix the data or model, or calibrate with ignore_nonfinite=True to skip such values"
        )
    if empty and strict:
        raise CalibrationError(
            f"{len(empty)} quantizer(s) saw no data during calibration: {', '.join(empty)}. Their layers never "
            "ran on the calibration data (unused branch? wrong inputs?); feed data that reaches them, or pass "
            "strict=False to disable them (their layers then run in float)"
        )
    if empty:
        disable_unseen(model, empty)
    if zero:
        logger.warning(
            "%d quantizer(s) saw only zeros during calibration, amax set to %g there (any positive amax keeps "
            "zeros exact): %s. Expected for zero-initialized layers (e.g. zero_init_residual); calibrate the "
            "trained model for real ranges", len(zero), ZERO_AMAX, ", ".join(zero))
    share_group_amax(model)


def disable_unseen(model: nn.Module, names: List[str]) -> None:
    """Disable the named quantizers (they saw no data) with one warning: an uncalibrated quantizer
    cannot quantize or export, a disabled one leaves its tensor in float."""
    qs = quantizers(model)
    for name in names:
        qs[name].disable()
    logger.warning(
        "%d quantizer(s) saw no data during calibration and were disabled (their tensors stay float): %s. "
        "Their layers never ran on the calibration data (unused branch? wrong inputs?); feed data that reaches "
        "them, or pass strict=True to make this an error", len(names), ", ".join(names))


def _untraced(model: nn.Module) -> bool:
    state = getattr(model, "_trtquant_placement", None)
    return state is not None and not state.traced


def _tie_run_time_readers(model: nn.Module, flow: Any, qs: Dict[str, TensorQuantizer]) -> None:
    """Activation quantizers that read one tensor in code torch.fx could not trace join one amax group.

    Placement ties same-tensor readers only inside traced subtrees; a detector's FPN level read by the next
    level's conv and by the head (whose quantizers run once per level) is seen only at run time. With one
    amax their Q/DQ pairs are identical and export merges them: TensorRT gets one INT8 tensor (no B16)."""
    from .placement.dataflow import shared_reader_groups

    state = model._trtquant_placement  # type: ignore[attr-defined]
    names = {n for n, q in qs.items() if not q.ort_only and not q.quant_desc.per_channel}
    known = [set(g) for g in list(state.amax_groups) + list(state.shared_inputs)]
    for group in shared_reader_groups(flow, names):
        if any(set(group) <= k for k in known):
            continue
        state.amax_groups.append(group)
        logger.info("calibrate: %s read one tensor at run time: one amax", ", ".join(group))


def share_group_amax(model: nn.Module) -> None:
    """Quantizers placed in one group (the inputs of a Concat) take the group's largest amax."""
    state = getattr(model, "_trtquant_placement", None)
    if state is None:
        return
    qs = quantizers(model)
    for group in state.amax_groups:
        members = [qs[n] for n in group if n in qs and qs[n].amax is not None]
        if len(members) > 1:
            top = torch.stack([m.amax.detach().reshape(()) for m in members]).max()
            for m in members:
                m.amax = top


def calibrate(model: nn.Module, data: Data, num_batches: Optional[int] = None, method: str = "entropy",
              progress: bool = True, strict: bool = False, ignore_nonfinite: bool = False,
              **method_kwargs: Any) -> nn.Module:
    """Calibrate every enabled quantizer of ``model`` and return it.

    Args:
        data: a DataLoader or any iterable of tensors / (inputs, labels) / kwargs dicts, or a
            ``forward_loop(model)`` callable that runs the model itself.
        num_batches: stop after this many batches (None = all).
        method: amax method for histogram quantizers: entropy, mse, percentile or max
            (max-calibrated quantizers, e.g. weights, always use max).
        strict: raise a CalibrationError naming the quantizers that saw no data. By default
            (False) they are disabled instead - their tensors stay float - with one warning
            listing them (a detection model's unused branch must not stop calibration).
        ignore_nonfinite: skip NaN/inf activations instead of raising.
        method_kwargs: e.g. ``percentile=99.99``.
    """
    from .calib.methods import get_method

    get_method(method)  # fail on a misspelt method before running any data
    collect_statistics(model, data, num_batches, progress, ignore_nonfinite)
    compute_amax(model, method, strict=strict, **method_kwargs)
    return model
