"""QuantConfig: which descriptors quantize() gives inputs and weights, as plain data."""

from __future__ import annotations

from dataclasses import dataclass, field
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


INT8_DEFAULT = QuantConfig()
INT8_MAX = QuantConfig(input=QuantDescriptor(num_bits=8, calib_method="max"))
