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
        overrides: module-name glob -> {"input": desc, "weight": desc}; later entries win.
    """

    input: QuantDescriptor = DEFAULT_INPUT_DESC
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
