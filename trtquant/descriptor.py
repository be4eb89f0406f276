"""QuantDescriptor: what a quantizer does (format, axis, range, calibrator), as plain immutable data.

Keeps pytorch-quantization's constructor (``QuantDescriptor(num_bits=8, name=None, **keywords)``),
its read-only properties and its ``dict``/``to_yaml``/``from_yaml`` forms, so its tutorials and
configs run unchanged; the object is immutable: changing a default means building a new
descriptor (:meth:`QuantDescriptor.replace`), never mutating a shared one.

Formats: integers of 1-16 bits (signed, unsigned, narrow range) and the FP8 formats given as
``(exponent_bits, mantissa_bits)``: ``(4, 3)`` E4M3 and ``(5, 2)`` E5M2 (:data:`FP8_FORMATS`).
Fake quantization and calibration handle all of them; TensorRT export accepts INT8 (and FP8 E4M3
per tensor), see ``trtquant.export``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import KW_ONLY, InitVar, dataclass, replace
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

logger = logging.getLogger(__name__)

_CALIB_METHODS = ("max", "histogram")
DESCRIPTOR_VERSION = 1
MAX_INT_BITS = 16

#: (exponent bits, mantissa bits) -> (name, largest finite value). E4M3 is the "fn" variant TensorRT
#: and ONNX use (no infinities, max 448); E5M2 is IEEE-like (max 57344).
FP8_FORMATS: Dict[Tuple[int, int], Tuple[str, float]] = {(4, 3): ("e4m3", 448.0), (5, 2): ("e5m2", 57344.0)}

AxisLike = Optional[Union[int, Tuple[int, ...]]]
NumBits = Union[int, Tuple[int, int]]

_FIELDS = ("num_bits", "axis", "unsigned", "narrow_range", "fake_quant", "amax", "learn_amax", "scale_amax",
           "calib_method", "name", "block_size")
_DEFAULTS: Dict[str, Any] = {"num_bits": 8, "axis": None, "unsigned": False, "narrow_range": False,
                             "fake_quant": True, "amax": None, "learn_amax": False, "scale_amax": None,
                             "calib_method": "max", "name": None, "block_size": None}


def _normalize_num_bits(num_bits: Any) -> NumBits:
    if isinstance(num_bits, (tuple, list)):
        t = tuple(num_bits)
        if t in FP8_FORMATS:
            return t  # type: ignore[return-value]
        raise TypeError(
            f"num_bits={num_bits!r} is not a known floating-point format; use an integer width 1-{MAX_INT_BITS} "
            f"or one of {sorted(FP8_FORMATS)} (E4M3, E5M2)"
        )
    if isinstance(num_bits, bool) or not isinstance(num_bits, (int, np.integer)):
        raise TypeError(f"num_bits must be a positive integer or an FP8 tuple (4, 3)/(5, 2), not {type(num_bits).__name__}")
    n = int(num_bits)
    if n == 0:
        # pytorch-quantization accepts 0 (everything quantizes to 0) as a debugging aid.
        logger.warning("num_bits=0: every value quantizes to 0; use this only for debugging")
        return 0
    if not 1 <= n <= MAX_INT_BITS:
        raise ValueError(
            f"num_bits={num_bits!r} is not supported; allowed: integers 1-{MAX_INT_BITS} or FP8 (4, 3)/(5, 2) "
            "(TensorRT runs INT8 and FP8 E4M3; other widths are for fake quantization only)"
        )
    return n


def _normalize_axis(axis: AxisLike) -> Optional[Tuple[int, ...]]:
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, (int, tuple, list)):
        raise TypeError(f"axis must be None, an int or a tuple of ints, got {axis!r}")
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
        raise TypeError(f"axis must be None, an int or a tuple of ints, got {axis!r}")
    if not axes or len(set(axes)) != len(axes):
        raise ValueError(
            f"axis={axis!r} is not supported: give None for per-tensor, the channel axis (0 for Conv/Linear "
            "weights, 1 for ConvTranspose) or a tuple of distinct axes that keep their own amax"
        )
    return axes


def _normalize_amax(amax: Any) -> Optional[np.ndarray]:
    if amax is None:
        return None
    if isinstance(amax, bool) or not isinstance(amax, (float, int, list, tuple, np.ndarray, np.floating)):
        raise TypeError(f"amax must be float, list or ndarray, not {type(amax).__name__}")
    arr = np.array(amax, dtype=np.float32)
    if arr.size == 0:
        raise ValueError("QuantDescriptor.amax is empty; give a float or one value per channel")
    for v in arr.reshape(-1):
        _check_amax_value(float(v), "QuantDescriptor.amax")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class QuantDescriptor:
    """How one tensor is quantized.

    Args:
        num_bits: integer width 1-16, or ``(4, 3)`` (FP8 E4M3) / ``(5, 2)`` (FP8 E5M2).
        name: optional label shown in reports.

    Keyword Args:
        axis: None for per-tensor, or the axis (or tuple of axes) that keeps its own amax.
        unsigned: quantize to [0, 2^bits - 1] (only for non-negative inputs).
        narrow_range: [-127, 127] instead of [-128, 127].
        fake_quant: return dequantized float values (True) or integer codes (False).
        amax: a fixed amax (float, or list/ndarray per channel; read back as a float32 ndarray); None
            means calibration (or, in the pytorch-quantization API, the input's dynamic amax) provides it.
        learn_amax: amax becomes a trainable parameter (QAT).
        scale_amax: multiply amax (calibrated, fixed or dynamic) by this factor.
        calib_method: 'max' or 'histogram' statistics collector.
        block_size: quantize the last dimension in blocks of this many elements, one amax per (row, block)
            (INT4 weight-only for TensorRT: blocks of 64 or 128 along a Linear weight's input dimension).
            Implies ``axis=(0,)``; max calibration only. A trtquant extension (ModelOpt's ``block_sizes``).
    """

    num_bits: Any = 8
    name: Optional[str] = None
    _: KW_ONLY
    axis: AxisLike = None
    unsigned: bool = False
    narrow_range: bool = False
    fake_quant: bool = True
    amax: Any = None
    learn_amax: bool = False
    scale_amax: Optional[float] = None
    calib_method: str = "max"
    block_size: Optional[int] = None
    version: InitVar[int] = DESCRIPTOR_VERSION

    def __post_init__(self, version: int) -> None:
        if version != DESCRIPTOR_VERSION:
            raise ValueError(f"QuantDescriptor dict version {version} is not supported (this trtquant reads {DESCRIPTOR_VERSION})")
        set_ = object.__setattr__
        set_(self, "num_bits", _normalize_num_bits(self.num_bits))
        if self.name is not None and not isinstance(self.name, str):
            raise TypeError(f"name must be a string or None, not {type(self.name).__name__}")
        set_(self, "axis", _normalize_axis(self.axis))
        for flag in ("unsigned", "narrow_range", "fake_quant", "learn_amax"):
            set_(self, flag, bool(getattr(self, flag)))
        set_(self, "amax", _normalize_amax(self.amax))
        s = self.scale_amax
        if s is not None and not (isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0):
            raise ValueError(f"scale_amax must be finite and > 0, got {s!r}")
        set_(self, "scale_amax", None if s is None else float(s))
        if self.calib_method not in _CALIB_METHODS:
            raise ValueError(
                f"calib_method={self.calib_method!r} is not supported; allowed: {', '.join(_CALIB_METHODS)} "
                "(the amax method - max, percentile, mse, entropy - is chosen later in load_calib_amax)."
            )
        if self.is_fp8 and self.unsigned:
            raise ValueError(f"num_bits={self.num_bits}: FP8 formats are signed; unsigned=True is not supported")
        if self.block_size is not None:
            self._check_block()

    def _check_block(self) -> None:
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 2:
            raise ValueError(f"block_size must be an integer >= 2 (TensorRT INT4: 64 or 128), got {b!r}")
        object.__setattr__(self, "block_size", int(b))
        if self.is_fp8:
            raise ValueError("block_size is supported for integer formats (INT4/INT8 weights); FP8 quantizes per tensor")
        if self.axis not in (None, (0,)):
            raise ValueError(f"block_size={b} keeps one amax per (row, block): axis must be None or 0, got {self.axis}")
        if self.calib_method != "max":
            raise ValueError("block_size needs calib_method='max' (weights are calibrated from their own values)")
        object.__setattr__(self, "axis", (0,))
    @property
    def is_fp8(self) -> bool:
        return isinstance(self.num_bits, tuple)

    @property
    def format_name(self) -> str:
        """'int8', 'uint4', 'e4m3' ... as error messages and reports name it."""
        if self.is_fp8:
            return FP8_FORMATS[self.num_bits][0]  # type: ignore[index]
        return f"{'u' if self.unsigned else ''}int{self.num_bits}"

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    @property
    def channel_axis(self) -> Optional[int]:
        """The first kept axis (the channel axis of per-channel weights), or None per tensor."""
        return None if self.axis is None else self.axis[0]

    @property
    def bound(self) -> Union[int, float]:
        """What amax maps to: 127 for signed INT8, 255 unsigned, 448.0 for E4M3."""
        if self.is_fp8:
            return FP8_FORMATS[self.num_bits][1]  # type: ignore[index]
        n = self.num_bits
        if n == 0:
            return 0
        return (1 << n) - 1 if self.unsigned else (1 << (n - 1)) - 1  # type: ignore[operator]

    # -- equality, copies, serialization -----------------------------------------------------------
    def _key(self) -> tuple:
        amax = None if self.amax is None else (self.amax.shape, tuple(self.amax.reshape(-1).tolist()))
        return tuple(amax if f == "amax" else getattr(self, f) for f in _FIELDS)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantDescriptor):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        changed = ", ".join(f"{f}={getattr(self, f)!r}" for f in _FIELDS if f == "num_bits" or not _is_default(self, f))
        return f"QuantDescriptor({changed})"

    def __str__(self) -> str:
        s = f"{self.name}: " if self.name else "QuantDescriptor"
        s += f"({'unsigned ' if self.unsigned else ''}{self.num_bits}bit {'fake' if self.fake_quant else 'real'}"
        s += f" axis={self.axis if self.axis is not None else ' per-tensor'}"
        if self.amax is not None:
            s += f" amax={self.amax.tolist()}"
        if self.learn_amax:
            s += " learn_amax"
        if self.scale_amax:
            s += f" scale_amax={self.scale_amax}"
        return s + ")"

    def _as_kwargs(self) -> Dict[str, Any]:
        return {f: getattr(self, f) for f in _FIELDS}

    def replace(self, **changes: Any) -> "QuantDescriptor":
        """A copy with ``changes`` applied (validated like the constructor)."""
        return replace(self, **changes)

    def dict(self) -> dict:
        """Versioned plain-dict form (stable for configs and caches); ``QuantDescriptor(**d.dict())`` rebuilds it."""
        out = self._as_kwargs()
        out["num_bits"] = list(self.num_bits) if self.is_fp8 else self.num_bits
        out["axis"] = None if self.axis is None else list(self.axis)
        out["amax"] = None if self.amax is None else self.amax.tolist()
        if self.block_size is None:
            del out["block_size"]  # dicts of unblocked descriptors stay as before (configs, caches)
        out["version"] = DESCRIPTOR_VERSION
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "QuantDescriptor":
        data = dict(data)
        known = set(_FIELDS) | {"version"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QuantDescriptor keys {unknown}; known: {sorted(_FIELDS)}")
        return cls(**data)

    def to_yaml(self) -> str:
        """YAML of the fields that differ from the defaults (pytorch-quantization's form)."""
        yaml = _yaml()
        d = {k: v for k, v in self.dict().items() if k in ("num_bits", "name") or v != _DEFAULTS.get(k)}
        d.pop("version", None)
        return yaml.safe_dump(d, width=120)

    @classmethod
    def from_yaml(cls, yaml_str: str) -> "QuantDescriptor":
        data = _yaml().safe_load(yaml_str)
        if not isinstance(data, dict):
            raise ValueError(f"QuantDescriptor YAML must be a mapping, got {type(data).__name__}")
        return cls.from_dict(data)


_dataclass_init = QuantDescriptor.__init__


def _init(self: QuantDescriptor, num_bits: Any = 8, name: Optional[str] = None, **kwargs: Any) -> None:
    unknown = sorted(set(kwargs) - set(_FIELDS) - {"version"})
    if unknown:  # pytorch-quantization's wording, and the keywords that are taken
        raise TypeError(f"Unused keys: {unknown}; QuantDescriptor takes {', '.join(_FIELDS)}")
    _dataclass_init(self, num_bits, name, **kwargs)


_init.__doc__ = _dataclass_init.__doc__
QuantDescriptor.__init__ = _init  # type: ignore[method-assign]


def _is_default(desc: QuantDescriptor, f: str) -> bool:
    v = getattr(desc, f)
    return v is None if f == "amax" else v == _DEFAULTS[f]


def _yaml():
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml is a dependency of the dev and docs extras
        raise ImportError("QuantDescriptor.to_yaml/from_yaml need PyYAML: pip install pyyaml") from None
    return yaml


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
