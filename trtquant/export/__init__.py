"""Q/DQ ONNX export, TensorRT validator, and ONNX Runtime parity."""

from .checker import CheckReport, Finding, check_onnx
from .compare import Comparison, compare
from .detection import detection_core, detection_roi_head, prepare_images
from .onnx import ExportResult, export_mode, export_onnx
from .parity import TeacherForcedReport, layer_noise, teacher_forced

__all__ = ["export_onnx", "export_mode", "ExportResult", "check_onnx", "CheckReport", "Finding", "compare", "Comparison",
           "detection_core", "detection_roi_head", "prepare_images", "teacher_forced", "TeacherForcedReport",
           "layer_noise"]
