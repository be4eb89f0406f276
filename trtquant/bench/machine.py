"""What machine a benchmark ran on: CPU, package versions, GPU, driver, clocks, Jetson power mode.

Latency numbers mean little without this: engines are specific to the GPU and TensorRT
version, and clocks (``nvidia-smi -lgc``, Jetson ``nvpmodel``/``jetson_clocks``) move
results by tens of percent. Every probe is best effort: a missing tool gives ``None``,
never an exception.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from trtquant.engine._trt import cuda_device_info, import_tensorrt
from trtquant.errors import TensorRTNotAvailableError

__all__ = ["collect_machine_info", "package_versions", "parse_cpuinfo"]

_NVIDIA_SMI_FIELDS = (
    "name",
    "driver_version",
    "clocks.sm",
    "clocks.max.sm",
    "clocks.mem",
    "clocks.max.mem",
    "power.limit",
    "persistence_mode",
)


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """CPU model and physical core count from ``/proc/cpuinfo`` text (x86 and ARM layouts)."""
    model = None
    cores: set[tuple[str, str]] = set()
    physical_id = "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if key in ("model name", "hardware", "model", "cpu model") and value and model is None and not value.isdigit():
            model = value
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            cores.add((physical_id, value))
    return {"model": model, "physical_cores": len(cores) or None}


def _run(cmd: list[str], timeout: float = 10.0) -> str | None:
    """stdout of a command, or None when it is missing, fails or hangs."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def package_versions() -> dict[str, str | None]:
    """Versions of torch, torchvision, onnx, onnxruntime, numpy and TensorRT (None when absent)."""
    versions = {
        "python": platform.python_version(),
        "torch": _dist_version("torch"),
        "torchvision": _dist_version("torchvision"),
        "onnx": _dist_version("onnx"),
        "onnxruntime": _dist_version("onnxruntime", "onnxruntime-gpu"),
        "numpy": _dist_version("numpy"),
    }
    try:  # Jetson's apt-installed TensorRT has no pip metadata, so ask the module itself
        versions["tensorrt"] = str(import_tensorrt().__version__)
    except TensorRTNotAvailableError:
        versions["tensorrt"] = None
    return versions


def _nvidia_smi(index: int) -> dict[str, str] | None:
    out = _run(
        ["nvidia-smi", f"--id={index}", f"--query-gpu={','.join(_NVIDIA_SMI_FIELDS)}", "--format=csv,noheader,nounits"]
    )
    if out is None:
        return None
    values = [v.strip() for v in out.splitlines()[0].split(",")]
    return dict(zip(_NVIDIA_SMI_FIELDS, values)) if len(values) == len(_NVIDIA_SMI_FIELDS) else None


def _jetson_info() -> dict[str, Any] | None:
    release = Path("/etc/nv_tegra_release")
    if not release.is_file() and "tegra" not in platform.release().lower():
        return None
    try:
        l4t = release.read_text(encoding="utf-8", errors="replace").splitlines()[0].strip()
    except (OSError, IndexError):
        l4t = None
    return {
        "l4t_release": l4t,
        "nvpmodel": _run(["nvpmodel", "-q"]),  # power mode (0 = MAXN on AGX Orin)
        "jetson_clocks": _run(["jetson_clocks", "--show"]),  # usually needs root; None when unreadable
    }


def collect_machine_info(device: str | int | None = None) -> dict[str, Any]:
    """A JSON-ready description of this machine for benchmark reports.

    Args:
        device: the CUDA device benchmarked (default: current); ignored without CUDA.
    """
    try:
        cpuinfo = parse_cpuinfo(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        cpuinfo = {"model": None, "physical_cores": None}
    cpu = {
        "model": cpuinfo["model"] or platform.processor() or None,
        "logical_cores": os.cpu_count(),
        "physical_cores": cpuinfo["physical_cores"],
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    torch_threads = None
    if "torch" in sys.modules:
        torch_threads = sys.modules["torch"].get_num_threads()
    gpu = None
    info = None if device == "cpu" else cuda_device_info(device)
    if info is not None:
        gpu = {**info, "nvidia_smi": _nvidia_smi(int(info["index"]))}
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu,
        "torch_threads": torch_threads,
        "packages": package_versions(),
        "gpu": gpu,
        "jetson": _jetson_info(),
    }
