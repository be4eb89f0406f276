"""TensorRT-friendly quantizer placement (see rules.py for the rules as data)."""

from .fx_pass import apply_trt_placement, placement_report

__all__ = ["apply_trt_placement", "placement_report"]
