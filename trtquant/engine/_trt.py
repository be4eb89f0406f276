"""Lazy access to the TensorRT Python package, its version, and the CUDA device.

``import trtquant`` must work on machines without TensorRT (CPU CI, laptops), so nothing
here imports ``tensorrt`` at module import time. Code that needs TensorRT calls
:func:`import_tensorrt` first: it raises :class:`~trtquant.errors.TensorRTNotAvailableError`
with the install routes instead of a bare ``ModuleNotFoundError``.

One trap this guards against: the ``tensorrt-stubs`` type-stub wheel installs a
``tensorrt/`` folder holding only ``__init__.pyi``. Python then imports ``tensorrt`` as an
empty namespace package, so ``import tensorrt`` "succeeds" and fails later on
``trt.Builder``. :func:`import_tensorrt` treats such a module as not installed.
"""

from __future__ import annotations

import importlib
import re
import sys
from types import ModuleType
from typing import Any, NamedTuple

from trtquant.errors import TensorRTNotAvailableError

__all__ = [
    "INSTALL_HELP",
    "TrtVersion",
    "cuda_device_info",
    "import_tensorrt",
    "parse_trt_version",
    "tensorrt_available",
    "trt_version",
]

INSTALL_HELP = (
    "Install routes:\n"
    "  - pip install tensorrt-cu12   (CUDA 12 driver/toolkit, TensorRT 10.x)\n"
    "  - pip install tensorrt-cu13   (CUDA 13, TensorRT 11.x; this wheel ships no trtexec)\n"
    "  - the NGC container nvcr.io/nvidia/tensorrt:<YY.MM>-py3 (TensorRT, trtexec and CUDA "
    "preinstalled; needs the NVIDIA Container Toolkit and a driver >= the image's CUDA)\n"
    "  - Jetson: TensorRT ships with JetPack: `sudo apt install python3-libnvinfer` "
    "(python3-libnvinfer-dev for headers), or run in an nvcr.io/nvidia/l4t-jetpack:<L4T> "
    "container matching the host's L4T release.\n"
    "ONNX export, check_onnx and the onnxruntime/torch benchmarks work without TensorRT."
)


class TrtVersion(NamedTuple):
    """A parsed TensorRT version: ``major.minor.patch`` plus the raw string."""

    major: int
    minor: int
    patch: int
    raw: str

    def __str__(self) -> str:
        return self.raw


def parse_trt_version(text: str) -> TrtVersion:
    """Parse ``"10.13.0.35"``, ``"8.6.1"`` or ``"11.0"`` into a :class:`TrtVersion`.

    Raises:
        ValueError: ``text`` does not start with ``<major>.<minor>``.
    """
    match = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    if match is None:
        raise ValueError(f"cannot parse TensorRT version {text!r}: expected '<major>.<minor>[.<patch>]'")
    major, minor, patch = match.group(1), match.group(2), match.group(3) or "0"
    return TrtVersion(int(major), int(minor), int(patch), str(text).strip())


def _is_real_tensorrt(module: ModuleType) -> bool:
    # A namespace package (stub-only install) has no __file__ and no Builder.
    return hasattr(module, "Builder") and hasattr(module, "__version__")


def import_tensorrt() -> ModuleType:
    """Import and return the ``tensorrt`` module.

    Raises:
        TensorRTNotAvailableError: ``tensorrt`` is not importable, fails to load its
            native libraries, or is only the ``tensorrt-stubs`` type stubs. The message
            names the install routes.
    """
    try:
        module = importlib.import_module("tensorrt")
    except ImportError as exc:  # ModuleNotFoundError, or sys.modules["tensorrt"] = None
        raise TensorRTNotAvailableError(
            f"the TensorRT Python package is not importable ({exc}). {INSTALL_HELP}"
        ) from exc
    except OSError as exc:  # the wheel is there but libnvinfer*.so cannot be loaded
        raise TensorRTNotAvailableError(
            f"the TensorRT Python package is installed but its native libraries failed to "
            f"load ({exc}); check that the CUDA driver and the wheel's CUDA major agree. "
            f"{INSTALL_HELP}"
        ) from exc
    if not _is_real_tensorrt(module):
        where = list(getattr(module, "__path__", [])) or getattr(module, "__file__", None)
        raise TensorRTNotAvailableError(
            f"'tensorrt' imports from {where} but is not the TensorRT runtime (no "
            f"tensorrt.Builder): only type stubs such as tensorrt-stubs are installed. "
            f"{INSTALL_HELP}"
        )
    return module


def tensorrt_available() -> bool:
    """True when :func:`import_tensorrt` would succeed (never raises)."""
    try:
        import_tensorrt()
    except TensorRTNotAvailableError:
        return False
    return True


def trt_version() -> TrtVersion:
    """The installed TensorRT version (imports TensorRT; raises when it is absent)."""
    return parse_trt_version(str(import_tensorrt().__version__))


def cuda_device_info(device: int | str | None = None) -> dict[str, Any] | None:
    """Name, compute capability and memory of a CUDA device through ``torch.cuda``.

    Returns ``None`` when torch is not imported-able or no CUDA device is visible. Used
    for engine metadata (engines are specific to SM and TensorRT version) and machine
    info in benchmark reports.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            torch = importlib.import_module("torch")
        except ImportError:
            return None
    if not torch.cuda.is_available():
        return None
    index = torch.device(device if device is not None else "cuda").index
    index = torch.cuda.current_device() if index is None else index
    props = torch.cuda.get_device_properties(index)
    return {
        "index": index,
        "name": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "total_memory_mib": props.total_memory // (1 << 20),
        "multiprocessors": props.multi_processor_count,
        "cuda_runtime": torch.version.cuda,
    }
