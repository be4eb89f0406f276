"""pytorch-quantization's ``calib`` face: statistics collectors and amax methods."""

from .base import Calibrator
from .histogram import HistogramCalibrator
from .max import MaxCalibrator
from .methods import METHODS, entropy_amax, get_method, max_amax, mse_amax, percentile_amax
from .weights import calibrate_weights

__all__ = [
    "Calibrator", "MaxCalibrator", "HistogramCalibrator", "METHODS", "get_method",
    "max_amax", "percentile_amax", "mse_amax", "entropy_amax", "calibrate_weights",
]
