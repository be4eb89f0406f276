"""Exception types for pipeline faults; bad arguments raise ValueError/TypeError."""

from __future__ import annotations


class TrtQuantError(RuntimeError):
    """Base class of every trtquant pipeline fault."""


class QuantizerNotCalibratedError(TrtQuantError):
    """A quantizer must quantize but has no amax yet."""


class CalibrationError(TrtQuantError):
    """Calibration saw no data, non-finite data, or an incompatible statistic."""


class CheckpointError(TrtQuantError):
    """A state dict or calibration cache does not match the model it is loaded into."""


class CacheFileError(TrtQuantError):
    """A cache file is truncated, corrupt, or written for another model."""


class ExportError(TrtQuantError):
    """ONNX export failed or produced a graph TensorRT cannot fuse."""


class EngineBuildError(TrtQuantError):
    """TensorRT could not parse or build the network."""


class TensorRTNotAvailableError(TrtQuantError):
    """The TensorRT Python package is not importable on this machine."""
