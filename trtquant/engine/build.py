"""Build a TensorRT engine from an ONNX file with the TensorRT Python API (10.x and 11.x).

The flow follows TensorRT's ``samples/python`` ONNX workflow::

    Builder(logger) -> create_network(flags) -> OnnxParser.parse_from_file
      -> IBuilderConfig (profile, workspace, optimization level, timing cache,
         ProfilingVerbosity.DETAILED) -> build_serialized_network -> plan file

Version rules (TensorRT 8.6 / 10.x / 11.x):

* 11.x networks are always strongly typed: ``EXPLICIT_BATCH`` is gone and
  ``STRONGLY_TYPED`` is ignored, so the network is created with no flags; the weak-typing
  precision flags (``BuilderFlag.INT8``/``FP16``) no longer exist.
* 10.x: ``STRONGLY_TYPED`` on request (the default here); ``EXPLICIT_BATCH`` is ignored.
  Weakly typed builds may set INT8/FP16/BF16/FP8 flags (deprecated since 10.12).
* 8.x/9.x: ``EXPLICIT_BATCH`` is required for ONNX, and Q/DQ needs ``BuilderFlag.INT8``.

Everything that decides something (flags, optimization-profile shapes, parser error
text, metadata) is a plain function of plain values so it is unit-tested without
TensorRT; :func:`build_engine` only wires those decisions into TensorRT calls.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from trtquant._io import atomic_write_bytes, atomic_write_text
from trtquant.engine._trt import TrtVersion, cuda_device_info, import_tensorrt, parse_trt_version
from trtquant.engine.inspect import engine_information_json
from trtquant.errors import EngineBuildError

__all__ = [
    "METADATA_SCHEMA_VERSION",
    "BuildResult",
    "ParserErrorInfo",
    "atomic_write_bytes",
    "atomic_write_text",
    "build_engine",
    "build_metadata",
    "collect_parser_errors",
    "engine_cache_key",
    "format_parser_errors",
    "layer_info_path_for",
    "metadata_path_for",
    "network_creation_flags",
    "precision_builder_flags",
    "resolve_profile_shapes",
    "sha256_file",
]

_LOG = logging.getLogger("trtquant.engine")

METADATA_SCHEMA_VERSION = 1

#: TensorRT ``ILogger.Severity`` values (stable since TensorRT 5).
LOGGER_SEVERITIES: dict[str, int] = {
    "internal_error": 0,
    "error": 1,
    "warning": 2,
    "info": 3,
    "verbose": 4,
}
_PY_LOG_LEVEL = {0: logging.CRITICAL, 1: logging.ERROR, 2: logging.WARNING, 3: logging.INFO, 4: logging.DEBUG}

PROFILING_VERBOSITIES = {"detailed": "DETAILED", "layer_names_only": "LAYER_NAMES_ONLY", "none": "NONE"}
HARDWARE_COMPATIBILITY = {"ampere_plus": "AMPERE_PLUS", "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}
#: Weak-typing precision flags accepted in ``precision_flags`` -> ``trt.BuilderFlag`` name.
PRECISION_FLAGS = {"int8": "INT8", "fp16": "FP16", "bf16": "BF16", "fp8": "FP8", "int4": "INT4"}

ShapeArg = Union[int, Sequence[int]]
ProfileShape = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


# --------------------------------------------------------------------------- file helpers


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (ONNX files with weights can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def metadata_path_for(engine_path: str | os.PathLike[str]) -> Path:
    """``model.engine`` -> ``model.engine.json`` (build metadata beside the engine)."""
    path = Path(engine_path)
    return path.with_name(path.name + ".json")


def layer_info_path_for(engine_path: str | os.PathLike[str]) -> Path:
    """``model.engine`` -> ``model.engine.layers.json`` (raw engine-inspector JSON)."""
    path = Path(engine_path)
    return path.with_name(path.name + ".layers.json")


# --------------------------------------------------------------------------- pure decisions


def network_creation_flags(version: TrtVersion, strongly_typed: bool, available: Mapping[str, int]) -> int:
    """The ``create_network`` flag bits for a TensorRT version.

    Args:
        version: the TensorRT version in use.
        strongly_typed: build a strongly typed network (types come from the ONNX; Q/DQ
            scales fix INT8 placement).
        available: ``NetworkDefinitionCreationFlag`` member name -> int value, for the
            members this TensorRT has (``EXPLICIT_BATCH``, ``STRONGLY_TYPED``).

    Raises:
        ValueError: the request cannot be met by this version.
    """
    if version.major >= 11:
        if not strongly_typed:
            raise ValueError(
                f"TensorRT {version} builds only strongly typed networks (weak typing and "
                "BuilderFlag.INT8/FP16 were removed in 11.0); pass strongly_typed=True and "
                "export the ONNX in the precision you want (an FP16 export for INT8+FP16)."
            )
        return 0  # STRONGLY_TYPED is implied (and ignored); EXPLICIT_BATCH no longer exists.
    flags = 0
    if version.major < 10:
        if "EXPLICIT_BATCH" not in available:
            raise ValueError(f"TensorRT {version} lacks NetworkDefinitionCreationFlag.EXPLICIT_BATCH")
        flags |= 1 << available["EXPLICIT_BATCH"]  # ONNX needs explicit batch before 10.0
    if strongly_typed:
        if "STRONGLY_TYPED" not in available:
            raise ValueError(
                f"TensorRT {version} has no strongly typed networks; pass strongly_typed=False "
                "with precision_flags=('int8',) (and 'fp16' for FP16 fallback layers): "
                "Q/DQ needs BuilderFlag.INT8 on this version."
            )
        flags |= 1 << available["STRONGLY_TYPED"]
    return flags


def precision_builder_flags(
    version: TrtVersion,
    strongly_typed: bool,
    precision_flags: Iterable[str],
    available: Iterable[str],
) -> list[str]:
    """Validate weak-typing precision flags and return the ``BuilderFlag`` names to set.

    Args:
        version: the TensorRT version in use.
        strongly_typed: whether the network is strongly typed.
        precision_flags: lowercase names from :data:`PRECISION_FLAGS` (``'int8'``, ``'fp16'``...).
        available: ``BuilderFlag`` member names this TensorRT has.

    Raises:
        ValueError: unknown name, flags on a strongly typed network, or a flag this
            version does not have.
    """
    requested = [str(name).lower() for name in precision_flags]
    unknown = sorted(set(requested) - set(PRECISION_FLAGS))
    if unknown:
        raise ValueError(f"unknown precision flag(s) {unknown}; known: {', '.join(sorted(PRECISION_FLAGS))}")
    if not requested:
        return []
    names = [PRECISION_FLAGS[name] for name in dict.fromkeys(requested)]
    if version.major >= 11:
        raise ValueError(
            f"precision_flags={tuple(requested)}: TensorRT {version} removed the weak-typing "
            f"BuilderFlag.{'/'.join(names)} (11.0 is strongly typed only); export the ONNX in "
            "FP16/BF16 (e.g. ModelOpt AutoCast) with Q/DQ nodes placing INT8, and pass no "
            "precision_flags."
        )
    if strongly_typed:
        raise ValueError(
            f"precision_flags={tuple(requested)} are weak-typing controls and TensorRT rejects "
            f"them on a strongly typed network (\"BuilderFlag::k{names[0]} is not compatible with "
            "a strongly typed network\"); drop them and export the ONNX in the precision you "
            f"want, or pass strongly_typed=False (TensorRT {version} still has weak typing)."
        )
    have = set(available)
    missing = [name for name in names if name not in have]
    if missing:
        raise ValueError(f"TensorRT {version} has no BuilderFlag.{', BuilderFlag.'.join(missing)}")
    if (version.major, version.minor) >= (10, 12):
        _LOG.warning(
            "weakly typed precision flags %s are deprecated since TensorRT 10.12 and removed in 11.0; "
            "prefer strongly typed builds",
            names,
        )
    return names


def _as_shape(name: str, value: ShapeArg, onnx_shape: tuple[int, ...], which: str) -> tuple[int, ...]:
    if isinstance(value, int):
        if any(dim < 0 for dim in onnx_shape[1:]):
            raise ValueError(
                f"{which}['{name}']={value}: an int sets only the batch dimension, but input "
                f"'{name}' {onnx_shape} has other dynamic dimensions; pass a full shape."
            )
        return (value, *onnx_shape[1:])
    shape = tuple(int(dim) for dim in value)
    if len(shape) != len(onnx_shape):
        raise ValueError(
            f"{which}['{name}']={shape} has rank {len(shape)} but the ONNX input is {onnx_shape} "
            f"(rank {len(onnx_shape)})."
        )
    for axis, (got, want) in enumerate(zip(shape, onnx_shape)):
        if got <= 0:
            raise ValueError(f"{which}['{name}']={shape}: dimension {axis} must be > 0.")
        if want >= 0 and got != want:
            raise ValueError(
                f"{which}['{name}']={shape}: dimension {axis} is static ({want}) in the ONNX "
                f"input {onnx_shape}; only the -1 dimensions can vary."
            )
    return shape


def resolve_profile_shapes(
    network_inputs: Mapping[str, Sequence[int]],
    min_shapes: Mapping[str, ShapeArg] | None = None,
    opt_shapes: Mapping[str, ShapeArg] | None = None,
    max_shapes: Mapping[str, ShapeArg] | None = None,
) -> dict[str, ProfileShape]:
    """min/opt/max shapes of one optimization profile for every dynamic network input.

    Args:
        network_inputs: input name -> shape as TensorRT parsed it from the ONNX (-1 for a
            dynamic dimension).
        min_shapes, opt_shapes, max_shapes: per input name, a full shape or an int batch
            size (the other dimensions come from the ONNX).

    Defaults: a missing ``opt`` is ``max`` (else ``min``), a missing ``max`` is ``opt``,
    and a missing ``min`` is ``opt`` with the batch dimension set to 1 when the batch is
    dynamic. An input with dynamic dimensions and no shape at all is an error (TensorRT
    needs bounds); ``min = opt = max`` gives the fastest, most reproducible engine to
    benchmark.

    Raises:
        ValueError: unknown input names, shapes that contradict the ONNX, unordered
            min <= opt <= max, or a dynamic input without any shape.
    """
    given = {"min_shapes": dict(min_shapes or {}), "opt_shapes": dict(opt_shapes or {}), "max_shapes": dict(max_shapes or {})}
    for which, shapes in given.items():
        unknown = sorted(set(shapes) - set(network_inputs))
        if unknown:
            raise ValueError(f"{which} names unknown input(s) {unknown}; network inputs: {sorted(network_inputs)}")
    resolved: dict[str, ProfileShape] = {}
    for name, raw in network_inputs.items():
        onnx_shape = tuple(int(dim) for dim in raw)
        mn, op, mx = (
            _as_shape(name, given[which][name], onnx_shape, which) if name in given[which] else None
            for which in ("min_shapes", "opt_shapes", "max_shapes")
        )
        if all(dim >= 0 for dim in onnx_shape):
            continue  # static input: the _as_shape checks above already rejected mismatches
        if mn is None and op is None and mx is None:
            batch_only = onnx_shape[0] < 0 and all(dim >= 0 for dim in onnx_shape[1:])
            hint = f"max_shapes={{'{name}': 32}}" if batch_only else f"opt_shapes/max_shapes={{'{name}': (...)}}"
            raise ValueError(
                f"input '{name}' has dynamic shape {onnx_shape}: TensorRT needs an optimization "
                f"profile; pass {hint} (min defaults to batch 1), or export with static shapes."
            )
        op = op if op is not None else (mx if mx is not None else mn)
        if op is None:  # unreachable: at least one shape was given (checked above)
            raise ValueError(f"input '{name}': no shape given")
        mx = mx or op
        if mn is None:
            mn = ((1,) + op[1:]) if onnx_shape[0] < 0 else op
        if not all(a <= b <= c for a, b, c in zip(mn, op, mx)):
            raise ValueError(f"input '{name}': need min <= opt <= max per dimension, got min={mn} opt={op} max={mx}")
        resolved[name] = (mn, op, mx)
    return resolved


@dataclass(frozen=True)
class ParserErrorInfo:
    """One ONNX-parser error, with the node it names when TensorRT reports one."""

    index: int
    code: str
    desc: str
    node_index: int | None = None
    node_name: str | None = None
    node_operator: str | None = None

    def __str__(self) -> str:
        where = []
        if self.node_index is not None:
            where.append(f"node {self.node_index}")
        if self.node_name:
            where.append(f"'{self.node_name}'")
        if self.node_operator:
            where.append(f"({self.node_operator})")
        prefix = " ".join(where) if where else "model"
        return f"{prefix}: [{self.code}] {self.desc}"


def _maybe_call(obj: Any, name: str) -> Any:
    attr = getattr(obj, name, None)
    if attr is None:
        return None
    try:
        return attr() if callable(attr) else attr
    except Exception:  # older TensorRT raise on accessors they do not implement
        return None


def collect_parser_errors(parser: Any) -> list[ParserErrorInfo]:
    """Every error an ``OnnxParser`` recorded (``num_errors``, ``get_error(i)``).

    Uses ``node()``, ``node_name()``, ``node_operator()``, ``code()`` and ``desc()`` where the
    TensorRT version has them (``node_name``/``node_operator`` are 8.6+).
    """
    errors = []
    for index in range(int(parser.num_errors)):
        err = parser.get_error(index)
        node = _maybe_call(err, "node")
        code = _maybe_call(err, "code")
        code_text = getattr(code, "name", None) or str(code).split(".")[-1]
        errors.append(
            ParserErrorInfo(
                index=index,
                code=code_text,
                desc=str(_maybe_call(err, "desc") or "").strip(),
                node_index=int(node) if isinstance(node, int) and node >= 0 else None,
                node_name=_maybe_call(err, "node_name") or None,
                node_operator=_maybe_call(err, "node_operator") or None,
            )
        )
    return errors


def format_parser_errors(
    onnx_path: str | os.PathLike[str], errors: Sequence[ParserErrorInfo], version: str, log: Sequence[str] = ()
) -> str:
    """The :class:`EngineBuildError` message for a failed ``parse_from_file``: every error, every node."""
    lines = [f"TensorRT {version}'s ONNX parser rejected {onnx_path} with {len(errors)} error(s):"]
    lines += [f"  {err.index + 1}. {err}" for err in errors]
    if not errors:
        lines.append("  (the parser recorded no error objects; TensorRT log below)")
        lines += [f"    {line}" for line in log[-20:]]
    nodes = sorted({err.node_name for err in errors if err.node_name})
    if nodes:
        lines.append(f"Nodes to fix: {', '.join(nodes)}.")
    lines.append(
        "Fix: run trtquant's ONNX checker on the model for the TensorRT rule each node breaks "
        "(symmetric INT8 Q/DQ, constant scales, explicit per-channel axis, supported opset), "
        "then re-export."
    )
    return "\n".join(lines)


def engine_cache_key(onnx_sha256: str, trt_version: str, gpu: Mapping[str, Any] | None, options: Mapping[str, Any]) -> str:
    """SHA-256 over what makes an engine reusable: ONNX bytes, TensorRT version, GPU (SM), options, shapes."""
    payload = {
        "onnx_sha256": onnx_sha256,
        "tensorrt": trt_version,
        "gpu": None if gpu is None else {"name": gpu.get("name"), "cc": gpu.get("compute_capability")},
        "options": options,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def build_metadata(
    *,
    onnx_path: str | os.PathLike[str],
    onnx_sha256: str,
    engine_path: str | os.PathLike[str],
    engine_sha256: str,
    engine_bytes: int,
    trt_version: str,
    options: Mapping[str, Any],
    profile_shapes: Mapping[str, ProfileShape],
    gpu: Mapping[str, Any] | None,
    build_time_s: float,
    built_at: _dt.datetime | None = None,
) -> dict[str, Any]:
    """The JSON-ready metadata written beside an engine (``<engine>.json``)."""
    built_at = built_at or _dt.datetime.now(_dt.timezone.utc)
    return {
        "schema_version": METADATA_SCHEMA_VERSION,
        "engine": {"path": str(engine_path), "sha256": engine_sha256, "bytes": engine_bytes},
        "onnx": {"path": str(onnx_path), "sha256": onnx_sha256},
        "tensorrt_version": trt_version,
        "gpu": dict(gpu) if gpu is not None else None,
        "options": dict(options),
        "profile_shapes": {name: {"min": list(mn), "opt": list(op), "max": list(mx)} for name, (mn, op, mx) in profile_shapes.items()},
        "build_time_s": round(float(build_time_s), 3),
        "built_at": built_at.isoformat(),
        "host": {"hostname": platform.node(), "python": platform.python_version()},
        "cache_key": engine_cache_key(onnx_sha256, trt_version, gpu, {**options, "profile_shapes": profile_shapes}),
    }


# --------------------------------------------------------------------------- TensorRT wiring


@dataclass(frozen=True)
class BuildResult:
    """What :func:`build_engine` produced.

    Attributes:
        engine_path: the serialized engine (plan).
        metadata_path: ``<engine>.json`` with versions, GPU, options, hashes, build time.
        metadata: the same metadata as a dict.
        layer_report_path: ``<engine>.layers.json``, the engine inspector's JSON (parse it
            with :func:`trtquant.engine.inspect.layer_report`), or ``None`` when
            ``profiling_verbosity='none'``.
        log: TensorRT logger messages at or above ``logger_severity``.
    """

    engine_path: Path
    metadata_path: Path
    metadata: dict[str, Any]
    layer_report_path: Path | None
    log: tuple[str, ...] = field(default=())


def _make_logger(min_severity: int) -> Any:
    """A ``trt.ILogger`` subclass that keeps messages (for error reports) and forwards them to logging."""
    import tensorrt as trt

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.lines: list[str] = []

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            level = int(severity)
            if level > min_severity:
                return
            name = getattr(severity, "name", str(level))
            self.lines.append(f"[{name}] {msg}")
            _LOG.log(_PY_LOG_LEVEL.get(level, logging.INFO), "TensorRT: %s", msg)

    return CapturingLogger()


def _enum_members(enum_type: Any) -> dict[str, int]:
    members = getattr(enum_type, "__members__", {})
    return {name: int(value) for name, value in members.items()}


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    *,
    strongly_typed: bool = True,
    precision_flags: Sequence[str] = (),
    min_shapes: Mapping[str, ShapeArg] | None = None,
    opt_shapes: Mapping[str, ShapeArg] | None = None,
    max_shapes: Mapping[str, ShapeArg] | None = None,
    workspace_mib: int | None = None,
    optimization_level: int = 3,
    timing_cache_path: str | os.PathLike[str] | None = None,
    profiling_verbosity: str = "detailed",
    dla_core: int | None = None,
    gpu_fallback: bool = False,
    version_compatible: bool = False,
    hardware_compatibility: str | None = None,
    logger_severity: str = "warning",
) -> BuildResult:
    """Parse an ONNX file and build a serialized TensorRT engine, plus metadata and layer info.

    Args:
        onnx_path: the ONNX model (external-data files beside it are read too).
        engine_path: where to write the plan (atomically).
        strongly_typed: types come from the ONNX (Q/DQ decide INT8). Required on 11.x.
        precision_flags: weak-typing flags (``'int8'``, ``'fp16'``, ``'bf16'``, ``'fp8'``,
            ``'int4'``) for ``strongly_typed=False`` builds on TensorRT 8.6-10.x only.
        min_shapes, opt_shapes, max_shapes: optimization-profile shapes per dynamic input
            (see :func:`resolve_profile_shapes`).
        workspace_mib: ``MemoryPoolType.WORKSPACE`` limit; ``None`` keeps TensorRT's default
            (the device memory).
        optimization_level: ``builder_optimization_level`` 0-5 (TensorRT default 3).
        timing_cache_path: load the timing cache from here if it exists and save the
            updated cache back (atomically). Caches are specific to a TensorRT version
            and GPU; a mismatched one is ignored and rebuilt.
        profiling_verbosity: ``'detailed'`` (per-layer precision and ONNX node names in
            the inspector), ``'layer_names_only'`` or ``'none'``.
        dla_core: build for this DLA core (Jetson Orin) instead of the GPU.
        gpu_fallback: with ``dla_core``, let layers the DLA cannot run fall back to the GPU
            (silently: check the layer report).
        version_compatible: ``BuilderFlag.VERSION_COMPATIBLE`` (runs on later TensorRT;
            slower). Such engines need ``Runtime.engine_host_code_allowed``.
        hardware_compatibility: ``'ampere_plus'`` or ``'same_compute_capability'``.
        logger_severity: lowest TensorRT log severity kept: ``'internal_error'``,
            ``'error'``, ``'warning'``, ``'info'`` or ``'verbose'``.

    Returns:
        A :class:`BuildResult`.

    Raises:
        TensorRTNotAvailableError: TensorRT is not installed.
        FileNotFoundError: ``onnx_path`` does not exist.
        ValueError: bad arguments, or options this TensorRT version does not support.
        EngineBuildError: the parser rejected the model (every error, every node named) or
            the builder returned no engine (TensorRT's log attached).
    """
    onnx_path = Path(onnx_path)
    engine_path = Path(engine_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model {onnx_path} does not exist")
    if not 0 <= int(optimization_level) <= 5:
        raise ValueError(f"optimization_level={optimization_level}: TensorRT accepts 0-5 (default 3)")
    if profiling_verbosity not in PROFILING_VERBOSITIES:
        raise ValueError(f"profiling_verbosity={profiling_verbosity!r}; known: {', '.join(PROFILING_VERBOSITIES)}")
    if logger_severity not in LOGGER_SEVERITIES:
        raise ValueError(f"logger_severity={logger_severity!r}; known: {', '.join(LOGGER_SEVERITIES)}")
    if hardware_compatibility is not None and hardware_compatibility not in HARDWARE_COMPATIBILITY:
        raise ValueError(
            f"hardware_compatibility={hardware_compatibility!r}; known: {', '.join(HARDWARE_COMPATIBILITY)} or None"
        )
    if workspace_mib is not None and int(workspace_mib) <= 0:
        raise ValueError(f"workspace_mib={workspace_mib} must be > 0 (or None for TensorRT's default)")
    if dla_core is not None and int(dla_core) < 0:
        raise ValueError(f"dla_core={dla_core} must be >= 0")
    if gpu_fallback and dla_core is None:
        raise ValueError("gpu_fallback=True only applies to DLA builds; pass dla_core as well")

    import_tensorrt()  # raises TensorRTNotAvailableError with the install routes
    import tensorrt as trt

    version = parse_trt_version(trt.__version__)
    flags = network_creation_flags(version, strongly_typed, _enum_members(trt.NetworkDefinitionCreationFlag))
    builder_flags = precision_builder_flags(
        version, strongly_typed, precision_flags, _enum_members(trt.BuilderFlag)
    )
    options: dict[str, Any] = {
        "strongly_typed": strongly_typed,
        "precision_flags": list(precision_flags),
        "min_shapes": {k: v if isinstance(v, int) else list(v) for k, v in (min_shapes or {}).items()},
        "opt_shapes": {k: v if isinstance(v, int) else list(v) for k, v in (opt_shapes or {}).items()},
        "max_shapes": {k: v if isinstance(v, int) else list(v) for k, v in (max_shapes or {}).items()},
        "workspace_mib": workspace_mib,
        "optimization_level": int(optimization_level),
        "timing_cache_path": None if timing_cache_path is None else str(timing_cache_path),
        "profiling_verbosity": profiling_verbosity,
        "dla_core": dla_core,
        "gpu_fallback": gpu_fallback,
        "version_compatible": version_compatible,
        "hardware_compatibility": hardware_compatibility,
        "network_flags": flags,
    }

    logger = _make_logger(LOGGER_SEVERITIES[logger_severity])
    started = time.perf_counter()
    builder = trt.Builder(logger)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = collect_parser_errors(parser)
        exc = EngineBuildError(format_parser_errors(onnx_path, errors, str(version), logger.lines))
        setattr(exc, "parser_errors", errors)  # documented extras for callers (errors.py owns the class)
        setattr(exc, "log", tuple(logger.lines))
        raise exc

    network_inputs: dict[str, tuple[int, ...]] = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        network_inputs[tensor.name] = tuple(tensor.shape[axis] for axis in range(len(tensor.shape)))
    profile_shapes = resolve_profile_shapes(network_inputs, min_shapes, opt_shapes, max_shapes)

    config = builder.create_builder_config()
    if profile_shapes:
        profile = builder.create_optimization_profile()
        for name, (mn, op, mx) in profile_shapes.items():
            profile.set_shape(name, trt.Dims(list(mn)), trt.Dims(list(op)), trt.Dims(list(mx)))
        if config.add_optimization_profile(profile) < 0:
            raise EngineBuildError(f"TensorRT rejected the optimization profile {profile_shapes}:\n" + "\n".join(logger.lines))
    if workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    config.builder_optimization_level = int(optimization_level)
    config.profiling_verbosity = getattr(trt.ProfilingVerbosity, PROFILING_VERBOSITIES[profiling_verbosity])
    for flag_name in builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag_name))
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if hardware_compatibility is not None:
        config.hardware_compatibility_level = getattr(
            trt.HardwareCompatibilityLevel, HARDWARE_COMPATIBILITY[hardware_compatibility]
        )
    if dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(dla_core)
        if gpu_fallback:
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)

    cache_path = None if timing_cache_path is None else Path(timing_cache_path)
    if cache_path is not None:
        cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(cache_bytes)
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            _LOG.warning("timing cache %s is unreadable or from another TensorRT/GPU; starting a new one", cache_path)
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        log_tail = "\n".join(f"  {line}" for line in logger.lines[-40:]) or "  (no messages; rerun with logger_severity='verbose')"
        exc = EngineBuildError(
            f"TensorRT {version} parsed {onnx_path} but build_serialized_network returned no engine. "
            f"TensorRT log:\n{log_tail}\nCommon causes: a layer with no implementation for the "
            "requested precision/shape, an out-of-range optimization profile, or too small a "
            "workspace_mib."
        )
        setattr(exc, "log", tuple(logger.lines))
        raise exc
    build_time_s = time.perf_counter() - started

    atomic_write_bytes(engine_path, plan)
    engine_sha256 = hashlib.sha256(plan).hexdigest()
    engine_nbytes = int(plan.nbytes)
    if cache_path is not None:
        atomic_write_bytes(cache_path, config.get_timing_cache().serialize())

    layer_path: Path | None = None
    layer_info_path_for(engine_path).unlink(missing_ok=True)  # never leave a previous build's layer info
    if profiling_verbosity != "none":
        runtime = trt.Runtime(logger)
        runtime.engine_host_code_allowed = bool(version_compatible)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            _LOG.warning("could not deserialize the new engine for layer info; skipping %s", layer_info_path_for(engine_path))
        else:
            layer_path = atomic_write_text(layer_info_path_for(engine_path), engine_information_json(engine))
            del engine

    gpu = cuda_device_info()
    if dla_core is not None and gpu is not None:
        gpu = {**gpu, "dla_core": dla_core}
    metadata = build_metadata(
        onnx_path=onnx_path,
        onnx_sha256=sha256_file(onnx_path),
        engine_path=engine_path,
        engine_sha256=engine_sha256,
        engine_bytes=engine_nbytes,
        trt_version=str(version),
        options=options,
        profile_shapes=profile_shapes,
        gpu=gpu,
        build_time_s=build_time_s,
    )
    metadata_path = atomic_write_text(metadata_path_for(engine_path), json.dumps(metadata, indent=2, sort_keys=True))
    return BuildResult(
        engine_path=engine_path,
        metadata_path=metadata_path,
        metadata=metadata,
        layer_report_path=layer_path,
        log=tuple(logger.lines),
    )
