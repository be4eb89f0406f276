"""Placement pass (module-level rules; graph rules arrive with the fx pass)."""

from __future__ import annotations

from torch import nn


def apply_trt_placement(model: nn.Module, cfg) -> None:
    from ..nn.pool import QuantMaxPool1d, QuantMaxPool2d, QuantMaxPool3d

    for m in model.modules():
        if isinstance(m, (QuantMaxPool1d, QuantMaxPool2d, QuantMaxPool3d)):
            # MaxPool commutes with Q/DQ: TensorRT moves the scale across it, no quantizer needed.
            m.input_quantizer.disable()


def placement_report(model: nn.Module):
    raise NotImplementedError
