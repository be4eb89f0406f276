"""QuantDescriptor: what a quantizer does (bits, axis, range, calibrator), as plain frozen data.

Keeps pytorch-quantization's constructor keywords so its tutorials run unchanged, but the object is
immutable: changing a default means building a new descriptor, never mutating a shared one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Optional, Tuple, Union

import math

_ALLOWED_BITS = (8,)
_CALIB_METHODS = ("max", "histogram")
DESCRIPTOR_VERSION = 1

AxisLike = Optional[Union[int, Tuple[int, ...]]]


def _normalize_axis(axis: AxisLike) -> Optional[Tuple[int, ...]]:
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, (int, tuple, list)):
        raise TypeError(f"axis must be None, an int or a tuple of ints, got {axis!r}")
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if len(axes) != 1 or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
        raise ValueError(
            f"axis={axis!r} is not supported: TensorRT quantizes per tensor (axis=None) or per "
            "channel along one axis (axis=0 for Conv/Linear weights, 1 for ConvTranspose)."
        )
    return axes


@dataclass(frozen=True)
class QuantDescriptor:
    """How one tensor is quantized.

    Args:
        num_bits: 8 (TensorRT's INT8 path; other widths are rejected with the allowed values).
        axis: None for per-tensor, or the channel axis kept by per-channel quantization.
        unsigned: quantize to [0, 2^bits - 1] (only for non-negative inputs).
        narrow_range: [-127, 127] instead of [-128, 127].
        fake_quant: return dequantized float values (True) or integer codes and scale (False).
        amax: a fixed amax; None means it comes from calibration.
        learn_amax: amax becomes a trainable parameter (QAT).
        scale_amax: multiply the calibrated amax by this factor.
        calib_method: 'max' or 'histogram' statistics collector.
        name: optional label shown in reports.
    """

    num_bits: int = 8
    axis: AxisLike = None
    unsigned: bool = False
    narrow_range: bool = False
    fake_quant: bool = True
    amax: Optional[float] = None
    learn_amax: bool = False
    scale_amax: Optional[float] = None
    calib_method: str = "max"
    name: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.num_bits, bool) or self.num_bits not in _ALLOWED_BITS:
            raise ValueError(
                f"num_bits={self.num_bits!r} is not supported; allowed: {', '.join(map(str, _ALLOWED_BITS))} "
                "(TensorRT's integer Q/DQ path is INT8)."
            )
        object.__setattr__(self, "axis", _normalize_axis(self.axis))
        if self.calib_method not in _CALIB_METHODS:
            raise ValueError(
                f"calib_method={self.calib_method!r} is not supported; allowed: {', '.join(_CALIB_METHODS)} "
                "(the amax method - max, percentile, mse, entropy - is chosen later in load_calib_amax)."
            )
        if self.amax is not None:
            _check_amax_value(self.amax, "QuantDescriptor.amax")
        if self.scale_amax is not None and not (math.isfinite(self.scale_amax) and self.scale_amax > 0):
            raise ValueError(f"scale_amax must be finite and > 0, got {self.scale_amax!r}")
        if self.learn_amax and self.amax is None:
            # Learned amax starts from calibration; allowed, checked at first forward.
            pass

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    @property
    def channel_axis(self) -> Optional[int]:
        return None if self.axis is None else self.axis[0]

    @property
    def bound(self) -> int:
        """Largest code: 127 for signed INT8, 255 unsigned."""
        return (1 << self.num_bits) - 1 if self.unsigned else (1 << (self.num_bits - 1)) - 1

    def replace(self, **changes: Any) -> "QuantDescriptor":
        return replace(self, **changes)

    def dict(self) -> dict:
        """Versioned plain-dict form (stable for configs and caches)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["axis"] = None if self.axis is None else list(self.axis)
        out["version"] = DESCRIPTOR_VERSION
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "QuantDescriptor":
        data = dict(data)
        version = data.pop("version", DESCRIPTOR_VERSION)
        if version != DESCRIPTOR_VERSION:
            raise ValueError(f"QuantDescriptor dict version {version} is not supported (this trtquant reads {DESCRIPTOR_VERSION})")
        if data.get("axis") is not None:
            data["axis"] = tuple(data["axis"])
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QuantDescriptor keys {unknown}; known: {sorted(known)}")
        return cls(**data)


def _check_amax_value(value: float, what: str) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what}={value!r} is invalid: amax must be finite and > 0")


# pytorch-quantization's name for the same thing.
ScaledQuantDescriptor = QuantDescriptor

QUANT_DESC_8BIT_PER_TENSOR = QuantDescriptor(num_bits=8)
QUANT_DESC_UNSIGNED_8BIT_PER_TENSOR = QuantDescriptor(num_bits=8, unsigned=True)
QUANT_DESC_8BIT_CONV1D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=(0,))
QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=(0,))
QUANT_DESC_8BIT_CONV3D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=(0,))
QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW = QuantDescriptor(num_bits=8, axis=(0,))
QUANT_DESC_8BIT_CONVTRANSPOSE1D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=(1,))
QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=(1,))
QUANT_DESC_8BIT_CONVTRANSPOSE3D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=(1,))
