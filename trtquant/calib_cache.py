"""Calibration caches: trtquant's own statistics file, and TensorRT's legacy text cache.

The trtquant cache (safetensors, no pickle) keeps every calibrator's statistics - histograms with
their range, maxima - and the current amax, plus a fingerprint of the quantizer structure, so amax
can be recomputed with another method later without running any data. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from .calibrate import compute_amax, quantizers
from .convert import name_quantizers
from .errors import CacheFileError

FORMAT = "trtquant-calibration"
FORMAT_VERSION = 1
DEFAULT_DIR = Path("calib_cache")

PathLike = Union[str, os.PathLike]


def fingerprint(model: nn.Module) -> str:
    """sha256 of the quantizer structure (names and descriptors): identical for the same quantized architecture."""
    entries = []
    for name, q in sorted(quantizers(model).items()):
        d = q.quant_desc
        entries.append([name, d.num_bits, None if d.axis is None else list(d.axis), d.unsigned, d.calib_method])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write to a temp file beside ``path`` and rename: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


def save_calibration(model: nn.Module, path: Optional[PathLike] = None) -> Path:
    """Store statistics and amax of every quantizer in one safetensors file (default calib_cache/)."""
    from safetensors.torch import save

    name_quantizers(model)
    path = Path(path) if path is not None else DEFAULT_DIR / f"{type(model).__name__}-{fingerprint(model)[:12]}.safetensors"
    tensors: Dict[str, torch.Tensor] = {}
    info: Dict[str, Any] = {}
    for name, q in quantizers(model).items():
        entry: Dict[str, Any] = {"calibrator": None if q._calibrator is None else q._calibrator.kind}
        if q._calibrator is not None:
            for key, value in q._calibrator.state_dict().items():
                tensors[f"{name}::calib::{key}"] = value.detach().cpu().contiguous()
            if getattr(q._calibrator, "_num_bins", None):
                entry["num_bins"] = q._calibrator._num_bins
        if q.amax is not None:
            tensors[f"{name}::amax"] = q.amax.detach().cpu().float().contiguous()
        info[name] = entry
    meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "fingerprint": fingerprint(model),
            "quantizers": json.dumps(info)}
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return path


def load_calibration(model: nn.Module, path: PathLike, method: Optional[str] = None, strict: bool = True,
                     **method_kwargs: Any) -> nn.Module:
    """Restore statistics and amax from ``path``; with ``method``, recompute amax from the stored statistics."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CacheFileError(f"{path}: no such calibration cache; run trtquant.calibrate and save_calibration first")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise CacheFileError(f"{path}: not a readable calibration cache ({e}); the file is truncated or corrupt - "
                             "delete it and calibrate again") from None
    if meta.get("format") != FORMAT:
        raise CacheFileError(f"{path}: not a trtquant calibration cache (format={meta.get('format')!r})")
    if meta.get("version") != str(FORMAT_VERSION):
        raise CacheFileError(f"{path}: cache format version {meta.get('version')} is not supported (this trtquant "
                             f"reads {FORMAT_VERSION}); recalibrate")
    name_quantizers(model)
    try:
        info = json.loads(meta["quantizers"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CacheFileError(f"{path}: corrupt quantizer table ({e})") from None
    qs = quantizers(model)
    if meta.get("fingerprint") != fingerprint(model):
        missing = sorted(set(qs) - set(info))
        extra = sorted(set(info) - set(qs))
        detail = []
        if missing:
            detail.append(f"quantizers not in the cache: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
        if extra:
            detail.append(f"cache entries not in the model: {', '.join(extra[:10])}{' ...' if len(extra) > 10 else ''}")
        if not detail:
            detail.append("same quantizer names but different descriptors (bits, axis, unsigned or calib_method)")
        raise CacheFileError(f"{path}: written for a different model structure; " + "; ".join(detail))
    for name, q in qs.items():
        if q._calibrator is not None:
            prefix = f"{name}::calib::"
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                q._calibrator.load_state_dict(state)
            except (ValueError, KeyError) as e:
                raise CacheFileError(f"{path}: statistics of {name} do not fit its calibrator ({e})") from None
        amax = tensors.get(f"{name}::amax")
        if amax is not None:
            try:
                q.amax = amax
            except ValueError as e:
                raise CacheFileError(f"{path}: {e}") from None
    if method is not None:
        compute_amax(model, method, strict=strict, **method_kwargs)
    return model


# ---- TensorRT legacy (implicit INT8) calibration cache --------------------------------------------

def trt_version_number(version: str) -> int:
    """'8.6.1' -> 8601, '10.3.0' -> 100300 (NV_TENSORRT_VERSION encoding changed at 10)."""
    parts = [int(p) for p in version.split(".")[:3]] + [0, 0]
    major, minor, patch = parts[:3]
    return major * 10000 + minor * 100 + patch if major >= 10 else major * 1000 + minor * 100 + patch


def _float_hex(value: float) -> str:
    if value == 0:
        return "0"
    return struct.pack(">f", value).hex()


def write_trt_cache(scales: Dict[str, float], path: PathLike, trt_version: str = "10.3.0",
                    algorithm: str = "EntropyCalibration2") -> Path:
    """Write ``tensor_name: <hex float32 scale>`` lines under a ``TRT-<version>-<algorithm>`` header."""
    lines = [f"TRT-{trt_version_number(trt_version)}-{algorithm}"]
    for name, scale in scales.items():
        if not (scale >= 0 and scale == scale and scale != float("inf")):
            raise ValueError(f"scale of {name} is {scale!r}; TensorRT needs finite, non-negative scales")
        lines.append(f"{name}: {_float_hex(float(torch.tensor(scale, dtype=torch.float32)))}")
    path = Path(path)
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


def read_trt_cache(path: PathLike) -> Dict[str, float]:
    """Parse a TensorRT calibration cache into ``{tensor_name: amax}`` (amax = scale * 127)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CacheFileError(f"{path}: cannot read TensorRT calibration cache ({e})") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or not lines[0].startswith("TRT-"):
        raise CacheFileError(f"{path}: missing the 'TRT-<version>-<algorithm>' header line; not a TensorRT calibration cache")
    out: Dict[str, float] = {}
    for lineno, line in enumerate(lines[1:], start=2):
        name, sep, value = line.rpartition(":")
        value = value.strip()
        if not sep or not name:
            raise CacheFileError(f"{path}:{lineno}: expected 'tensor_name: hex', got {line!r}")
        try:
            scale = 0.0 if value == "0" else struct.unpack(">f", bytes.fromhex(value.rjust(8, "0")))[0]
        except ValueError:
            raise CacheFileError(f"{path}:{lineno}: {value!r} is not a hex float32") from None
        out[name.strip()] = float(torch.tensor(scale, dtype=torch.float32) * 127)
    return out
