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
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from ._io import atomic_write_bytes
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


def save_calibration(model: nn.Module, path: Optional[PathLike] = None) -> Path:
    """Store statistics and amax of every quantizer in one safetensors file (default calib_cache/)."""
    from safetensors.torch import save

    from .quantizer import end_shared_observations

    name_quantizers(model)
    end_shared_observations(quantizers(model).values())
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


def load_calibration(model: nn.Module, path: PathLike, method: Optional[str] = None, strict: bool = False,
                     **method_kwargs: Any) -> nn.Module:
    """Restore statistics and amax from ``path``; with ``method``, recompute amax from the stored statistics
    (``strict`` as in :func:`trtquant.calibrate`: quantizers without statistics are disabled, or raise)."""
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
    import math

    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CacheFileError(f"{path}: cannot read TensorRT calibration cache ({e})") from None
    numbered = [(i, ln) for i, ln in enumerate(text.splitlines(), start=1) if ln.strip()]
    if not numbered or not numbered[0][1].startswith("TRT-"):
        raise CacheFileError(f"{path}: missing the 'TRT-<version>-<algorithm>' header line; not a TensorRT calibration cache")
    out: Dict[str, float] = {}
    for lineno, line in numbered[1:]:
        name, sep, value = line.rpartition(":")
        value = value.strip()
        if not sep or not name.strip():
            raise CacheFileError(f"{path}:{lineno}: expected 'tensor_name: hex', got {line!r}")
        if not value or len(value) > 8:
            raise CacheFileError(f"{path}:{lineno}: {value!r} is not a hex float32 (1 to 8 hex digits)")
        try:
            scale = struct.unpack(">f", bytes.fromhex(value.rjust(8, "0")))[0]
        except ValueError:
            raise CacheFileError(f"{path}:{lineno}: {value!r} is not a hex float32") from None
        if not (math.isfinite(scale) and scale >= 0):
            raise CacheFileError(f"{path}:{lineno}: scale {scale!r} of {name.strip()!r} must be finite and >= 0")
        out[name.strip()] = float(torch.tensor(scale, dtype=torch.float32) * 127)
    return out


def _load_onnx(onnx_path: PathLike):
    import onnx

    return onnx.load(str(onnx_path), load_external_data=False)


def _base_dir(onnx_path: PathLike) -> str:
    """Directory the model's external-data paths are relative to."""
    return str(Path(onnx_path).resolve().parent)


def _activation_qdq(model, base_dir: str = ""):
    """(QuantizeLinear node, input tensor, float32 scale) for every per-tensor activation Q in a Q/DQ ONNX."""
    import numpy as np

    from .graph.index import GraphIndex
    from .graph.ops import Q

    g = GraphIndex(model, base_dir)
    for n in g.nodes:
        if n.op_type != Q or n.input[0] in g.initializers or g.const(n.input[0]) is not None:
            continue  # a weight
        scale = g.const(n.input[1])
        if scale is None or scale.size != 1:
            continue
        yield n, n.input[0], float(np.asarray(scale, np.float32).reshape(()))


def export_trt_cache(onnx_path: PathLike, cache_path: PathLike, trt_version: str = "10.3.0",
                     algorithm: str = "EntropyCalibration2") -> Dict[str, float]:
    """TensorRT implicit-INT8 cache (TensorRT 8.x/10.x, Jetson DLA) from a Q/DQ ONNX: one line per
    activation tensor that a QuantizeLinear quantizes, named as in the Q/DQ-free graph."""
    scales = {tensor: scale for _, tensor, scale in _activation_qdq(_load_onnx(onnx_path), _base_dir(onnx_path))}
    if not scales:
        raise ValueError(f"{onnx_path}: no per-tensor activation QuantizeLinear found; export a calibrated model first")
    write_trt_cache(scales, cache_path, trt_version, algorithm)
    return scales


def import_trt_cache(model: nn.Module, cache_path: PathLike, onnx_path: PathLike) -> Dict[str, float]:
    """Set amax from a TensorRT cache, mapping tensor names to quantizers through the ONNX that
    trtquant exported from this model (its QuantizeLinear nodes carry the quantizer's module path)."""
    amax_by_tensor = read_trt_cache(cache_path)
    name_quantizers(model)
    qs = quantizers(model)
    by_scope = {"/" + "/".join(_scope_parts(name)): name for name in qs}
    applied: Dict[str, float] = {}
    from .export.graph_passes import qdq_aliases

    proto = _load_onnx(onnx_path)
    aliases = qdq_aliases(proto)
    for node, tensor, _ in _activation_qdq(proto, _base_dir(onnx_path)):
        if tensor not in amax_by_tensor or not amax_by_tensor[tensor] > 0:
            continue
        # The node itself, and the quantizers whose identical Q/DQ on this tensor export merged into it.
        for node_name in [node.name] + aliases.get(node.name, []):
            scope = node_name.rsplit("/", 1)[0] if "/" in node_name else ""
            qname = by_scope.get(scope)
            if qname is not None:
                qs[qname].amax = torch.tensor(amax_by_tensor[tensor])
                applied[qname] = amax_by_tensor[tensor]
    # Quantizers reading one tensor export as one Q node (the exporter merges identical nodes): the
    # cache line of that tensor is theirs too.
    from .placement.fx_pass import same_tensor_groups

    for group in same_tensor_groups(model):
        have = [applied[g] for g in group if g in applied]
        for g in group:
            if have and g not in applied and g in qs:
                qs[g].amax = torch.tensor(have[0])
                applied[g] = have[0]
    left = [n for n, q in qs.items() if q.is_enabled and q._if_quant and q.amax is None and not q.quant_desc.per_channel]
    if applied and left:
        import logging

        logging.getLogger(__name__).warning(
            "%d quantizer(s) got no amax from %s (the cache lacks their tensor, or the ONNX was not exported "
            "from this model): %s", len(left), cache_path, ", ".join(left[:10]))
    if not applied:
        raise CacheFileError(f"{cache_path}: no tensor name matched a quantizer of this model through {onnx_path} "
                             "(export the ONNX with exporter='legacy' from this model, whose node names carry module paths)")
    return applied


def _scope_parts(qname: str):
    """Legacy exporter scope of a module path: 'layer2.0.downsample.0.x' -> layer2/layer2.0/downsample/downsample.0/x."""
    parts = qname.split(".")
    return [f"{parts[i - 1]}.{p}" if p.isdigit() and i else p for i, p in enumerate(parts)]
