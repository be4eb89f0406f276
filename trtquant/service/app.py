"""The HTTP API of the engine-build service (FastAPI).

Endpoints (OpenAPI UI at ``/docs``, schema at ``/openapi.json``):

* ``POST /v1/builds`` — multipart form: ``file`` (the ONNX, one file, no external data) and
  ``options`` (a JSON object, see :class:`~trtquant.service.jobs.BuildOptions`; optional).
  202 ``{"id", "status", "cache_hit", "key", "url"}``. 401 bad/missing token, 408 upload
  stalled (no bytes for ``upload_read_timeout_s``), 413 upload over the limit or a model
  whose tensors exceed the memory budget, 415 not multipart, 422 malformed form, unknown or
  invalid options, unparseable ONNX, ``check_onnx`` errors (``findings`` in the body), a
  float model without Q/DQ (unless ``allow_float``), shapes that do not fit the model;
  507/503 when the service's own storage is full or not writable. Nothing is stored and no
  job is created on any 4xx/5xx.
* ``GET /v1/builds/{id}`` — status (``queued``/``running``/``succeeded``/``failed``), error,
  build log (live while running), timestamps, backend, ``cache_hit``/``built``.
* ``GET /v1/builds/{id}/artifact`` — the engine (TensorRT) or the ORT-optimized ONNX;
  409 unless the job succeeded; 404 unknown job or artifact no longer cached.
* ``GET /v1/builds/{id}/report`` — validator report, layer-precision report (TensorRT),
  benchmark (when requested), build metadata, ORT parity check.
* ``GET /healthz`` — backend, version, queue depth (no auth: for container health checks).

Scale-out mode (``ServiceConfig.scale_out``, :mod:`~trtquant.service.scale_out`): ``POST
/v1/builds?kinds=a,b`` (default: every GPU kind online) answers one job per kind; ``GET`` on
the submission shows each kind's state; ``/artifact?kind=`` picks one kind's artifact (sha256
checked before serving); ``/healthz`` covers Postgres and the broker (503 when either is
down); ``GET /metrics`` is the Prometheus endpoint.

Uploads are streamed to disk in the work folder; the byte count is enforced while
streaming (and up front from ``Content-Length``), so an oversized upload is never held in
memory. Bearer-token auth is on when the token environment variable is non-empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import hmac
import json
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Path as PathParam, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from trtquant.service.backends import Backend, select_backend
from trtquant.service.jobs import BUILD_DELAY_ENV, BuildManager, BuildOptions, check_shapes
from trtquant.service.store import ArtifactStore, Job, JobStore, iso_time, jsonable

__all__ = ["ServiceConfig", "create_app"]

_LOG = logging.getLogger("trtquant.service")

JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
MAX_OPTIONS_BYTES = 64 * 1024
#: After an upload crosses the limit, read (and discard) at most this much more before
#: answering 413, so the client sees the response instead of a reset connection.
DRAIN_LIMIT_BYTES = 8 * 1024 * 1024
_FILENAME_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class ServiceConfig:
    """Settings of one service instance.

    Attributes:
        workdir: uploads, scratch, artifacts (``cache/``) and timing caches live here.
        db_path: the SQLite job database (default ``<workdir>/jobs.db``).
        workers: build worker threads (1 = one build at a time, right for one GPU).
        max_upload_bytes: largest accepted request body (413 above).
        token: bearer token; ``None``/empty = no auth.
        backend: ``"auto"``, ``"tensorrt"`` or ``"onnxruntime"`` (None: ``$TRTQUANT_SERVICE_BACKEND`` or auto).
        build_delay_s: test hook (``$TRTQUANT_SERVICE_TEST_BUILD_DELAY_S``): sleep before publishing.
        validate_concurrency: uploads parsed/validated at the same time (CPU and memory bound).
        upload_read_timeout_s: longest wait for the next chunk of an upload (408 after it): a
            stalled client must not hold a connection and a partial file forever.
        max_tensor_elements: largest tensor a model may declare (inputs at their largest
            profile shape, initializers, constant-shaped ConstantOfShape/Expand/Tile/Range
            outputs); checked before anything is allocated, so a tiny upload cannot make a
            build allocate gigabytes (413 above).
        max_graph_bytes: the same tensors' total size (413 above).
        lease_s: a running build's lease; the watchdog fails a build whose lease ran out (its
            thread or process is gone) and releases the submissions waiting on it.
        cache_max_bytes, cache_max_age_s: artifact cache eviction, least recently used first,
            never an artifact a job still needs or a download in progress (None: no limit).
        reference_input_budget_bytes: largest input set the ONNX Runtime reference run draws
            (the build fails with a clear message above it, before allocating).
        scale_out: run as a stateless API node of the scale-out mode (jobs in Postgres, builds
            on Celery workers per GPU kind; see :mod:`~trtquant.service.scale_out`). Off: the
            embedded mode (SQLite, build threads in this process).
        database_url: Postgres URL of the job store (scale-out).
        broker_url: Celery broker URL, ``redis://...`` (scale-out).
        shared_dir: artifact and upload folder shared by every node (scale-out; default ``workdir``).
        artifact_url: ``s3://bucket[/prefix]``: artifacts and uploads in an S3-compatible object
            store instead of the shared folder (scale-out; see :mod:`~trtquant.service.object_store`).
        redis_key_prefix: prefix of this deployment's Redis keys (scale-out).
        worker_ttl_s: a worker whose heartbeat is older is offline (scale-out).
        no_worker_grace_s: a queued build of a kind with no worker online fails after this (scale-out).
        max_attempts: claims of one build before a lost worker fails it instead of requeueing (scale-out).
        watchdog_interval_s: period of the scale-out watchdog (default lease_s/4, 0.5-5 s).
        redispatch_after_s: re-send a build still queued this long after it was sent (a broker
            that lost its queue); duplicates are no-ops (scale-out).
    """

    workdir: Path
    db_path: Path | None = None
    workers: int = 1
    max_upload_bytes: int = 512 * 1024 * 1024
    token: str | None = None
    backend: str | None = None
    build_delay_s: float = 0.0
    validate_concurrency: int = 2
    upload_read_timeout_s: float = 60.0
    max_tensor_elements: int = 1 << 26
    max_graph_bytes: int = 4 << 30
    lease_s: float = 60.0
    cache_max_bytes: int | None = 10 << 30
    cache_max_age_s: float | None = 30 * 86400.0
    reference_input_budget_bytes: int | None = 1 << 30
    scale_out: bool = False
    database_url: str | None = None
    broker_url: str | None = None
    shared_dir: Path | None = None
    artifact_url: str | None = None
    redis_key_prefix: str | None = None
    worker_ttl_s: float = 15.0
    no_worker_grace_s: float = 60.0
    max_attempts: int = 3
    watchdog_interval_s: float | None = None
    redispatch_after_s: float = 900.0

    @classmethod
    def from_env(cls, workdir: str | os.PathLike[str], **kwargs: Any) -> ServiceConfig:
        """A config with ``build_delay_s`` read from the test-hook environment variable."""
        from trtquant.settings import get_settings

        delay = get_settings().test_build_delay_s  # $TRTQUANT_SERVICE_TEST_BUILD_DELAY_S (BUILD_DELAY_ENV)
        return cls(workdir=Path(workdir), build_delay_s=delay, **kwargs)


class _Rejected(Exception):
    """An error response (4xx, or 5xx for the service's own faults) raised from anywhere in a submission."""

    def __init__(self, status: int, detail: Any, **extra: Any) -> None:
        super().__init__(str(detail))
        self.status = status
        self.body = {"detail": detail, **extra}

    def response(self) -> JSONResponse:
        """The JSON response; a body that JSON cannot hold (NaN, bytes) falls back to the detail alone
        rather than failing mid-response (the client would see a dropped connection)."""
        try:
            return JSONResponse(self.body, status_code=self.status)
        except (TypeError, ValueError):
            return JSONResponse({"detail": str(self.body["detail"])}, status_code=self.status)


class _UploadStalled(Exception):
    """No upload bytes arrived within ``upload_read_timeout_s``."""


_STORAGE_FULL = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code is not None)
_STORAGE_READ_ONLY = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def _storage_fault(exc: OSError, doing: str) -> _Rejected:
    """A 507/503 for an OSError of the service's own storage. The client learns what failed, never
    where: OSError messages carry server paths, so those go to the server log only."""
    _LOG.error("storage fault while %s: %s", doing, exc)
    if exc.errno in _STORAGE_FULL:
        return _Rejected(507, f"the service's storage is full ({doing}); try again later or ask the operator")
    if exc.errno in _STORAGE_READ_ONLY or isinstance(exc, PermissionError):
        return _Rejected(503, f"the service's storage is not writable ({doing}); ask the operator")
    code = errno.errorcode.get(exc.errno or 0, "I/O error")
    return _Rejected(503, f"the service's storage failed ({doing}: {code}); try again later")


def _multipart() -> tuple[Any, Any]:
    """python-multipart's parser and header parser (module ``python_multipart`` since 0.0.13, ``multipart`` before)."""
    try:
        from python_multipart.multipart import MultipartParser, parse_options_header
    except ImportError:  # python-multipart < 0.0.13
        from multipart.multipart import MultipartParser, parse_options_header  # type: ignore[no-redef,import-untyped,unused-ignore]
    return MultipartParser, parse_options_header


def _safe_filename(name: str | None) -> str | None:
    """A display-only form of the client's file name (never used as a path)."""
    if not name:
        return None
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = _FILENAME_SAFE.sub("_", base).strip("._")[:128]
    return base or None


class _MultipartSink:
    """python-multipart callbacks: the ``file`` part streams to disk (hashed), ``options`` to a bounded buffer."""

    def __init__(self, boundary: bytes, file_path: Path) -> None:
        MultipartParser, _ = _multipart()
        self.file_path = file_path
        self.parser = MultipartParser(boundary, callbacks={
            "on_part_begin": self._part_begin, "on_part_data": self._part_data, "on_part_end": self._part_end,
            "on_header_field": self._header_field, "on_header_value": self._header_value,
            "on_header_end": self._header_end, "on_headers_finished": self._headers_finished, "on_end": self._end,
        })
        self.sha = hashlib.sha256()
        self.file_bytes = 0
        self.filename: str | None = None
        self.options: bytearray | None = None
        self.ended = False
        self.seen: set[str] = set()
        self._field = b""
        self._value = b""
        self._headers: dict[bytes, bytes] = {}
        self._current: str | None = None
        self._handle: Any = None

    # parser callbacks
    def _part_begin(self) -> None:
        self._headers, self._current = {}, None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.strip().lower()] = self._value.strip()
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, parse_options_header = _multipart()
        kind, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if kind != b"form-data" or name not in ("file", "options"):
            raise _Rejected(422, f"unexpected form field {name[:64]!r}: send 'file' (the ONNX) and 'options' (JSON)")
        if name in self.seen:
            raise _Rejected(422, f"form field {name!r} given twice")
        self.seen.add(name)
        self._current = name
        if name == "file":
            raw = params.get(b"filename")
            self.filename = _safe_filename(raw.decode("utf-8", "replace") if raw else None)
            try:
                self._handle = self._open_file()
            except OSError as exc:
                raise _storage_fault(exc, "storing the upload") from None
        else:
            self.options = bytearray()

    def _open_file(self) -> Any:
        return open(self.file_path, "xb", buffering=1 << 20)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._current == "file":
            self.sha.update(chunk)
            self.file_bytes += len(chunk)
            try:
                self._handle.write(chunk)
            except OSError as exc:
                raise _storage_fault(exc, "storing the upload") from None
        elif self._current == "options" and self.options is not None:
            self.options += chunk
            if len(self.options) > MAX_OPTIONS_BYTES:
                raise _Rejected(422, f"options exceed {MAX_OPTIONS_BYTES} bytes")

    def _part_end(self) -> None:
        if self._current == "file" and self._handle is not None:
            handle, self._handle = self._handle, None
            try:
                handle.close()  # flushes the buffer: a full disk often shows only here
            except OSError as exc:
                raise _storage_fault(exc, "storing the upload") from None
        self._current = None

    def _end(self) -> None:
        self.ended = True

    def feed(self, chunk: bytes) -> None:
        if self.ended or not chunk:
            return  # epilogue after the closing boundary
        self.parser.write(chunk)

    def close(self) -> None:
        """Close an upload abandoned mid-part (error paths only: the file is deleted next), so a
        failing flush must not replace the response already chosen."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            with contextlib.suppress(OSError):
                handle.close()


class _CheckCache:
    """Validator results per (ONNX sha256, target, strongly_typed), computed once even when
    identical uploads arrive together (single flight)."""

    def __init__(self, size: int = 64) -> None:
        self._lock = threading.Lock()
        self._flights: dict[tuple[Any, ...], threading.Lock] = {}
        self._results: OrderedDict[tuple[Any, ...], tuple[dict[str, Any], bool, dict[str, Any]]] = OrderedDict()
        self._size = size

    def get(self, key: tuple[Any, ...], compute: Any) -> tuple[dict[str, Any], bool, dict[str, Any]]:
        with self._lock:
            flight = self._flights.setdefault(key, threading.Lock())
        with flight:
            with self._lock:
                if key in self._results:
                    self._results.move_to_end(key)
                    return self._results[key]
            try:
                result = compute()
                with self._lock:
                    self._results[key] = result
                    while len(self._results) > self._size:
                        self._results.popitem(last=False)
            finally:
                with self._lock:
                    self._flights.pop(key, None)
            return result


def _options_error(error: Any) -> dict[str, Any]:
    """One pydantic error as plain JSON (no ``input``/``ctx``: they can hold bytes, NaN or exceptions)
    with ``field``, the dotted option name (``options`` for the whole form field)."""
    loc = [part if isinstance(part, int) else str(part) for part in error.get("loc", ())]
    field = ".".join(str(part) for part in loc) or "options"
    value, msg = error.get("input"), str(error.get("msg", "invalid"))
    if error.get("type") == "model_type" and not loc:
        msg = f"must be a JSON object, got {type(value).__name__ if value is not None else 'null'}"
    elif isinstance(value, float) and not math.isfinite(value):
        msg = f"{msg} (got {value}: NaN, Infinity and numbers beyond the float range such as 1e400 are not accepted)"
    return {"type": str(error.get("type", "")), "loc": loc, "field": field, "msg": msg}


def _parse_options(raw: bytes | None) -> BuildOptions:
    """The ``options`` form field as BuildOptions; every client mistake in it (not UTF-8, not JSON,
    not an object, NaN/Infinity, unknown or invalid values) is a 422 that names the field."""
    data = raw or b"{}"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Rejected(422, f"form field 'options' is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                             f"{exc.start}); send a JSON object") from None
    try:
        return BuildOptions.model_validate_json(data)
    except ValidationError as exc:
        errors = [_options_error(error) for error in exc.errors(include_url=False)]
        summary = "; ".join(f"{e['field']}: {e['msg']}" for e in errors[:5])
        raise _Rejected(422, f"invalid build options: {summary}", errors=errors) from None


@dataclass(frozen=True)
class _BudgetTensor:
    """One tensor the build would hold in memory, sized from the graph alone."""

    kind: str
    name: str
    shape: tuple[int, ...]
    elem_type: int
    elements: int
    bytes: int


#: Ops whose output size comes from constant inputs rather than from bytes in the upload.
_GENERATOR_OPS = frozenset({"ConstantOfShape", "Expand", "Tile", "Range"})
#: Constants up to this many elements are read (shape vectors, scalars); larger ones only sized.
_SMALL_CONSTANT = 64


def _itemsize(elem_type: int) -> int:
    from onnx import helper

    try:
        return max(1, int(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize))
    except Exception:  # UNDEFINED or a type numpy does not know: assume 4 bytes
        return 4


def _product(dims: Any) -> int:
    return math.prod(int(d) for d in dims)


def _budget_tensor(kind: str, name: str, shape: Any, elem_type: int) -> _BudgetTensor:
    shape = tuple(int(d) for d in shape)
    elements = _product(shape)
    return _BudgetTensor(kind, name, shape, elem_type, elements, elements * _itemsize(elem_type))


def _input_budget_shapes(proto: Any, options: BuildOptions) -> dict[str, tuple[list[int], int]]:
    """Each graph input at the largest shape a build uses: static dims as declared, dynamic ones at
    the profile's ``max`` (1 without a profile). {name: (dims, elem_type)}."""
    initializers = {t.name for t in proto.graph.initializer}
    shapes: dict[str, tuple[list[int], int]] = {}
    for value in proto.graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        tensor_type = value.type.tensor_type
        profile = options.shapes.get(value.name)
        if not tensor_type.HasField("shape"):
            if profile is not None:
                shapes[value.name] = (list(profile.max), tensor_type.elem_type)
            continue
        declared = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim]
        largest = list(profile.max) if profile is not None and len(profile.max) == len(declared) else [1] * len(declared)
        shapes[value.name] = ([d if d is not None else m for d, m in zip(declared, largest)], tensor_type.elem_type)
    return shapes


def _small_constants(proto: Any) -> dict[str, Any]:
    """Values of the top-level graph's small constants (initializers and Constant nodes): the shape,
    repeat and range inputs the generator ops read. Large ones are never materialized."""
    from onnx import numpy_helper

    values: dict[str, Any] = {}

    def read(name: str, tensor: Any) -> None:
        if _product(tensor.dims) <= _SMALL_CONSTANT and tensor.data_location != 1:  # not EXTERNAL
            with contextlib.suppress(Exception):
                values[name] = numpy_helper.to_array(tensor)

    for tensor in proto.graph.initializer:
        read(tensor.name, tensor)
    for node in proto.graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or not node.output:
            continue
        for attr in node.attribute:
            if attr.name == "value" and attr.HasField("t"):
                read(node.output[0], attr.t)
            elif attr.name == "value_int":
                values[node.output[0]] = np.array(attr.i, np.int64)
            elif attr.name == "value_ints" and len(attr.ints) <= _SMALL_CONSTANT:
                values[node.output[0]] = np.array(list(attr.ints), np.int64)
            elif attr.name == "value_float":
                values[node.output[0]] = np.array(attr.f, np.float32)
    return values


def _inferred_shapes(proto: Any, input_shapes: dict[str, tuple[list[int], int]]) -> dict[str, tuple[list[int] | None, int]]:
    """ONNX shape inference on a skeleton of the graph: inputs pinned to their budget shapes, large
    constants replaced by inputs of the same type and shape (so nothing big is copied or read).
    {tensor: (dims, or None where not fully static; elem_type)}; {} when inference fails."""
    import onnx
    from onnx import helper

    graph = onnx.GraphProto(name=proto.graph.name)
    constant_inputs: list[Any] = []
    for node in proto.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
        if (node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None
                and _product(value.dims) > _SMALL_CONSTANT and node.output):
            constant_inputs.append(helper.make_tensor_value_info(node.output[0], value.data_type, list(value.dims)))
        else:
            graph.node.append(node)
    for tensor in proto.graph.initializer:
        if _product(tensor.dims) <= _SMALL_CONSTANT:
            graph.initializer.append(tensor)
        else:
            constant_inputs.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    for sparse in proto.graph.sparse_initializer:
        constant_inputs.append(helper.make_tensor_value_info(sparse.values.name, sparse.values.data_type,
                                                             list(sparse.dims)))
    for name, (dims, elem_type) in input_shapes.items():
        graph.input.append(helper.make_tensor_value_info(name, elem_type, dims))
    graph.input.extend(constant_inputs)
    graph.output.extend(proto.graph.output)
    skeleton = onnx.ModelProto(ir_version=proto.ir_version)
    skeleton.opset_import.extend(proto.opset_import)
    skeleton.functions.extend(proto.functions)
    skeleton.graph.CopyFrom(graph)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # a graph inference cannot follow: the own evaluation below still runs
        _LOG.debug("shape inference for the memory budget failed: %s", exc)
        return {}
    shapes: dict[str, tuple[list[int] | None, int]] = {}
    for value in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        tensor_type = value.type.tensor_type
        known: list[int] | None = None
        if value.type.HasField("tensor_type") and tensor_type.HasField("shape"):
            static = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
            known = static if all(d >= 0 for d in static) else None
        shapes[value.name] = (known, tensor_type.elem_type)
    return shapes


def _generator_shape(node: Any, constants: dict[str, Any],
                     shapes: dict[str, tuple[list[int] | None, int]]) -> tuple[list[int], int] | None:
    """The output (dims, elem_type) of a ConstantOfShape/Expand/Tile/Range whose size inputs are
    constants, worked out here where shape inference gives up (Expand, Range); None if unknown."""
    def const(index: int) -> Any:
        return constants.get(node.input[index]) if len(node.input) > index else None

    def data_shape() -> tuple[list[int] | None, int]:
        return shapes.get(node.input[0], (None, 1)) if node.input else (None, 1)

    try:
        if node.op_type == "ConstantOfShape":
            dims = const(0)
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if dims is None or dims.ndim != 1 or (dims < 0).any():
                return None
            return [int(d) for d in dims], value.data_type if value is not None else 1
        if node.op_type in ("Expand", "Tile"):
            size = const(1)
            if size is None or size.ndim != 1 or (size < 0).any():
                return None
            in_dims, elem_type = data_shape()
            if node.op_type == "Tile":  # unknown input shape: at least the repeats
                base = in_dims if in_dims is not None and len(in_dims) == len(size) else [1] * len(size)
                return [int(b) * int(r) for b, r in zip(base, size)], elem_type
            base = in_dims or []  # Expand: numpy broadcast of the input shape and the given shape
            rank = max(len(base), len(size))
            padded = [1] * (rank - len(base)) + list(base), [1] * (rank - len(size)) + [int(d) for d in size]
            return [max(int(a), int(b)) for a, b in zip(*padded)], elem_type
        if node.op_type == "Range":
            start, limit, delta = const(0), const(1), const(2)
            if start is None or limit is None or delta is None or float(delta) == 0:
                return None
            span = (float(limit) - float(start)) / float(delta)
            count = math.ceil(span) if math.isfinite(span) else 1 << 62
            from onnx import helper

            elem_type = helper.np_dtype_to_tensor_dtype(np.asarray(start).dtype)
            return [max(0, count)], elem_type
    except (TypeError, ValueError, OverflowError):
        return None
    return None


def _budget_tensors(proto: Any, options: BuildOptions) -> list[_BudgetTensor]:
    """Every tensor whose size the graph fixes before a build allocates anything: inputs at their
    largest shapes, initializers and constants (dense size of sparse ones), and the outputs of
    ConstantOfShape/Expand/Tile/Range with constant size inputs."""
    from trtquant.graph.walk import all_tensors

    input_shapes = _input_budget_shapes(proto, options)
    tensors = [_budget_tensor("input", name, dims, elem_type) for name, (dims, elem_type) in input_shapes.items()]
    initializers = {t.name for t in proto.graph.initializer}
    for tensor in all_tensors(proto.graph):  # sparse ones: their stored values and indices here, dense size below
        kind = "initializer" if tensor.name in initializers else "constant"
        tensors.append(_budget_tensor(kind, tensor.name or "(unnamed)", tensor.dims, tensor.data_type))
    for sparse in proto.graph.sparse_initializer:
        tensors.append(_budget_tensor("sparse initializer", sparse.values.name, sparse.dims, sparse.values.data_type))
    generators = [n for n in proto.graph.node if n.op_type in _GENERATOR_OPS and n.domain in ("", "ai.onnx") and n.output]
    if generators:
        shapes = _inferred_shapes(proto, input_shapes)
        constants = _small_constants(proto)
        for node in generators:
            dims, elem_type = shapes.get(node.output[0], (None, 0))
            own = _generator_shape(node, constants, shapes)
            if dims is None and own is None:
                continue
            if dims is None or (own is not None and _product(own[0]) > _product(dims)):
                dims, elem_type = own  # type: ignore[misc]
            tensors.append(_budget_tensor(f"{node.op_type} output", node.output[0], dims, elem_type or 1))
    return tensors


def _size_text(n_bytes: int) -> str:
    return f"{n_bytes / (1 << 30):.2f} GiB" if n_bytes >= 1 << 30 else f"{n_bytes / (1 << 20):.1f} MiB"


def _check_memory_budget(proto: Any, options: BuildOptions, max_elements: int, max_bytes: int) -> None:
    """Reject (413) a model whose declared tensors exceed the per-build memory budget, before any of
    them exists: a 200-byte upload can declare a 6000x6000 input or a 1 GiB ConstantOfShape."""
    tensors = _budget_tensors(proto, options)
    for t in tensors:
        if t.elements > max_elements:
            raise _Rejected(
                413, f"{t.kind} {t.name[:128]!r} of shape {list(t.shape)} has {t.elements:,} elements "
                     f"({_size_text(t.bytes)}); this service builds tensors of at most {max_elements:,} elements",
                tensor=t.name[:256], kind=t.kind, shape=list(t.shape), elements=t.elements, bytes=t.bytes,
                limit_elements=max_elements)
    total = sum(t.bytes for t in tensors)
    if total > max_bytes:
        largest = sorted(tensors, key=lambda t: t.bytes, reverse=True)[:3]
        named = ", ".join(f"{t.kind} {t.name[:64]!r} {list(t.shape)} {_size_text(t.bytes)}" for t in largest)
        raise _Rejected(413, f"the model's inputs, constants and generated tensors need {_size_text(total)}, over this "
                             f"service's limit of {_size_text(max_bytes)} per build (largest: {named})",
                        tensor=largest[0].name[:256], bytes=total, limit_bytes=max_bytes,
                        largest=[{"tensor": t.name[:256], "kind": t.kind, "shape": list(t.shape), "bytes": t.bytes}
                                 for t in largest])


def _validate_onnx(path: Path, options: BuildOptions, *, max_elements: int,
                   max_bytes: int) -> tuple[dict[str, Any], bool, dict[str, Any]]:
    """Parse the upload, check its memory budget, run ``check_onnx``: (report dict, ok, {input: dims});
    raises _Rejected when the file is not a self-contained ONNX model or declares too much memory."""
    import onnx
    from onnx import TensorProto

    from trtquant.export.checker import check_onnx
    from trtquant.graph.index import GraphIndex
    from trtquant.graph.walk import all_tensors

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise _Rejected(422, f"the upload is not a parseable ONNX model: {type(exc).__name__}: {str(exc)[:300]}") from exc
    if proto.ir_version <= 0 or len(proto.graph.node) == 0 or not proto.graph.output:
        raise _Rejected(422, "the upload is not a parseable ONNX model (no IR version, nodes or outputs)")
    if any(t.data_location == TensorProto.EXTERNAL for t in all_tensors(proto.graph)):
        raise _Rejected(422, "the model references external data files; upload a single-file ONNX "
                             "(onnx.save(model, path, save_as_external_data=False); < 2 GB)")
    _check_memory_budget(proto, options, max_elements, max_bytes)  # before anything sized by the graph exists
    index = GraphIndex(proto)
    inputs: dict[str, list[int | None]] = {name: [d if d and d > 0 else None for d in index.shape(name) or ()]
                                           for name in index.inputs}
    report = check_onnx(proto, target=options.target, strongly_typed=options.strongly_typed())
    return jsonable(report.to_dict()), report.ok, inputs


async def _read_message(request: Request, timeout: float | None = None) -> tuple[bytes, bool]:
    """The next body chunk; raises _UploadStalled when none arrives within ``timeout`` seconds."""
    try:
        message = await asyncio.wait_for(request.receive(), timeout)
    except asyncio.TimeoutError:
        raise _UploadStalled() from None
    if message["type"] == "http.disconnect":
        raise ClientDisconnect()
    return message.get("body", b""), bool(message.get("more_body", False))


async def _drain(request: Request, limit: int, timeout: float | None = None) -> None:
    """Read and discard up to ``limit`` more body bytes (lets the client finish sending and read our error);
    a client that stalls meanwhile gets the error at once."""
    drained = 0
    with contextlib.suppress(ClientDisconnect, Exception):
        more = True
        while more and drained <= limit:
            body, more = await _read_message(request, timeout)
            drained += len(body)


def _remove_upload(path: Path) -> None:
    """Delete a (partial) upload; a storage that cannot even delete must not turn the response into a 500."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        _LOG.error("could not remove the upload %s: %s", path, exc)


def _exclusive_lock(path: Path) -> Any:
    """Hold an exclusive ``flock`` on ``path`` (released when the process dies, even by SIGKILL).

    Start-up recovery marks every 'running' job failed and wipes the scratch folder, which is
    only right when no other service process uses the same database or work folder.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, single instance by convention
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        raise RuntimeError(f"{path} is locked: another trtquant service uses this work folder/database; "
                           "give each instance its own --workdir and --db") from exc
    return handle


def create_app(config: ServiceConfig, backend: Backend | None = None) -> FastAPI:
    """The FastAPI application; the build manager starts and stops with its lifespan.

    Args:
        config: the instance settings.
        backend: a backend to use instead of :func:`select_backend` (tests, embedding).
    """
    import trtquant

    if config.artifact_url and not config.scale_out:
        raise ValueError("artifact_url (--artifact-url) is a scale-out option: the embedded mode keeps artifacts "
                         "in its work folder; add --scale-out or drop it")
    workdir = Path(config.workdir)
    state: dict[str, Any] = {}
    check_cache = _CheckCache()
    token = config.token or None
    read_timeout = config.upload_read_timeout_s

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if config.scale_out:
            from trtquant.service.scale_out import ScaleOut

            scale = await run_in_threadpool(ScaleOut, config)
            scale.start()
            state.update(store=scale.store, artifacts=scale.artifacts, backend=None, manager=scale, scale=scale,
                         validate=asyncio.Semaphore(max(1, config.validate_concurrency)))
            _LOG.info("trtquant service: scale-out API node, artifacts in the %s, auth %s", scale.artifacts.describe(),
                      "on" if token else "off")
            try:
                yield
            finally:
                await run_in_threadpool(scale.stop)
            return
        artifacts = ArtifactStore(workdir, cache_max_bytes=config.cache_max_bytes, cache_max_age_s=config.cache_max_age_s)
        db_path = Path(config.db_path or workdir / "jobs.db")
        locks = [_exclusive_lock(workdir / ".service.lock"), _exclusive_lock(db_path.with_name(db_path.name + ".lock"))]
        store = JobStore(db_path)
        chosen = backend if backend is not None else await run_in_threadpool(
            functools.partial(select_backend, config.backend, artifacts.timing,
                              reference_input_budget_bytes=config.reference_input_budget_bytes))
        manager = BuildManager(store, artifacts, chosen, workers=config.workers, build_delay_s=config.build_delay_s,
                               lease_s=config.lease_s)
        await run_in_threadpool(manager.start)
        state.update(store=store, artifacts=artifacts, backend=chosen, manager=manager,
                     validate=asyncio.Semaphore(max(1, config.validate_concurrency)))
        _LOG.info("trtquant service: backend %s %s (%s), workdir %s, auth %s", chosen.name, chosen.version,
                  chosen.device, workdir, "on" if token else "off")
        try:
            yield
        finally:
            await run_in_threadpool(manager.stop)
            store.close()
            for handle in locks:
                handle.close()

    app = FastAPI(
        title="trtquant engine-build service",
        version=trtquant.__version__,
        summary="Q/DQ ONNX in; TensorRT engine (or ORT-optimized ONNX), validator report and latency out.",
        lifespan=lifespan,
    )
    bearer = HTTPBearer(auto_error=False, description="Bearer token (when the service sets one)")

    if config.scale_out:
        from trtquant.service.pg_store import StoreUnavailable

        @app.exception_handler(StoreUnavailable)
        async def _store_down(request: Request, exc: StoreUnavailable) -> JSONResponse:
            _LOG.error("job database unreachable: %s", exc)
            return JSONResponse({"detail": "the job database is unreachable; try again shortly"}, status_code=503)

    async def require_token(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8")):
            if request.method == "POST":
                await _drain(request, 1 << 20, read_timeout)
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    def _job_or_404(job_id: str) -> Job:
        job = state["store"].get(job_id)
        if job is None:
            raise HTTPException(404, f"no build {job_id}")
        return job

    def _job_view(job: Job) -> dict[str, Any]:
        log = job.log
        if job.status == "running":
            live = state["manager"].live_log(job.id)
            if live is not None:
                log = live
        artifact = None
        if job.status == "succeeded":
            record = state["store"].artifact(job.key)
            if record is not None:
                artifact = {"url": f"/v1/builds/{job.id}/artifact", "bytes": record.bytes, "sha256": record.sha256,
                            "filename": f"{job.id}{record.suffix}"}
        return {
            "id": job.id, "status": job.status, "cache_hit": job.cache_hit, "built": job.built,
            "build_job_id": job.id if job.built else job.leader_id, "key": job.key, "error": job.error, "log": log,
            "created_at": iso_time(job.created_at), "started_at": iso_time(job.started_at),
            "finished_at": iso_time(job.finished_at),
            "backend": {"name": job.backend, "version": job.backend_version, "device": job.device},
            "options": job.options, "onnx": {"sha256": job.onnx_sha256, "bytes": job.onnx_bytes, "filename": job.filename},
            "artifact": artifact, "report_url": f"/v1/builds/{job.id}/report",
        }

    async def _submit_scale_out(scale: Any, part: Path, sha: str, sink: _MultipartSink, options: BuildOptions,
                                inputs: dict[str, Any], report: dict[str, Any], kinds: list[str] | None) -> JSONResponse:
        """Commit the submission (one job per kind) to Postgres, then answer 202."""
        from trtquant.service.pg_store import StoreUnavailable
        from trtquant.service.scale_out import ScaleOutRejected

        try:
            body = await run_in_threadpool(
                scale.submit, upload=part, onnx_sha256=sha, onnx_bytes=sink.file_bytes, filename=sink.filename,
                options=options, inputs=inputs, check_report=report, kinds=kinds)
        except ScaleOutRejected as exc:
            raise _Rejected(exc.status, exc.detail, **exc.extra) from None
        except StoreUnavailable:
            raise _Rejected(503, "the job database is unreachable; try again shortly") from None
        except OSError as exc:
            raise _storage_fault(exc, "storing the build") from None
        return JSONResponse(body, status_code=202, headers={"Location": body["url"]})

    options_schema = BuildOptions.model_json_schema()
    upload_body = {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {
                "file": {"type": "string", "format": "binary", "description": "the Q/DQ ONNX model (single file)"},
                "options": {"type": "string", "contentMediaType": "application/json", "contentSchema": options_schema,
                            "description": "BuildOptions as a JSON object; unknown keys -> 422", "default": "{}"},
            },
        }}},
    }

    @app.post(
        "/v1/builds", status_code=202, tags=["builds"], dependencies=[Depends(require_token)],
        openapi_extra={"requestBody": upload_body},
        responses={401: {"description": "missing or wrong token"},
                   408: {"description": "the upload stalled (no data for upload_read_timeout_s)"},
                   413: {"description": "upload over the limit, or model tensors over the memory budget"},
                   415: {"description": "not multipart/form-data"},
                   422: {"description": "bad form, options or ONNX (check_onnx findings in the body), "
                                        "or a float model without allow_float"},
                   503: {"description": "the service's storage is not writable"},
                   507: {"description": "the service's storage is full"}},
    )
    async def submit_build(request: Request) -> JSONResponse:
        """Upload a Q/DQ ONNX and build options; returns the build id (202)."""
        _, parse_options_header = _multipart()
        limit = config.max_upload_bytes
        scale = state.get("scale")
        target_kinds: list[str] | None = None
        if scale is not None:
            from trtquant.service.scale_out import ScaleOutRejected, parse_kinds

            try:
                target_kinds = parse_kinds(request.query_params.get("kinds"))
            except ScaleOutRejected as exc:
                await _drain(request, DRAIN_LIMIT_BYTES, read_timeout)
                return JSONResponse({"detail": exc.detail}, status_code=exc.status)
        kind, params = parse_options_header(request.headers.get("content-type", ""))
        boundary = params.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            await _drain(request, 1 << 20, read_timeout)
            return JSONResponse({"detail": "send multipart/form-data with fields 'file' and 'options'"}, status_code=415)
        declared = request.headers.get("content-length")
        too_big = {"detail": f"upload exceeds the limit of {limit} bytes", "limit_bytes": limit}
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _drain(request, min(int(declared), DRAIN_LIMIT_BYTES), read_timeout)
            return JSONResponse(too_big, status_code=413)
        part = state["artifacts"].uploads / f".upload-{os.urandom(8).hex()}.part"
        sink = _MultipartSink(boundary, part)
        try:
            total, more = 0, True
            try:
                while more:
                    body, more = await _read_message(request, read_timeout)
                    total += len(body)
                    if total > limit:
                        sink.close()
                        _remove_upload(part)
                        await _drain(request, DRAIN_LIMIT_BYTES, read_timeout)
                        return JSONResponse(too_big, status_code=413)
                    sink.feed(body)
            except _Rejected:
                if more:  # let the client finish sending so it reads the 422 instead of a reset
                    await _drain(request, DRAIN_LIMIT_BYTES, read_timeout)
                raise
            except (ClientDisconnect, _UploadStalled):
                raise
            except OSError as exc:  # the sink maps its own I/O errors; anything else of ours lands here
                raise _storage_fault(exc, "storing the upload") from None
            except Exception as exc:  # python-multipart parse errors
                raise _Rejected(422, f"malformed multipart body: {type(exc).__name__}: {exc}") from exc
            finally:
                sink.close()
            if not sink.ended:
                raise _Rejected(422, "malformed multipart body: no closing boundary")
            if "file" not in sink.seen or sink.file_bytes == 0:
                raise _Rejected(422, "form field 'file' (the ONNX model) is missing or empty")
            options = _parse_options(bytes(sink.options) if sink.options else None)
            sha = sink.sha.hexdigest()
            # the profile shapes are in the key: the memory budget checked inside depends on them
            cache_key = (sha, options.target, options.strongly_typed(),
                         json.dumps(options.model_dump(mode="json")["shapes"], sort_keys=True))
            async with state["validate"]:
                report, ok, inputs = await run_in_threadpool(
                    check_cache.get, cache_key,
                    lambda: _validate_onnx(part, options, max_elements=config.max_tensor_elements,
                                           max_bytes=config.max_graph_bytes))
            if not ok:
                errors = [f for f in report["findings"] if f["severity"] == "error"]
                raise _Rejected(422, f"check_onnx found {len(errors)} error(s) for target {options.target}",
                                findings=errors, report=report)
            if not options.allow_float and any(f.get("rule") == "A0-no-qdq" for f in report["findings"]):
                raise _Rejected(422, "no QuantizeLinear/DequantizeLinear: quantize and export with trtquant first, "
                                     "or set allow_float=true", report=report)
            problems = check_shapes(options, inputs)
            if scale is not None:
                if problems:
                    raise _Rejected(422, "shapes do not fit the model", problems=problems, inputs=inputs)
                return await _submit_scale_out(scale, part, sha, sink, options, inputs, report, target_kinds)
            if state["backend"].name == "tensorrt":
                problems += [f"input {name!r} {dims} has dynamic dimensions: TensorRT needs an optimization profile, "
                             f"pass shapes={{{name!r}: {{min, opt, max}}}}"
                             for name, dims in inputs.items() if None in dims and name not in options.shapes]
            if problems:
                raise _Rejected(422, "shapes do not fit the model", problems=problems, inputs=inputs)
            try:
                job = await run_in_threadpool(
                    state["manager"].submit, upload=part, onnx_sha256=sha, onnx_bytes=sink.file_bytes,
                    filename=sink.filename, options=options, inputs=inputs, check_report=report)
            except OSError as exc:
                raise _storage_fault(exc, "storing the build") from None
        except _Rejected as rejected:
            return rejected.response()
        except _UploadStalled:
            return JSONResponse({"detail": f"the upload stalled: no data for {read_timeout:g} s"}, status_code=408,
                                headers={"Connection": "close"})
        except ClientDisconnect:
            return JSONResponse({"detail": "client disconnected"}, status_code=400)
        finally:
            sink.close()
            _remove_upload(part)
        url = f"/v1/builds/{job.id}"
        return JSONResponse({"id": job.id, "status": job.status, "cache_hit": job.cache_hit, "key": job.key, "url": url},
                            status_code=202, headers={"Location": url})

    job_id_param = PathParam(pattern=JOB_ID_PATTERN, description="build id (32 hex characters)")

    @app.get("/v1/builds/{job_id}", tags=["builds"], dependencies=[Depends(require_token)])
    def get_build(job_id: str = job_id_param) -> dict[str, Any]:
        """Status, error, build log (live while running), timestamps and backend of a build.
        Scale-out: a submission id gives each target kind's state (``kinds``)."""
        if state.get("scale") is not None:
            view = state["scale"].view(job_id)
            if view is not None:
                return view
            row = state["store"].job_row(job_id)
            if row is not None:
                return {**_job_view(Job.from_row(row)), "kind": row["kind"], "attempts": row["attempts"],
                        "submission_id": row["submission_id"]}
        return _job_view(_job_or_404(job_id))

    @app.get("/v1/builds/{job_id}/artifact", tags=["builds"], dependencies=[Depends(require_token)],
             response_class=StreamingResponse,
             responses={200: {"content": {"application/octet-stream": {}}}, 404: {"description": "unknown build"},
                        409: {"description": "the build has not succeeded"}})
    def get_artifact(job_id: str = job_id_param,
                     kind: str | None = Query(None, max_length=128, description="scale-out: the GPU kind")) -> StreamingResponse:
        """The engine (TensorRT backend) or the ORT-optimized ONNX (ONNX Runtime backend).
        Scale-out: ``?kind=`` picks the kind of a multi-kind submission; the file's sha256 is
        checked against the record before it is served."""
        scale = state.get("scale")
        if scale is not None:
            from trtquant.service.scale_out import ScaleOutRejected

            try:
                found = scale.artifact_job(job_id, kind)
            except ScaleOutRejected as exc:
                raise HTTPException(exc.status, exc.detail) from None
            if found is None:
                raise HTTPException(404, f"no build {job_id}")
            job = found
        else:
            job = _job_or_404(job_id)
        if job.status != "succeeded":
            raise HTTPException(409, f"build {job.id} is {job.status}; an artifact exists only for succeeded builds")
        record = state["store"].artifact(job.key)
        if record is None or not state["artifacts"].is_complete(record):
            raise HTTPException(404, "the artifact is no longer in the cache; resubmit the build")
        # Opened while pinned: eviction skips it, and an open file stays readable even if evicted later.
        with state["artifacts"].serving(record.key):
            if scale is not None:
                try:
                    path = scale.verified_path(record)  # a local file: the shared one or a download
                except ScaleOutRejected as exc:
                    raise HTTPException(exc.status, exc.detail) from None
            else:
                path = state["artifacts"].path_for(record.key, record.suffix)
            try:
                handle = open(path, "rb")
            except FileNotFoundError:
                raise HTTPException(404, "the artifact is no longer in the cache; resubmit the build") from None
            finally:
                state["artifacts"].release_local(path)
        state["store"].touch_artifact(record.key)

        def chunks() -> Iterator[bytes]:
            with handle:
                while block := handle.read(1 << 20):
                    yield block

        return StreamingResponse(chunks(), media_type="application/octet-stream", headers={
            "Content-Length": str(record.bytes), "ETag": f'"{record.sha256}"', "X-Artifact-SHA256": record.sha256,
            "Content-Disposition": f'attachment; filename="{job.id}{record.suffix}"'})

    @app.get("/v1/builds/{job_id}/report", tags=["builds"], dependencies=[Depends(require_token)])
    def get_report(job_id: str = job_id_param) -> dict[str, Any]:
        """Validator report, layer precision (TensorRT), benchmark, build metadata.
        Scale-out: a submission id gives ``{"kinds": {kind: report}}``."""
        scale = state.get("scale")
        if scale is not None:
            view = scale.view(job_id)
            if view is not None:
                return {"id": job_id, "status": view["status"],
                        "kinds": {kind: get_report(entry["job_id"]) for kind, entry in view["kinds"].items()}}
        job = _job_or_404(job_id)
        extra: dict[str, Any] = {}
        if job.status == "succeeded":
            record = state["store"].artifact(job.key)
            extra = record.report if record is not None else {}
        return {
            "id": job.id, "status": job.status, "cache_hit": job.cache_hit,
            "backend": {"name": job.backend, "version": job.backend_version, "device": job.device},
            "validator": job.check_report, "layers": extra.get("layers"), "benchmark": extra.get("benchmark"),
            "build": extra.get("build"), "parity": extra.get("parity"), "build_time_s": extra.get("build_time_s"),
        }

    @app.get("/metrics", tags=["service"], include_in_schema=True)
    def metrics() -> Response:
        """Prometheus metrics (scale-out mode; no auth, like ``/healthz``): queue depth, running
        builds and workers per kind, build-duration histogram, failures, cache hits."""
        scale = state.get("scale")
        if scale is None:
            raise HTTPException(404, "metrics are served in scale-out mode only")
        from trtquant.service.metrics import StoreCollector, render

        body, content_type = render(StoreCollector(scale.store, scale.worker_ttl_s))
        return Response(body, media_type=content_type)

    @app.get("/healthz", tags=["service"])
    def healthz() -> Any:
        """Liveness plus backend, version and queue depth (no auth). Scale-out: 503 unless both
        Postgres and the broker answer; kinds online with their workers and queue depth."""
        if state.get("scale") is not None:
            status, body = state["scale"].health()
            body.update(service="trtquant", version=trtquant.__version__, auth=token is not None,
                        max_upload_bytes=config.max_upload_bytes)
            return JSONResponse(body, status_code=status)
        counts = state["store"].counts()
        return {
            "status": "ok", "service": "trtquant", "version": trtquant.__version__,
            "backend": state["backend"].describe(), "queue_depth": counts["queued"] - counts["waiting"],
            "running": counts["running"], "waiting": counts["waiting"], "workers": config.workers,
            "builds": counts["builds"], "auth": token is not None, "max_upload_bytes": config.max_upload_bytes,
        }

    return app
