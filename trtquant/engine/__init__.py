"""TensorRT engines: build from ONNX, inspect per-layer precision, run with torch tensors.

Nothing here imports ``tensorrt`` at import time; the functions that need it raise
:class:`~trtquant.errors.TensorRTNotAvailableError` with install routes when it is absent.
"""

from trtquant.engine._trt import (
    TrtVersion,
    cuda_device_info,
    import_tensorrt,
    parse_trt_version,
    tensorrt_available,
    trt_version,
)
from trtquant.engine.build import (
    BuildResult,
    ParserErrorInfo,
    build_engine,
    metadata_path_for,
    resolve_profile_shapes,
)
from trtquant.engine.inspect import LayerInfo, LayerReport, layer_report, parse_engine_information
from trtquant.engine.runtime import IOSpec, TrtRunner

__all__ = [
    "BuildResult",
    "IOSpec",
    "LayerInfo",
    "LayerReport",
    "ParserErrorInfo",
    "TrtRunner",
    "TrtVersion",
    "build_engine",
    "cuda_device_info",
    "import_tensorrt",
    "layer_report",
    "metadata_path_for",
    "parse_engine_information",
    "parse_trt_version",
    "resolve_profile_shapes",
    "tensorrt_available",
    "trt_version",
]

