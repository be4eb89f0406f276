"""QuantConfig: which descriptors quantize() gives inputs and weights, as plain data."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace
from typing import Dict, Optional

from .descriptor import QuantDescriptor

# Activations default to histogram statistics so every amax method (entropy, mse, percentile)
# can be computed - and compared - from one calibration pass.
DEFAULT_INPUT_DESC = QuantDescriptor(num_bits=8, calib_method="histogram")


@dataclass(frozen=True)
class QuantConfig:
    """Descriptors for quantize().

    Args:
        input: descriptor of every activation (input) quantizer.
        weight: descriptor of every weight quantizer; None = per output channel on the layer's
            channel axis (Conv 0, ConvTranspose 1, Linear 0), max calibration.
        overrides: module-name glob -> {"input": desc, "weight": desc}; later entries win. ``"input": None``
            makes the matching layers weight-only (their input quantizer disabled, no activation
            quantizers placed in them): the INT4 recipe, ``{"weight": INT4_BLOCK128, "input": None}``.
    """

    input: Optional[QuantDescriptor] = DEFAULT_INPUT_DESC
    weight: Optional[QuantDescriptor] = None
    overrides: Dict[str, Dict[str, QuantDescriptor]] = field(default_factory=dict)

    @classmethod
    def coerce(cls, config: "QuantConfig | dict | None") -> "QuantConfig":
        if config is None:
            return cls()
        if isinstance(config, QuantConfig):
            return config
        if isinstance(config, dict):
            unknown = sorted(set(config) - {"input", "weight", "overrides"})
            if unknown:
                raise ValueError(f"unknown QuantConfig keys {unknown}; known: input, weight, overrides")
            return cls(**config)
        raise TypeError(f"config must be a QuantConfig, a dict or None, got {type(config).__name__}")

    def for_module(self, name: str) -> "QuantConfig":
        """The input/weight descriptors for the module ``name`` (its matching overrides applied in order), so the
        quantizers placement adds in a module's forward (residual, pooling, functional calls, attention) follow
        the same overrides as its layers."""
        cfg = self
        for pattern, override in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                cfg = replace(cfg, input=override.get("input", cfg.input), weight=override.get("weight", cfg.weight))
        return cfg


INT8_DEFAULT = QuantConfig()
INT8_MAX = QuantConfig(input=QuantDescriptor(num_bits=8, calib_method="max"))

#: FP8 E4M3 per tensor, max calibration (TensorRT's FP8 scheme; ModelOpt's FP8 default).
FP8_E4M3 = QuantDescriptor(num_bits=(4, 3), calib_method="max")
FP8_DEFAULT = QuantConfig(input=FP8_E4M3, weight=FP8_E4M3)
#: INT4 weights in blocks of 128 along the input dimension (TensorRT: block sizes 64 and 128, weight-only).
INT4_BLOCK128 = QuantDescriptor(num_bits=4, block_size=128)


def int4_weight_only(patterns, block_size: int = 128, base: Optional[QuantConfig] = None) -> QuantConfig:
    """``base`` (INT8 by default) with the layers matching ``patterns`` (globs) made INT4 weight-only in blocks.

    The mixed recipe: INT4 weights with FP16 activations on the matched Linear layers (export with
    ``dtype='fp16'``), INT8 or FP8 (``base=FP8_DEFAULT``) everywhere else.
    """
    base = base or QuantConfig()
    desc = QuantDescriptor(num_bits=4, block_size=block_size)
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    return replace(base, overrides={**base.overrides, **{p: {"weight": desc, "input": None} for p in pats}})
