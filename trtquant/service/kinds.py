"""GPU kinds: what a build worker advertises and what a submission targets.

A TensorRT engine only runs on the GPU model and TensorRT version it was built with, so in
scale-out mode every build is routed by *kind*: one Celery queue per kind, and the kind is
part of the cache key. A kind id is a slug that names everything that makes an engine
incompatible: backend and its version, GPU name, compute capability and platform, e.g.
``tensorrt-10.8.0-nvidia-h100-80gb-hbm3-sm90-x86_64`` or
``tensorrt-10.3.0-orin-sm87-jetson`` (ONNX Runtime stands in where TensorRT is absent:
``onnxruntime-1.20.1-cpu-x86_64``).

Tests (and operators pinning a fleet by hand) override the advertised id with
``TRTQUANT_SERVICE_WORKER_KIND`` or ``trtquant worker --kind``.
"""

from __future__ import annotations

import platform
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["KIND_ENV", "KIND_RE", "WorkerKind", "check_kind", "detect_kind", "queue_name", "slug"]

KIND_ENV = "TRTQUANT_SERVICE_WORKER_KIND"
KIND_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
QUEUE_PREFIX = "trtquant.build."


def slug(text: str) -> str:
    """Lowercase, runs of anything but ``[a-z0-9.]`` as one ``-``."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "unknown"


def check_kind(kind: str) -> str:
    """``kind`` if it is a valid kind id; ValueError naming the rule otherwise."""
    if not isinstance(kind, str) or KIND_RE.match(kind) is None:
        raise ValueError(f"kind {str(kind)[:64]!r} is not a kind id: use 1-128 characters of a-z, 0-9, '.', '_', '-' "
                         "starting with a letter or digit")
    return kind


def queue_name(kind: str) -> str:
    """The Celery queue of one kind's builds."""
    return QUEUE_PREFIX + check_kind(kind)


@dataclass(frozen=True)
class WorkerKind:
    """What one build worker advertises (registered in the job store with its heartbeat)."""

    id: str
    backend: str
    backend_version: str
    gpu: str | None
    compute_capability: str | None
    platform: str  # "x86_64", "jetson" or the machine name
    overridden: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _platform() -> str:
    if Path("/etc/nv_tegra_release").is_file():
        return "jetson"
    return slug(platform.machine() or "unknown")


def detect_kind(backend: Any, override: str | None = None) -> WorkerKind:
    """The kind of this machine for ``backend`` (a :class:`~trtquant.service.backends.Backend`).

    ``override`` (``--kind`` / ``$TRTQUANT_SERVICE_WORKER_KIND``) replaces the id only; the
    other fields still describe the real machine, so a mislabelled worker is visible.
    """
    gpu = cc = None
    if backend.name == "tensorrt":
        try:
            from trtquant.engine._trt import cuda_device_info

            info = cuda_device_info() or {}
        except Exception:  # no torch/CUDA: the backend's device string still names the GPU
            info = {}
        gpu = info.get("name") or str(backend.device)
        cc = str(info["compute_capability"]) if info.get("compute_capability") is not None else None
    plat = _platform()
    parts = [backend.name, str(backend.version)]
    if gpu:
        parts.append(gpu)
        if cc:
            parts.append("sm" + cc.replace(".", ""))
    else:
        parts.append("cpu")
    parts.append(plat)
    kind_id = slug("-".join(parts))[:128]
    if override:
        return WorkerKind(check_kind(override), backend.name, str(backend.version), gpu, cc, plat, overridden=True)
    return WorkerKind(check_kind(kind_id), backend.name, str(backend.version), gpu, cc, plat)
