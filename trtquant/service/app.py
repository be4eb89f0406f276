"""The HTTP API of the engine-build service (FastAPI).

Endpoints (OpenAPI UI at ``/docs``, schema at ``/openapi.json``):

* ``POST /v1/builds`` — multipart form: ``file`` (the ONNX, one file, no external data) and
  ``options`` (a JSON object, see :class:`~trtquant.service.jobs.BuildOptions`; optional).
  202 ``{"id", "status", "cache_hit", "key", "url"}``. 401 bad/missing token, 413 upload
  over the limit, 415 not multipart, 422 malformed form, unknown or invalid options,
  unparseable ONNX, ``check_onnx`` errors (``findings`` in the body), shapes that do not
  fit the model. Nothing is stored and no job is created on any 4xx.
* ``GET /v1/builds/{id}`` — status (``queued``/``running``/``succeeded``/``failed``), error,
  build log (live while running), timestamps, backend, ``cache_hit``/``built``.
* ``GET /v1/builds/{id}/artifact`` — the engine (TensorRT) or the ORT-optimized ONNX;
  409 unless the job succeeded; 404 unknown job or artifact no longer cached.
* ``GET /v1/builds/{id}/report`` — validator report, layer-precision report (TensorRT),
  benchmark (when requested), build metadata, ORT parity check.
* ``GET /healthz`` — backend, version, queue depth (no auth: for container health checks).

Uploads are streamed to disk in the work folder; the byte count is enforced while
streaming (and up front from ``Content-Length``), so an oversized upload is never held in
memory. Bearer-token auth is on when the token environment variable is non-empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Path as PathParam, Request
from fastapi.responses import FileResponse, JSONResponse
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
    """

    workdir: Path
    db_path: Path | None = None
    workers: int = 1
    max_upload_bytes: int = 512 * 1024 * 1024
    token: str | None = None
    backend: str | None = None
    build_delay_s: float = 0.0
    validate_concurrency: int = 2

    @classmethod
    def from_env(cls, workdir: str | os.PathLike[str], **kwargs: Any) -> ServiceConfig:
        """A config with ``build_delay_s`` read from the test-hook environment variable."""
        from trtquant.settings import get_settings

        delay = get_settings().test_build_delay_s  # $TRTQUANT_SERVICE_TEST_BUILD_DELAY_S (BUILD_DELAY_ENV)
        return cls(workdir=Path(workdir), build_delay_s=delay, **kwargs)


class _Rejected(Exception):
    def __init__(self, status: int, detail: Any, **extra: Any) -> None:
        super().__init__(str(detail))
        self.status = status
        self.body = {"detail": detail, **extra}


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
            self._handle = open(self.file_path, "xb", buffering=1 << 20)
        else:
            self.options = bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._current == "file":
            self.sha.update(chunk)
            self.file_bytes += len(chunk)
            self._handle.write(chunk)
        elif self._current == "options" and self.options is not None:
            self.options += chunk
            if len(self.options) > MAX_OPTIONS_BYTES:
                raise _Rejected(422, f"options exceed {MAX_OPTIONS_BYTES} bytes")

    def _part_end(self) -> None:
        if self._current == "file" and self._handle is not None:
            self._handle.close()
            self._handle = None
        self._current = None

    def _end(self) -> None:
        self.ended = True

    def feed(self, chunk: bytes) -> None:
        if self.ended or not chunk:
            return  # epilogue after the closing boundary
        self.parser.write(chunk)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


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


def _validate_onnx(path: Path, options: BuildOptions) -> tuple[dict[str, Any], bool, dict[str, Any]]:
    """Parse the upload and run ``check_onnx``: (report dict, ok, {input: dims}); raises _Rejected
    when the file is not a self-contained ONNX model."""
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
    index = GraphIndex(proto)
    inputs: dict[str, list[int | None]] = {name: [d if d and d > 0 else None for d in index.shape(name) or ()]
                                           for name in index.inputs}
    report = check_onnx(proto, target=options.target, strongly_typed=options.strongly_typed())
    return jsonable(report.to_dict()), report.ok, inputs


async def _read_message(request: Request) -> tuple[bytes, bool]:
    message = await request.receive()
    if message["type"] == "http.disconnect":
        raise ClientDisconnect()
    return message.get("body", b""), bool(message.get("more_body", False))


async def _drain(request: Request, limit: int) -> None:
    """Read and discard up to ``limit`` more body bytes (lets the client finish sending and read our error)."""
    drained = 0
    with contextlib.suppress(ClientDisconnect, Exception):
        more = True
        while more and drained <= limit:
            body, more = await _read_message(request)
            drained += len(body)


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

    workdir = Path(config.workdir)
    state: dict[str, Any] = {}
    check_cache = _CheckCache()
    token = config.token or None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        artifacts = ArtifactStore(workdir)
        db_path = Path(config.db_path or workdir / "jobs.db")
        locks = [_exclusive_lock(workdir / ".service.lock"), _exclusive_lock(db_path.with_name(db_path.name + ".lock"))]
        store = JobStore(db_path)
        chosen = backend if backend is not None else await run_in_threadpool(select_backend, config.backend, artifacts.timing)
        manager = BuildManager(store, artifacts, chosen, workers=config.workers, build_delay_s=config.build_delay_s)
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

    async def require_token(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8")):
            if request.method == "POST":
                await _drain(request, 1 << 20)
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
        responses={401: {"description": "missing or wrong token"}, 413: {"description": "upload over the limit"},
                   415: {"description": "not multipart/form-data"},
                   422: {"description": "bad form, options or ONNX (check_onnx findings in the body)"}},
    )
    async def submit_build(request: Request) -> JSONResponse:
        """Upload a Q/DQ ONNX and build options; returns the build id (202)."""
        _, parse_options_header = _multipart()
        limit = config.max_upload_bytes
        kind, params = parse_options_header(request.headers.get("content-type", ""))
        boundary = params.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            await _drain(request, 1 << 20)
            return JSONResponse({"detail": "send multipart/form-data with fields 'file' and 'options'"}, status_code=415)
        declared = request.headers.get("content-length")
        too_big = {"detail": f"upload exceeds the limit of {limit} bytes", "limit_bytes": limit}
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _drain(request, min(int(declared), DRAIN_LIMIT_BYTES))
            return JSONResponse(too_big, status_code=413)
        part = state["artifacts"].uploads / f".upload-{os.urandom(8).hex()}.part"
        sink = _MultipartSink(boundary, part)
        try:
            total, more = 0, True
            try:
                while more:
                    body, more = await _read_message(request)
                    total += len(body)
                    if total > limit:
                        sink.close()
                        part.unlink(missing_ok=True)
                        await _drain(request, DRAIN_LIMIT_BYTES)
                        return JSONResponse(too_big, status_code=413)
                    sink.feed(body)
            except _Rejected:
                if more:  # let the client finish sending so it reads the 422 instead of a reset
                    await _drain(request, DRAIN_LIMIT_BYTES)
                raise
            except ClientDisconnect:
                raise
            except Exception as exc:  # python-multipart parse errors
                raise _Rejected(422, f"malformed multipart body: {type(exc).__name__}: {exc}") from exc
            finally:
                sink.close()
            if not sink.ended:
                raise _Rejected(422, "malformed multipart body: no closing boundary")
            if "file" not in sink.seen or sink.file_bytes == 0:
                raise _Rejected(422, "form field 'file' (the ONNX model) is missing or empty")
            try:
                options = BuildOptions.model_validate_json(bytes(sink.options) if sink.options else b"{}")
            except ValidationError as exc:
                errors = json.loads(exc.json(include_url=False))
                raise _Rejected(422, "invalid build options", errors=errors) from exc
            sha = sink.sha.hexdigest()
            cache_key = (sha, options.target, options.strongly_typed())
            async with state["validate"]:
                report, ok, inputs = await run_in_threadpool(check_cache.get, cache_key,
                                                             lambda: _validate_onnx(part, options))
            if not ok:
                errors = [f for f in report["findings"] if f["severity"] == "error"]
                raise _Rejected(422, f"check_onnx found {len(errors)} error(s) for target {options.target}",
                                findings=errors, report=report)
            problems = check_shapes(options, inputs)
            if state["backend"].name == "tensorrt":
                problems += [f"input {name!r} {dims} has dynamic dimensions: TensorRT needs an optimization profile, "
                             f"pass shapes={{{name!r}: {{min, opt, max}}}}"
                             for name, dims in inputs.items() if None in dims and name not in options.shapes]
            if problems:
                raise _Rejected(422, "shapes do not fit the model", problems=problems, inputs=inputs)
            job = await run_in_threadpool(
                state["manager"].submit, upload=part, onnx_sha256=sha, onnx_bytes=sink.file_bytes,
                filename=sink.filename, options=options, inputs=inputs, check_report=report)
        except _Rejected as rejected:
            return JSONResponse(rejected.body, status_code=rejected.status)
        except ClientDisconnect:
            return JSONResponse({"detail": "client disconnected"}, status_code=400)
        finally:
            part.unlink(missing_ok=True)
        url = f"/v1/builds/{job.id}"
        return JSONResponse({"id": job.id, "status": job.status, "cache_hit": job.cache_hit, "key": job.key, "url": url},
                            status_code=202, headers={"Location": url})

    job_id_param = PathParam(pattern=JOB_ID_PATTERN, description="build id (32 hex characters)")

    @app.get("/v1/builds/{job_id}", tags=["builds"], dependencies=[Depends(require_token)])
    def get_build(job_id: str = job_id_param) -> dict[str, Any]:
        """Status, error, build log (live while running), timestamps and backend of a build."""
        return _job_view(_job_or_404(job_id))

    @app.get("/v1/builds/{job_id}/artifact", tags=["builds"], dependencies=[Depends(require_token)],
             response_class=FileResponse,
             responses={200: {"content": {"application/octet-stream": {}}}, 404: {"description": "unknown build"},
                        409: {"description": "the build has not succeeded"}})
    def get_artifact(job_id: str = job_id_param) -> FileResponse:
        """The engine (TensorRT backend) or the ORT-optimized ONNX (ONNX Runtime backend)."""
        job = _job_or_404(job_id)
        if job.status != "succeeded":
            raise HTTPException(409, f"build {job.id} is {job.status}; an artifact exists only for succeeded builds")
        record = state["store"].artifact(job.key)
        if record is None or not state["artifacts"].is_complete(record):
            raise HTTPException(404, "the artifact is no longer in the cache; resubmit the build")
        path = state["artifacts"].path_for(record.key, record.suffix)
        return FileResponse(path, media_type="application/octet-stream", filename=f"{job.id}{record.suffix}",
                            headers={"ETag": f'"{record.sha256}"', "X-Artifact-SHA256": record.sha256})

    @app.get("/v1/builds/{job_id}/report", tags=["builds"], dependencies=[Depends(require_token)])
    def get_report(job_id: str = job_id_param) -> dict[str, Any]:
        """Validator report, layer precision (TensorRT), benchmark, build metadata."""
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

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict[str, Any]:
        """Liveness plus backend, version and queue depth (no auth)."""
        counts = state["store"].counts()
        return {
            "status": "ok", "service": "trtquant", "version": trtquant.__version__,
            "backend": state["backend"].describe(), "queue_depth": counts["queued"] - counts["waiting"],
            "running": counts["running"], "waiting": counts["waiting"], "workers": config.workers,
            "builds": counts["builds"], "auth": token is not None, "max_upload_bytes": config.max_upload_bytes,
        }

    return app
