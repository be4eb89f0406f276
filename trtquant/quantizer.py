"""TensorQuantizer: one tensor's quantization state - amax buffer, modes, calibrator.

Modes are per instance (never class-wide): ``disabled`` passes through, ``calib`` collects
statistics, ``quant`` fake-quantizes. amax is a buffer, so it travels with ``state_dict``; an
uncalibrated quantizer has no amax entry, so float checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .calib.base import Calibrator
from .calib.histogram import HistogramCalibrator
from .calib.max import MaxCalibrator
from .descriptor import QUANT_DESC_8BIT_PER_TENSOR, QuantDescriptor
from .errors import CalibrationError, QuantizerNotCalibratedError
from .functional import amax_to_scale, fake_quant, quant_bounds, quantize

logger = logging.getLogger(__name__)

# While calibrating: id(tensor) -> (weakref to it, its version, calibrator that binned it). Several
# quantizers often observe one tensor (a block input feeds conv1 and the residual quantizer); the
# later ones alias the first instead of binning the same values again.
_observed: dict = {}


def end_shared_observations(quantizers) -> None:
    """Finish a calibration pass: aliased calibrators take their source's statistics."""
    for q in quantizers:
        q.resolve_shared_observation()
    _observed.clear()


def validate_amax(amax: Tensor, where: str, per_channel: bool) -> None:
    """amax must be finite and > 0 (a per-channel entry may be 0: a dead channel, scale 1.0 at export)."""
    a = amax.detach()
    if not torch.isfinite(a).all():
        raise ValueError(f"{where}: amax contains NaN or inf ({_summary(a)}); amax must be finite and > 0")
    if per_channel:
        if (a < 0).any() or not (a > 0).any():
            raise ValueError(f"{where}: per-channel amax must be >= 0 with at least one channel > 0 ({_summary(a)})")
    elif (a <= 0).any():
        raise ValueError(f"{where}: amax={_summary(a)} is invalid; amax must be > 0")


def _summary(a: Tensor) -> str:
    a = a.detach()  # a learned amax is a Parameter
    if a.numel() == 1:
        return f"{float(a.reshape(())):g}"
    return f"shape {tuple(a.shape)}, min {float(a.min()):g}, max {float(a.max()):g}"


class TensorQuantizer(nn.Module):
    """Quantizes one tensor as its QuantDescriptor says; pytorch-quantization's class of the same name."""

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
        self._amax: Optional[Tensor]
        self.register_buffer("_amax", None)
        if quant_desc.amax is not None:
            self.amax = torch.tensor(float(quant_desc.amax))
        self._calibrator: Optional[Calibrator] = self._make_calibrator()
        # Observe-only quantizers (ort_only) calibrate for the ONNX Runtime graph and never quantize
        # in the TensorRT model.
        self.ort_only = False
        # (scale, zero_point, axis, qmin, qmax, float dtype) while exporting to ONNX, else None.
        self._export: Optional[tuple] = None

    # -- descriptor views ---------------------------------------------------------------------
    @property
    def num_bits(self) -> int:
        return self.quant_desc.num_bits

    @property
    def unsigned(self) -> bool:
        return self.quant_desc.unsigned

    @property
    def narrow_range(self) -> bool:
        return self.quant_desc.narrow_range

    @property
    def axis(self) -> Optional[int]:
        return self.quant_desc.channel_axis

    @property
    def fake_quant(self) -> bool:
        return self.quant_desc.fake_quant

    def _make_calibrator(self) -> Calibrator:
        d = self.quant_desc
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
        src = self.__dict__.pop("_calib_alias", None)
        if src is not None and self._calibrator is not None:
            self._calibrator.copy_from(src)

    def enable_clip(self) -> None:
        self._if_clip = True

    def disable_clip(self) -> None:
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
        t = value.detach().clone() if isinstance(value, Tensor) else torch.tensor(float(value))
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
        """Make amax an nn.Parameter for QAT (LSQ-style gradient); the state-dict key stays ``_amax``."""
        if self._amax is None:
            raise QuantizerNotCalibratedError(f"{self._label()} has no amax to learn from: calibrate first")
        if not self.learn_amax:
            value = self._buffers.pop("_amax")
            self._amax = nn.Parameter(value.clone())

    def load_calib_amax(self, method: str = "max", strict: bool = True, **kwargs: Any) -> None:
        """Compute amax from the collected statistics (``method``: max, percentile, mse, entropy)."""
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
                    f"{self._label()} collected no data during calibration: the module never ran "
                    "(check the data reaches it) or pass strict=False to leave it uncalibrated"
                )
            logger.warning("%s collected no data; amax left unset", self._label())
            return
        if self.quant_desc.scale_amax is not None:
            amax = amax * self.quant_desc.scale_amax
        if self.quant_desc.per_channel:
            amax = amax.clamp_min(0)
        elif not float(amax) > 0:
            # An all-zero tensor: any positive amax represents it exactly.
            amax = torch.ones_like(amax)
        self.amax = amax

    # -- forward --------------------------------------------------------------------------------
    def _share_key(self, amax: Tensor, x: Tensor) -> Optional[tuple]:
        """Per-tensor, fixed amax, no autograd graph: a key under which equal quantizations of one tensor are shared."""
        if self.quant_desc.per_channel or self.learn_amax or self._if_clip or x.dim() < 2 \
                or (torch.is_grad_enabled() and x.requires_grad) or torch.compiler.is_compiling():
            return None
        cached = self.__dict__.get("_amax_value")
        ident = (amax.data_ptr(), amax._version, amax.device)
        if cached is None or cached[0] != ident:
            cached = self._amax_value = (ident, float(amax))  # one host read per amax change
        return (cached[1], self.num_bits, self.unsigned, self.narrow_range)

    def _observe(self, x: Tensor) -> None:
        import weakref

        cal = self._calibrator
        seen = _observed.get(id(x))
        alias = self.__dict__.get("_calib_alias")
        if seen is not None and seen[0]() is x and seen[1] == x._version and seen[2] is not cal \
                and seen[2].config_key() == cal.config_key() and (alias is None or alias is seen[2]) \
                and (alias is not None or cal.num_batches == 0):
            self._calib_alias = seen[2]
            return
        if alias is not None:  # the alias broke: until now both saw the same data
            cal.copy_from(alias)
            del self._calib_alias
        cal.collect(x)
        try:
            _observed[id(x)] = (weakref.ref(x), x._version, cal)
        except TypeError:
            pass

    def export_constants(self, scale_dtype: torch.dtype = torch.float32) -> tuple:
        """(scale, zero_point, axis) as ONNX QuantizeLinear takes them: scale = amax/bound, 1-D per channel."""
        amax = self.amax
        if amax is None:
            raise QuantizerNotCalibratedError(
                f"{self._label()} has no amax and cannot be exported: run calibration or load a calibrated checkpoint"
            )
        qmin, qmax, bound = quant_bounds(self.num_bits, self.unsigned, self.narrow_range)
        scale = amax_to_scale(amax, bound)
        axis = -1  # per tensor
        if self.quant_desc.per_channel:
            axis = self.quant_desc.channel_axis
            scale = scale.reshape(-1)
        else:
            scale = scale.reshape(())
        zp_dtype = torch.uint8 if self.unsigned else torch.int8
        return scale.detach().to(scale_dtype).clone(), torch.zeros(scale.shape, dtype=zp_dtype), axis

    def forward(self, x: Tensor) -> Tensor:
        if self._disabled:
            return x
        if self._export is not None:
            from .export.qdq_op import qdq

            scale, zp, axis, qmin, qmax, compute_dtype = self._export
            if axis < -1 or (axis == -1 and scale.dim() == 1):
                axis += x.dim()
            if compute_dtype is not None and x.dtype != compute_dtype:
                return qdq(x.to(compute_dtype), scale, zp, axis, qmin, qmax).to(x.dtype)
            return qdq(x, scale, zp, axis, qmin, qmax)
        if self._if_calib:
            self._observe(x)
        if self._if_quant:
            amax = self.amax
            if amax is None:
                raise QuantizerNotCalibratedError(
                    f"{self._label()} must quantize but has no amax: run calibration or load a calibrated "
                    "checkpoint (trtquant.calibrate(model, data) or model.load_state_dict(calibrated_state))"
                )
            if amax.dim() == 1 and x.dim() > 1 and self.quant_desc.per_channel:
                # A (C,) amax from a checkpoint: broadcast it along the channel axis.
                axis = self.axis % x.dim()
                amax = amax.reshape([-1 if d == axis else 1 for d in range(x.dim())])
            if self._if_clip:
                x = torch.minimum(torch.maximum(x, -amax), amax)
            if amax.device != x.device:
                amax = amax.to(x.device)
            if self.fake_quant:
                key = self._share_key(amax, x)
                if key is not None:
                    # A block input quantized by conv1's and the residual (or downsample) quantizer
                    # with the same amax is quantized once; the result lives as long as the input.
                    hit = x.__dict__.get("_trtquant_qdq")
                    if hit is not None and hit[0] == key and hit[1] == x._version and hit[3] == hit[2]._version:
                        return hit[2]  # neither the input nor the result was modified since
                out = fake_quant(x, amax, self.num_bits, self.unsigned, self.narrow_range)
                if key is not None:
                    x._trtquant_qdq = (key, x._version, out, out._version)
                return out
            codes, _ = quantize(x, amax, self.num_bits, self.unsigned, self.narrow_range)
            return codes
        return x

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
        n_missing = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        # A checkpoint without amax (a float model's) keeps this quantizer's current amax.
        missing_keys[n_missing:] = [k for k in missing_keys[n_missing:] if k != key]

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
        parts.append("amax=None" if a is None else f"amax={_summary(a)}")
        if self._if_calib:
            parts.append(f"calib={self._calibrator.kind if self._calibrator else None}")
        if not self._if_quant:
            parts.append("quant=off")
        return " ".join(parts)
