"""TensorQuantizer: one tensor's quantization state - amax buffer, modes, calibrator.

Modes are per instance (never class-wide): ``disabled`` passes through, ``calib`` collects
statistics, ``quant`` fake-quantizes. amax is a buffer, so it travels with ``state_dict``; an
uncalibrated quantizer has no amax entry, so float checkpoints load with ``strict=True``.

State that spans several quantizers is held in explicit objects that the quantizers reference,
never in module globals or on tensors:

* :class:`ExportMode` - while exporting to ONNX (set and reset by ``trtquant.export.onnx.export_mode``).
* :class:`SharedQuantResult` - one slot per group of quantizers that read one tensor (placement
  computes the groups): the first quantizes, the others reuse the result while neither the input
  nor the result changed.
* a calibration session (``trtquant.calibrate.CalibrationSession``) while it is open: it remembers
  which calibrator binned which tensor, so a second quantizer of the same tensor aliases the first.
  Without a session every calibrating quantizer simply collects (identical statistics, slower).

No module-level mutable state is kept here.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from .calib.base import Calibrator
from .calib.histogram import HistogramCalibrator
from .calib.max import MaxCalibrator
from .descriptor import QUANT_DESC_8BIT_PER_TENSOR, QuantDescriptor
from .errors import CalibrationError, ExportError, QuantizerNotCalibratedError
from .functional import Clip, amax_to_scale, fake_fp8, fake_quant, quant_bounds, quantize

#: What TensorRT's explicit quantization accepts, quoted by export errors.
TRT_FORMATS = ("INT8 (per tensor or per channel), FP8 E4M3 (num_bits=(4, 3), per tensor), INT4 weights in blocks "
               "(num_bits=4, block_size=64 or 128, weight-only)")

logger = logging.getLogger(__name__)

def end_shared_observations(quantizers) -> None:
    """Aliased calibrators take their source's statistics (a no-op for quantizers outside a session)."""
    for q in quantizers:
        q.resolve_shared_observation()


@dataclass(frozen=True)
class ExportMode:
    """How a quantizer emits its export op during ONNX export: constant scale and zero point.

    ``kind`` 'int' (INT8: ``torch.ops.trtquant.qdq``), 'fp8' (E4M3: ``trtquant.qdq_fp8``) or 'block'
    (INT4 blocked weights: ``trtquant.qdq_block``); ``axis`` is -1 for per-tensor; ``qmin``/``qmax``
    the integer range written (narrow range exports as the full range with the same scale);
    ``compute_dtype`` the float dtype of the Q/DQ math.
    """

    scale: Tensor
    zero_point: Tensor
    axis: int
    qmin: int
    qmax: int
    compute_dtype: Optional[torch.dtype] = None
    kind: str = "int"
    block_size: int = 0

    @classmethod
    def of(cls, q: "TensorQuantizer", scale_dtype: torch.dtype = torch.float32) -> "ExportMode":
        scale, zp, axis = q.export_constants(scale_dtype)
        d = q.quant_desc
        if d.is_fp8:
            bound = int(d.bound)
            return cls(scale, zp, axis, -bound, bound, scale_dtype, "fp8")
        if d.block_size is not None:  # signed (export_format_problem); narrow range written as the full range
            half = 1 << (int(d.num_bits) - 1)
            return cls(scale, zp, axis, -half, half - 1, scale_dtype, "block", d.block_size)
        info = torch.iinfo(zp.dtype)
        return cls(scale, zp, axis, info.min, info.max, scale_dtype)

    def apply(self, x: Tensor) -> Tensor:
        from .export.qdq_op import qdq, qdq_block, qdq_fp8

        dt = self.compute_dtype
        xin = x.to(dt) if dt is not None and x.dtype != dt else x
        if self.kind == "fp8":
            out = qdq_fp8(xin, self.scale)
        elif self.kind == "block":
            out = qdq_block(xin, self.scale, self.block_size, self.qmin, self.qmax)
        else:
            axis = self.axis
            if axis < -1 or (axis == -1 and self.scale.dim() == 1):
                axis += x.dim()
            out = qdq(xin, self.scale, self.zero_point, axis, self.qmin, self.qmax)
        return out.to(x.dtype) if out.dtype != x.dtype else out


class SharedQuantResult:
    """The last fake-quantized value of one tensor, shared by the quantizers that read it.

    Placement gives every group of activation quantizers reading one tensor (a block input read by
    conv1's input quantizer and the residual or downsample quantizer) one slot. A hit needs the same
    input object at the same ``_version``, an unmodified result and the same quantization key (amax
    value, bits, sign, range), so the result is bit-identical to quantizing again. The slot holds the
    input weakly and the result until every other member has read it (or the next store).
    """

    __slots__ = ("size", "_src", "_src_version", "_key", "_out", "_out_version", "_left")

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self.clear()

    def clear(self) -> None:
        self._src: Optional[weakref.ref] = None
        self._src_version = -1
        self._key: Optional[tuple] = None
        self._out: Optional[Tensor] = None
        self._out_version = -1
        self._left = 0

    def get(self, x: Tensor, key: tuple) -> Optional[Tensor]:
        src, out = self._src, self._out
        if src is None or out is None or src() is not x or self._src_version != x._version or self._key != key \
                or self._out_version != out._version:
            return None
        self._left -= 1
        if self._left <= 0:  # every member has it: do not keep the activation alive any longer
            self.clear()
        return out

    def put(self, x: Tensor, key: tuple, out: Tensor) -> None:
        try:
            self._src = weakref.ref(x)
        except TypeError:
            self.clear()
            return
        self._src_version, self._key = x._version, key
        self._out, self._out_version = out, out._version
        self._left = self.size - 1

    # Never pickle or deep-copy a cached activation: a copy starts empty (deepcopy keeps the sharing).
    def __getstate__(self) -> dict:
        return {"size": self.size}

    def __setstate__(self, state: dict) -> None:
        self.size = state["size"]
        self.clear()

    def __repr__(self) -> str:
        return f"SharedQuantResult(size={self.size})"


def validate_amax(amax: Tensor, where: str, per_channel: bool) -> None:
    """amax must be finite and > 0. A per-channel entry may be 0 (a dead channel in a checkpoint of an
    older trtquant; it exports as scale 1.0); calibration itself stores :data:`ZERO_AMAX` there."""
    a = amax.detach()
    if not torch.isfinite(a).all():
        raise ValueError(f"{where}: amax contains NaN or inf ({_summary(a)}); amax must be finite and > 0")
    if per_channel:
        if (a < 0).any() or not (a > 0).any():
            raise ValueError(f"{where}: per-channel amax must be >= 0 with at least one channel > 0 ({_summary(a)})")
    elif (a <= 0).any():
        raise ValueError(f"{where}: amax={_summary(a)} is invalid; amax must be > 0")


#: amax given to a tensor (or a channel of one) that was exactly zero on every calibration batch.
#: Any positive amax quantizes zeros to code 0, which dequantizes to exactly 0, so the value never
#: changes the output on the calibration data; 1.0 is chosen because its scale (1/127 for int8) is a
#: normal number in fp16 and bf16 (a tiny floor would flush to scale 0 in an fp16 export, the invalid
#: scale this avoids), and because it leaves QAT a straight-through window of [-1, 1] in which a
#: zero-initialized layer can still learn (a tiny amax would clip every gradient and freeze it at 0).
ZERO_AMAX = 1.0


def floor_zero_amax(amax: Tensor) -> tuple[Tensor, str]:
    """Replace amax entries <= 0 (tensors or channels that were all zeros) with :data:`ZERO_AMAX`.

    Returns the new amax and a description of what was replaced: "" when nothing, "all values" for a
    per-tensor amax or when every channel was zero, else "k of C channels".
    """
    dead = amax <= 0  # -0.0 too; NaN is left for validate_amax to reject
    n_dead = int(dead.sum())
    if n_dead == 0:
        return amax, ""
    floored = torch.where(dead, torch.full_like(amax, ZERO_AMAX), amax)
    if n_dead == amax.numel():
        return floored, "all values"
    return floored, f"{n_dead} of {amax.numel()} channels"


def _summary(a: Tensor) -> str:
    a = a.detach()  # a learned amax is a Parameter
    if a.numel() == 1:
        return f"{float(a.reshape(())):g}"
    return f"shape {tuple(a.shape)}, min {float(a.min()):g}, max {float(a.max()):g}"


class _CompatAxes(tuple):
    """Kept axes that also compare equal to a bare int when there is one (pytorch-quantization stored
    ``axis=(0)``, i.e. the int 0, and its users compare ``quantizer._axis == 0``)."""

    def __eq__(self, other: object) -> bool:
        if isinstance(other, int) and not isinstance(other, bool):
            return len(self) == 1 and self[0] == other
        return tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = tuple.__hash__


class TensorQuantizer(nn.Module):
    """Quantizes one tensor as its QuantDescriptor says; pytorch-quantization's class of the same name."""

    #: Set by ``quant_modules.enable_onnx_export()`` (pytorch-quantization's class-wide switch): forward
    #: then checks that the quantizer can be exported. trtquant's exporter uses :attr:`export_mode`.
    _enable_onnx_export = False

    def __init__(self, quant_desc: QuantDescriptor = QUANT_DESC_8BIT_PER_TENSOR, disabled: bool = False,
                 if_quant: bool = True, if_clip: bool = False, if_calib: bool = False):
        super().__init__()
        if not isinstance(quant_desc, QuantDescriptor):
            raise TypeError(f"quant_desc must be a QuantDescriptor, got {type(quant_desc).__name__}")
        self.quant_desc = quant_desc
        self._disabled = disabled
        self._if_quant = if_quant
        self._if_calib = if_calib
        self._if_clip = if_clip
        self.name: Optional[str] = quant_desc.name
        #: pytorch-quantization semantics: with no amax, quantize with the input's own (dynamic) amax.
        #: Layers made by ``trtquant.quantize`` turn this off, so an uncalibrated quantizer raises and
        #: names itself instead of silently quantizing per batch (see docs/pytorch_quantization_compat.md).
        self.dynamic_amax = True
        self._scale: Optional[Tensor] = None  # bound/amax of the last real (fake_quant=False) quantization
        self._amax: Optional[Tensor]
        self.register_buffer("_amax", None)
        self._pre_quant_scale: Optional[Tensor]
        self.register_buffer("_pre_quant_scale", None)
        if quant_desc.amax is not None:
            # A descriptor-given amax is final: scale_amax applies to it now (as to a calibrated one).
            amax = torch.from_numpy(np.array(quant_desc.amax, dtype=np.float32))
            self.amax = amax * quant_desc.scale_amax if quant_desc.scale_amax is not None else amax
        self._calibrator: Optional[Calibrator] = self._make_calibrator()
        if quant_desc.learn_amax:
            # pytorch-quantization learns the range through a Clip module with scalar learned bounds.
            init = float(np.max(quant_desc.amax)) if quant_desc.amax is not None else 1.0
            self.clip = Clip(-init, init, learn_min=True, learn_max=True)
            self._if_clip = True
        # Observe-only quantizers (ort_only) calibrate for the ONNX Runtime graph and never quantize
        # in the TensorRT model.
        self.ort_only = False
        # Set by trtquant.export.onnx.export_mode while exporting, else None.
        self.export_mode: Optional[ExportMode] = None
        # The slot shared with the other quantizers of the same tensor (set by placement), else None.
        self.shared_result: Optional[SharedQuantResult] = None
        # The open calibration session this quantizer reports to (trtquant.calibrate), else None.
        self.calib_session: Optional[Any] = None
        self._amax_value: Optional[tuple] = None  # (amax identity, float(amax)): one host read per change

    @property
    def _export(self) -> Optional[ExportMode]:
        """Read-only alias of :attr:`export_mode` (older internal name)."""
        return self.export_mode

    def __setstate__(self, state: dict) -> None:
        # A quantizer pickled by an older trtquant lacks the state-object attributes.
        super().__setstate__(state)
        for name in ("export_mode", "shared_result", "calib_session", "_amax_value", "_scale"):
            self.__dict__.setdefault(name, None)
        self.__dict__.setdefault("dynamic_amax", True)
        self.__dict__["_buffers"].setdefault("_pre_quant_scale", None)

    # -- descriptor views ---------------------------------------------------------------------
    @property
    def num_bits(self):
        return self.quant_desc.num_bits

    @num_bits.setter
    def num_bits(self, value) -> None:
        self.quant_desc = self.quant_desc.replace(num_bits=value)

    @property
    def unsigned(self) -> bool:
        return self.quant_desc.unsigned

    @unsigned.setter
    def unsigned(self, value: bool) -> None:
        self.quant_desc = self.quant_desc.replace(unsigned=value)

    @property
    def narrow_range(self) -> bool:
        return self.quant_desc.narrow_range

    @narrow_range.setter
    def narrow_range(self, value: bool) -> None:
        self.quant_desc = self.quant_desc.replace(narrow_range=value)

    @property
    def axis(self) -> Optional[tuple]:
        """The axes that keep their own amax ((0,) per channel; also == 0 for old code), or None per tensor."""
        axes = self.quant_desc.axis
        return None if axes is None else _CompatAxes(axes)

    # pytorch-quantization's private names, read by its tests and by user code written against it.
    _num_bits = property(lambda self: self.quant_desc.num_bits)
    _unsigned = property(lambda self: self.quant_desc.unsigned)
    _narrow_range = property(lambda self: self.quant_desc.narrow_range)
    _fake_quant = property(lambda self: self.quant_desc.fake_quant)
    _axis = property(lambda self: self.axis)
    _scale_amax = property(lambda self: self.quant_desc.scale_amax)
    _learn_amax = property(lambda self: self.quant_desc.learn_amax)

    @property
    def maxbound(self):
        """What amax maps to: 127 for INT8, 255 for UINT8, 448.0 for E4M3."""
        return self.quant_desc.bound

    @property
    def step_size(self) -> Optional[Tensor]:
        """amax / maxbound: the value of one integer step (None while amax is dynamic)."""
        if self._amax is None:
            logger.error("%s: step_size is undefined while amax is dynamic (no amax set)", self._label())
            return None
        return self._amax / float(self.maxbound)

    @property
    def scale(self) -> Optional[Tensor]:
        """maxbound / amax of the last real quantization (``fake_quant=False``), else None."""
        if self.fake_quant:
            logger.error("%s: fake-quant mode does not use scale explicitly", self._label())
        return self._scale

    @property
    def pre_quant_scale(self) -> Optional[Tensor]:
        """Multiplies the input before quantization (SmoothQuant-style activation scaling), or None."""
        return self._pre_quant_scale

    @pre_quant_scale.setter
    def pre_quant_scale(self, value) -> None:
        if value is None:
            self._pre_quant_scale = None
            return
        t = value.detach().clone() if isinstance(value, Tensor) else torch.tensor(value)
        t = t.to(torch.float32)
        if self._pre_quant_scale is not None:
            if self._pre_quant_scale.shape != t.shape:
                raise RuntimeError(f"{self._label()}: changing the shape of pre_quant_scale "
                                   f"{tuple(self._pre_quant_scale.shape)} -> {tuple(t.shape)} is not allowed")
            t = t.to(self._pre_quant_scale.device)
        self._pre_quant_scale = t

    @property
    def fake_quant(self) -> bool:
        return self.quant_desc.fake_quant

    def _make_calibrator(self) -> Calibrator:
        d = self.quant_desc
        if d.block_size is not None:  # sees the (rows, blocks, block_size) view; one amax per (row, block)
            return MaxCalibrator(d.num_bits, (0, 1), d.unsigned)
        if d.calib_method == "histogram":
            return HistogramCalibrator(d.num_bits, d.axis, d.unsigned)
        return MaxCalibrator(d.num_bits, d.axis, d.unsigned)

    # -- modes ------------------------------------------------------------------------------
    @property
    def is_enabled(self) -> bool:
        return not self._disabled

    def enable(self) -> None:
        self._disabled = False

    def disable(self) -> None:
        self._disabled = True

    def enable_quant(self) -> None:
        self._if_quant = True

    def disable_quant(self) -> None:
        self._if_quant = False

    def enable_calib(self) -> None:
        if self._calibrator is None:
            raise CalibrationError(f"{self._label()} has no calibrator (a fixed amax was given)")
        self._if_calib = True

    def disable_calib(self) -> None:
        self.resolve_shared_observation()
        self._if_calib = False

    def resolve_shared_observation(self) -> None:
        """If this quantizer skipped binning a tensor another quantizer had just binned, take its statistics."""
        session = self.calib_session
        if session is not None:
            session.resolve(self)

    def enable_clip(self) -> None:
        """Clamp the input to [-amax, amax] before quantizing (a learned range with ``learn_amax=True``)."""
        clip = self.__dict__["_modules"].get("clip")
        if clip is not None:
            clip.clip_value_min.requires_grad_(True)
            clip.clip_value_max.requires_grad_(True)
        self._if_clip = True

    def disable_clip(self) -> None:
        clip = self.__dict__["_modules"].get("clip")
        if clip is not None:
            clip.clip_value_min.requires_grad_(False)
            clip.clip_value_max.requires_grad_(False)
        self._if_clip = False

    def get_state(self) -> dict:
        return {"disabled": self._disabled, "quant": self._if_quant, "calib": self._if_calib}

    def set_state(self, state: dict) -> None:
        self._disabled, self._if_quant, self._if_calib = state["disabled"], state["quant"], state["calib"]

    # -- amax ------------------------------------------------------------------------------
    @property
    def amax(self) -> Optional[Tensor]:
        return self._amax

    @amax.setter
    def amax(self, value: Union[None, float, Tensor]) -> None:
        if value is None:
            if self.learn_amax:
                raise ValueError(f"{self._label()}: a learned amax cannot be unset")
            self._amax = None
            return
        if isinstance(value, Tensor):
            t = value.detach().clone()
        else:  # float, list or ndarray (pytorch-quantization's setter takes all three)
            t = torch.from_numpy(np.array(value, dtype=np.float32))
        t = t.to(torch.float32)
        validate_amax(t, self._label(), self.quant_desc.per_channel)
        if self._amax is not None:
            t = t.to(self._amax.device)
        if self.learn_amax:
            with torch.no_grad():
                self._amax.data = t
        else:
            self._amax = t

    @property
    def learn_amax(self) -> bool:
        return isinstance(self._amax, nn.Parameter)

    def init_learn_amax(self) -> None:
        """Make amax an nn.Parameter for QAT (LSQ-style gradient); the state-dict key stays ``_amax``.

        A quantizer whose descriptor says ``learn_amax=True`` learns through ``self.clip`` instead
        (pytorch-quantization): its bounds start at -max(amax), max(amax).
        """
        if self.quant_desc.learn_amax and hasattr(self, "clip"):
            if self._amax is None:
                raise QuantizerNotCalibratedError(f"{self._label()} has no amax to learn from: calibrate first")
            init = self._amax.detach().max()
            with torch.no_grad():
                self.clip.clip_value_min.copy_(-init)
                self.clip.clip_value_max.copy_(init)
            return
        if self._amax is None:
            raise QuantizerNotCalibratedError(f"{self._label()} has no amax to learn from: calibrate first")
        if not self.learn_amax:
            value = self._buffers.pop("_amax")
            self._amax = nn.Parameter(value.clone())

    def load_calib_amax(self, method: str = "max", strict: bool = True, **kwargs: Any) -> None:
        """Compute amax from the collected statistics (``method``: max, percentile, mse, entropy).

        Entries that saw only zeros get :data:`ZERO_AMAX` (see :func:`floor_zero_amax`) and one warning.
        """
        dead = self.apply_calib_amax(method, strict, **kwargs)
        if dead:
            logger.warning("%s saw only zeros during calibration (%s); amax set to %g there",
                           self._label(), dead, ZERO_AMAX)

    def apply_calib_amax(self, method: str = "max", strict: bool = True, **kwargs: Any) -> str:
        """:meth:`load_calib_amax` without the warning: returns what saw only zeros ("" if nothing).

        ``calibrate`` uses it to report every zero layer of a model in one warning.
        """
        if self._calibrator is None:
            raise CalibrationError(f"{self._label()} has no calibrator")
        self.resolve_shared_observation()
        if self._calibrator.saw_nonfinite():
            raise CalibrationError(
                f"{self._label()} saw NaN or inf values during calibration; fix the data or model, "
                "or calibrate with ignore_nonfinite=True to skip them"
            )
        try:
            amax = self._calibrator.compute_amax(method=method, **kwargs)
        except ValueError as e:
            raise ValueError(f"{self._label()}: {e}") from None
        if amax is None:
            if strict:
                raise CalibrationError(
                    f"{self._label()} collected no data during calibration (Calibrator returned None): the module never ran "
                    "(check the data reaches it) or pass strict=False to leave it uncalibrated"
                )
            logger.warning("%s collected no data; amax left unset", self._label())
            return ""
        if self.quant_desc.scale_amax is not None:
            amax = amax * self.quant_desc.scale_amax
        amax, dead = floor_zero_amax(amax)
        self.amax = amax
        return dead

    # -- forward --------------------------------------------------------------------------------
    def _share_key(self, amax: Tensor, x: Tensor) -> Optional[tuple]:
        """Per-tensor, fixed amax, no autograd graph: a key under which equal quantizations of one tensor are shared."""
        if self.quant_desc.per_channel or self.learn_amax or self._if_clip or x.dim() < 2 \
                or (torch.is_grad_enabled() and x.requires_grad) or torch.compiler.is_compiling():
            return None
        cached = self._amax_value
        ident = (amax.data_ptr(), amax._version, amax.device)
        if cached is None or cached[0] != ident:
            cached = self._amax_value = (ident, float(amax))  # one host read per amax change
        return (cached[1], self.num_bits, self.unsigned, self.narrow_range)

    def _observe(self, x: Tensor) -> None:
        session = self.calib_session
        if session is None:
            assert self._calibrator is not None  # enable_calib() checked
            self._calibrator.collect(x)
        else:
            session.observe(self, x)

    def export_constants(self, scale_dtype: torch.dtype = torch.float32) -> tuple:
        """(scale, zero_point, axis) as ONNX QuantizeLinear takes them: scale = amax/bound, 1-D per channel."""
        amax = self.amax
        if amax is None:
            raise QuantizerNotCalibratedError(
                f"{self._label()} has no amax and cannot be exported: run calibration or load a calibrated checkpoint"
            )
        problem = self.export_format_problem()
        if problem is not None:
            raise ExportError(problem)
        if self.quant_desc.axis is not None and len(self.quant_desc.axis) > 1:
            raise ExportError(f"{self._label()} keeps amax along axes {self.quant_desc.axis}; ONNX and TensorRT scale "
                              "along one axis at most: use axis=None or a single channel axis for export")
        d = self.quant_desc
        if d.is_fp8:  # per tensor (export_format_problem); zero point float8 0
            scale = amax_to_scale(amax, d.bound).reshape(())
            return scale.detach().to(scale_dtype).clone(), torch.zeros((), dtype=torch.float8_e4m3fn), -1
        qmin, qmax, bound = quant_bounds(self.num_bits, self.unsigned, self.narrow_range)
        scale = amax_to_scale(amax, bound)
        if d.block_size is not None:  # (rows, blocks): one scale per block of the last dimension
            scale = scale.reshape(scale.shape[0], -1)
            return scale.detach().to(scale_dtype).clone(), torch.zeros(scale.shape, dtype=torch.int8), 1
        axis = -1  # per tensor
        if self.quant_desc.per_channel:
            axis = self.quant_desc.channel_axis
            scale = scale.reshape(-1)
        else:
            scale = scale.reshape(())
        zp_dtype = torch.uint8 if self.unsigned else torch.int8
        return scale.detach().to(scale_dtype).clone(), torch.zeros(scale.shape, dtype=zp_dtype), axis

    def _dynamic_amax(self, x: Tensor) -> Tensor:
        """max |x| over every axis the descriptor does not keep (kept axes stay, size-1 elsewhere)."""
        from .calib.max import reduce_amax

        if not self.dynamic_amax:
            raise QuantizerNotCalibratedError(
                f"{self._label()} must quantize but has no amax: run calibration or load a calibrated "
                "checkpoint (trtquant.calibrate(model, data) or model.load_state_dict(calibrated_state))"
            )
        axes = self.quant_desc.axis
        if axes is None:
            return reduce_amax(x).to(torch.float32)
        axes = tuple(a % x.dim() for a in axes)
        amax = reduce_amax(x, axes, keepdims=True).to(torch.float32)
        return amax

    def _get_amax(self, x: Tensor) -> Tensor:
        """The amax this forward uses: the buffer (calibrated/fixed), else the input's dynamic amax.

        A stored amax already includes ``scale_amax``; a dynamic one gets it here.
        """
        amax = self._amax
        if amax is None:
            amax = self._dynamic_amax(x)
            if self.quant_desc.scale_amax is not None:
                amax = amax * self.quant_desc.scale_amax
            return amax
        if amax.dim() == 1 and x.dim() > 1 and amax.numel() > 1 and self.quant_desc.per_channel:
            # A (C,) amax from a checkpoint: broadcast it along the channel axis.
            axis = self.quant_desc.axis[0] % x.dim()
            amax = amax.reshape([-1 if d == axis else 1 for d in range(x.dim())])
        if amax.device != x.device:
            amax = amax.to(x.device)
        return amax

    def export_format_problem(self) -> Optional[str]:
        """Why TensorRT cannot take this quantizer's format (None when it can): INT8 (per tensor or
        per channel), FP8 E4M3 per tensor, INT4 in blocks (weights)."""
        d = self.quant_desc
        if d.num_bits == 8 and d.block_size is None:
            return None
        if d.num_bits == (4, 3) and not d.per_channel:
            return None
        if d.num_bits == 4 and not d.unsigned and d.block_size is not None:
            return None
        who = self.name or f"TensorQuantizer(num_bits={d.num_bits!r})"  # no amax read: may run while tracing
        if d.block_size is not None:
            layout = f"blocks of {d.block_size}"
        else:
            layout = "axis=" + str(d.axis) if d.axis else "per tensor"
        return (f"{who} quantizes to {d.format_name} ({layout}), "
                f"which this exporter cannot write for TensorRT; TensorRT accepts {TRT_FORMATS}. "
                "Use one of those for this layer or disable its quantizer before export")

    def _check_onnx_readiness(self) -> None:
        if self._disabled or not self._if_quant:
            return
        if self._amax is None:
            raise QuantizerNotCalibratedError(
                f"{self._label()} has no amax; ONNX export needs a calibrated quantizer: calibrate and load amax "
                "before exporting")
        problem = self.export_format_problem()
        if problem is not None:
            raise ExportError(problem)
        if self._if_calib:
            logger.warning("%s is still calibrating during ONNX export; finish calibration first", self._label())

    def _onnx_export_forward(self, x: Tensor) -> Tensor:
        """Q/DQ that ``torch.onnx.export`` (both exporters) writes as QuantizeLinear -> DequantizeLinear.

        Under ``enable_onnx_export()``: torch's own fake-quantize ops with this quantizer's INT8 scale
        (amax / bound; narrow range written as the full range with the same scale, as ONNX requires).
        """
        scale, zero_point, axis = self.export_constants(torch.float32)
        qmin, qmax = (0, 255) if self.unsigned else (-128, 127)
        xf = x.float()
        if axis < 0:
            out = torch.fake_quantize_per_tensor_affine(xf, scale.to(x.device), zero_point.to(torch.int32).to(x.device),
                                                        qmin, qmax)
        else:
            out = torch.fake_quantize_per_channel_affine(xf, scale.to(x.device), zero_point.to(torch.int32).to(x.device),
                                                         axis % x.dim(), qmin, qmax)
        return out.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if TensorQuantizer._enable_onnx_export and self.export_mode is None:
            self._check_onnx_readiness()
            pqs = self._pre_quant_scale
            if pqs is not None:
                x = x * pqs.to(x.device)
            if self._disabled or not self._if_quant:
                return x
            return self._onnx_export_forward(x)
        pqs = self._pre_quant_scale
        if pqs is not None:
            x = x * pqs.to(x.device)
        if self._disabled:
            return x
        mode = self.export_mode
        if mode is not None:
            return mode.apply(x)
        d = self.quant_desc
        if d.block_size is not None:
            return self._forward_blocked(x)
        if self._if_calib:
            self._observe(x)
        if not self._if_quant:
            if self._if_clip and d.learn_amax and "clip" in self._modules:
                return self.clip(x)  # pytorch-quantization's clip-only stage (range learning)
            return x
        if d.learn_amax and self._if_clip and "clip" in self._modules:
            # pytorch-quantization's learned range: clip, then quantize with the (scalar) learned bound.
            clip = self.clip
            x = clip(x)
            amax = torch.maximum(-clip.clip_value_min, clip.clip_value_max).detach().to(x.device)
        else:
            amax = self._get_amax(x)
            if self._if_clip:
                x = torch.minimum(torch.maximum(x, -amax), amax)
        if d.is_fp8:
            return fake_fp8(x, amax.detach(), d.num_bits)
        if not d.fake_quant:
            codes, scale = quantize(x, amax, d.num_bits, d.unsigned, d.narrow_range)
            self._scale = 1.0 / scale  # pytorch-quantization's scale: codes per unit (bound / amax)
            return codes
        slot = self.shared_result
        key = self._share_key(amax, x) if slot is not None and self._amax is not None else None
        if slot is not None and key is not None:
            # A block input quantized by conv1's and the residual (or downsample) quantizer
            # with the same amax is quantized once.
            hit = slot.get(x, key)
            if hit is not None:
                return hit
            out = fake_quant(x, amax, d.num_bits, d.unsigned, d.narrow_range)
            slot.put(x, key, out)
            return out
        return fake_quant(x, amax, d.num_bits, d.unsigned, d.narrow_range)

    def _blocks(self, x: Tensor) -> Tensor:
        """The (rows, blocks, block_size) view of a 2-D weight quantized in blocks of its last dimension."""
        bs = self.quant_desc.block_size
        if x.dim() != 2 or x.shape[-1] % bs:
            raise ValueError(f"{self._label()}: block_size={bs} quantizes a 2-D weight whose last dimension is a "
                             f"multiple of {bs}; got shape {tuple(x.shape)}. Use a block size that divides the "
                             "input features, or per-channel quantization for this layer")
        return x.reshape(x.shape[0], x.shape[1] // bs, bs)

    def _forward_blocked(self, x: Tensor) -> Tensor:
        d = self.quant_desc
        xb = self._blocks(x)
        if self._if_calib:
            self._observe(xb)
        if not self._if_quant:
            return x
        amax = self._amax
        if amax is None:
            if not self.dynamic_amax:
                self._dynamic_amax(x)  # raises, naming this quantizer
            amax = xb.detach().abs().amax(dim=-1, keepdim=True).to(torch.float32)
        else:
            amax = amax.to(x.device).reshape(xb.shape[0], xb.shape[1], 1)
        return fake_quant(xb, amax, d.num_bits, d.unsigned, d.narrow_range).reshape(x.shape)

    # -- checkpoints -------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "_amax"
        if key in state_dict:
            value = state_dict[key]
            try:
                validate_amax(value.float(), prefix.rstrip(".") or "TensorQuantizer", self.quant_desc.per_channel)
            except ValueError as e:
                error_msgs.append(f"{key}: {e}")
                state_dict = {k: v for k, v in state_dict.items() if k != key}
            else:
                if self._amax is not None and self._amax.shape != value.shape and self._amax.numel() != value.numel():
                    error_msgs.append(
                        f"{key}: amax shape {tuple(value.shape)} in the checkpoint does not match "
                        f"{tuple(self._amax.shape)} of {prefix.rstrip('.')} (different channel count or "
                        "per-tensor vs per-channel quantization)"
                    )
                    return
                if self._amax is not None and self._amax.shape != value.shape:
                    # Same numel, other layout ((C,) vs (C, 1, 1, 1)): keep this quantizer's layout.
                    state_dict = {**state_dict, key: value.reshape(self._amax.shape)}
                    value = state_dict[key]
                # Keep amax on the model's device (a CPU checkpoint into a CUDA model).
                device = self._amax.device if self._amax is not None else value.device
                if self.learn_amax:
                    self._amax.data = torch.empty(value.shape, dtype=torch.float32, device=device)
                else:
                    self._amax = torch.empty(value.shape, dtype=torch.float32, device=device)
        pqs_key = prefix + "_pre_quant_scale"
        if pqs_key in state_dict and self._pre_quant_scale is None:
            # Created on first load, like amax (pytorch-quantization checkpoints of SmoothQuant models).
            self._pre_quant_scale = torch.empty_like(state_dict[pqs_key], dtype=torch.float32)
        n_missing = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        # A checkpoint without amax (a float model's) keeps this quantizer's current amax.
        missing_keys[n_missing:] = [k for k in missing_keys[n_missing:] if k not in (key, pqs_key)]

    def _label(self) -> str:
        if self.name:
            return self.name
        return f"TensorQuantizer({self.extra_repr()})"

    def extra_repr(self) -> str:
        if self._disabled:
            return "disabled"
        d = self.quant_desc
        parts = [f"{d.num_bits}bit", "fake" if d.fake_quant else "real",
                 f"per-channel axis={d.channel_axis}" if d.per_channel else "per-tensor"]
        if d.unsigned:
            parts.append("unsigned")
        if d.narrow_range:
            parts.append("narrow")
        a = self.amax
        if a is None:  # "dynamic": quantizes with each input's own amax (pytorch-quantization semantics)
            parts.append("amax=dynamic" if self.dynamic_amax else "amax=None")
        else:
            parts.append(f"amax={_summary(a)}")
        if self._if_calib:
            parts.append(f"calib={self._calibrator.kind if self._calibrator else None}")
        if not self._if_quant:
            parts.append("quant=off")
        return " ".join(parts)
