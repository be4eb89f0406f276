"""trtquant: PyTorch models to fast, accurate INT8 TensorRT engines.

Data flows one way: descriptor -> quantizer -> calib -> nn -> placement -> export -> engine/bench
-> cli/service. TensorRT and ONNX Runtime are imported lazily, so ``import trtquant`` works on any
CPU machine.
"""

from .calib_cache import (
    export_trt_cache, import_trt_cache, load_calibration, read_trt_cache, save_calibration, write_trt_cache,
)
from .calibrate import calibrate, collect_statistics, compute_amax, quantizers
from .checkpoint import load_state_dict
from .config import QuantConfig
from .convert import quantize
from .descriptor import QuantDescriptor
from .errors import (
    CacheFileError, CalibrationError, CheckpointError, EngineBuildError, ExportError, QuantizerNotCalibratedError,
    TensorRTNotAvailableError, TrtQuantError,
)
from .qat import amax_param_groups, clamp_learned_amax, freeze_bn_stats, prepare_qat, unfreeze_bn_stats
from .quantizer import TensorQuantizer
from .sensitivity import FallbackReport, LayerSensitivity, auto_fallback, sensitivity
from .debug import DebugReport, debug
from .states import QuantStateError, QuantStateWarning, get_state, set_state
from .quant_modules import enable_onnx_export
from . import ptq  # noqa: E402  advanced PTQ steps: trtquant.ptq.equalize / smooth_quant / bias_correction / adaround

__version__ = "0.1.0"

__all__ = [
    "quantize", "calibrate", "load_state_dict", "save_calibration", "load_calibration", "write_trt_cache", "read_trt_cache", "export_trt_cache", "import_trt_cache", "collect_statistics", "compute_amax", "quantizers", "QuantConfig", "QuantDescriptor",
    "TensorQuantizer", "TrtQuantError", "CalibrationError", "CheckpointError", "CacheFileError", "ExportError",
    "EngineBuildError", "QuantizerNotCalibratedError", "TensorRTNotAvailableError",
    "set_state", "get_state", "QuantStateError", "QuantStateWarning",
    "prepare_qat", "amax_param_groups", "freeze_bn_stats", "unfreeze_bn_stats", "clamp_learned_amax",
    "sensitivity", "auto_fallback", "LayerSensitivity", "FallbackReport", "debug", "DebugReport",
    "enable_onnx_export",
]
