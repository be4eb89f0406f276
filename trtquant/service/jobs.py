"""Build options, the build queue and its worker threads.

:class:`BuildManager` owns the worker threads (one by default: one GPU). A submission is
deduplicated by cache key in :meth:`JobStore.create_job`: a published artifact answers at
once (``cache_hit``), an identical build in flight is waited for (the new job succeeds or
fails with it), anything else is queued. Workers claim queued builds, run the backend in a
scratch folder, optionally benchmark, then publish the artifact atomically and mark the
job (and every job waiting for it) succeeded in one transaction.

No job stays ``running`` once its build thread ends: any failure on the way (the backend,
publishing, recording, logging) is recorded as the job's error (retried while the database
is unwritable), and a watchdog thread renews the lease of every live build and fails jobs
whose lease ran out (a dead thread, a process that is gone), releasing their duplicates. It
also replaces dead worker threads and evicts from the artifact cache.

Test hook: ``TRTQUANT_SERVICE_TEST_BUILD_DELAY_S=<seconds>`` makes every build sleep that
long after the backend wrote its artifact into the scratch folder and before it is
published, so tests can kill the server mid-build. Never set it in production.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from trtquant.service.backends import Backend
from trtquant.service.store import (
    DEFAULT_LEASE_S,
    ArtifactRecord,
    ArtifactStore,
    Job,
    JobStore,
    cache_key,
    default_owner,
    iso_time,
    new_job_id,
)

__all__ = ["BUILD_DELAY_ENV", "BuildManager", "BuildOptions", "ShapeProfile", "check_shapes"]

_LOG = logging.getLogger("trtquant.service")

BUILD_DELAY_ENV = "TRTQUANT_SERVICE_TEST_BUILD_DELAY_S"

Dim = Annotated[int, Field(ge=1, le=1 << 24)]
InputName = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class ShapeProfile(BaseModel):
    """One input's optimization-profile shapes (full shapes, batch included)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    min: list[Dim] = Field(min_length=1, max_length=8)
    opt: list[Dim] = Field(min_length=1, max_length=8)
    max: list[Dim] = Field(min_length=1, max_length=8)

    @model_validator(mode="after")
    def _ordered(self) -> ShapeProfile:
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ValueError(f"min/opt/max must have the same rank, got {self.min}, {self.opt}, {self.max}")
        if not all(a <= b <= c for a, b, c in zip(self.min, self.opt, self.max)):
            raise ValueError(f"need min <= opt <= max per dimension, got min={self.min} opt={self.opt} max={self.max}")
        return self


class BuildOptions(BaseModel):
    """Options of one build (the ``options`` form field, a JSON object). Unknown keys are rejected.

    Attributes:
        precision: ``int8`` (strongly typed: Q/DQ place INT8, other layers keep the ONNX's
            float type), ``fp16`` / ``best`` (INT8 + FP16: weakly typed ``--int8 --fp16`` on
            TensorRT 10.x; on 11.x upload an FP16 export). No effect on the ONNX Runtime backend.
        shapes: ``{input: {min, opt, max}}``, one optimization profile (needed for dynamic
            inputs on TensorRT; ``opt`` also sets the benchmark/parity input shape).
        workspace_mib: TensorRT workspace pool limit (default: TensorRT's).
        target: ``trt10``, ``trt11`` or ``dla``: the rule set of the ONNX validator, and a
            DLA build (``dla_core``, GPU fallback) on TensorRT.
        benchmark: measure latency of the artifact after the build (report ``benchmark``).
        benchmark_duration_s: timed loop length of that benchmark.
        optimization_level: TensorRT builder optimization level 0-5.
        dla_core: DLA core for ``target='dla'``.
        allow_float: accept a model without any QuantizeLinear/DequantizeLinear (built in
            float). Off by default: a float upload is almost always a forgotten quantize/export
            step. Not part of the cache key: it only gates the submission, not the artifact.
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)  # NaN/Infinity/1e400: 422

    precision: Literal["int8", "fp16", "best"] = "int8"
    shapes: dict[InputName, ShapeProfile] = Field(default_factory=dict, max_length=64)
    workspace_mib: int | None = Field(default=None, ge=1, le=1 << 20)
    target: Literal["trt10", "trt11", "dla"] = "trt10"
    benchmark: bool = False
    benchmark_duration_s: float = Field(default=1.0, gt=0, le=30)
    optimization_level: int = Field(default=3, ge=0, le=5)
    dla_core: int = Field(default=0, ge=0, le=7)
    allow_float: bool = False

    def strongly_typed(self) -> bool | None:
        """What the validator should assume for a ``trt10`` build."""
        if self.target == "dla":
            return None
        return self.precision == "int8" or self.target == "trt11"

    def canonical(self) -> dict[str, Any]:
        """All fields that shape the artifact, defaults filled in, JSON types: the part of the cache
        key that is options (``allow_float`` is left out: the same model builds the same either way)."""
        return self.model_dump(mode="json", exclude={"allow_float"})


def check_shapes(options: BuildOptions, inputs: Mapping[str, list[int | None]]) -> list[str]:
    """Problems of ``options.shapes`` against the model's inputs (unknown names, rank, static dims)."""
    problems = []
    for name, profile in options.shapes.items():
        if name not in inputs:
            problems.append(f"shapes names input {name!r}, but the model's inputs are {sorted(inputs)}")
            continue
        dims = inputs[name]
        for which in ("min", "opt", "max"):
            shape = getattr(profile, which)
            if len(shape) != len(dims):
                problems.append(f"shapes[{name!r}].{which}={shape} has rank {len(shape)}; the input is {dims}")
                break
            bad = [axis for axis, (got, want) in enumerate(zip(shape, dims)) if want is not None and got != want]
            if bad:
                problems.append(f"shapes[{name!r}].{which}={shape}: dimension(s) {bad} are static in the input {dims}")
                break
    return problems


class _JobLog:
    """Timestamped lines of one build, readable while the build runs."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, message: str) -> None:
        stamp = iso_time(time.time())
        with self._lock:
            for line in str(message).splitlines() or [""]:
                self._lines.append(f"[{stamp}] {line}")

    def text(self) -> str:
        with self._lock:
            return "\n".join(self._lines) + ("\n" if self._lines else "")


class _ThreadLogHandler(logging.Handler):
    """Routes ``trtquant`` log records emitted on a worker thread into that thread's job log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        sink = getattr(self.local, "sink", None)
        if sink is not None:
            try:
                sink(f"{record.levelname.lower()} {record.name}: {record.getMessage()}")
            except Exception:  # never let logging break a build
                pass


def _describe_fault(exc: BaseException, hidden: Sequence[str]) -> str:
    """``Type: message`` for clients: an OSError by its errno text (its file names are server
    paths), any other message with the server folders in ``hidden`` replaced by ``<workdir>``."""
    if isinstance(exc, OSError) and exc.errno is not None:
        text = f"{type(exc).__name__}: [Errno {exc.errno}] {exc.strerror or os.strerror(exc.errno)}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    for folder in sorted(hidden, key=len, reverse=True):
        if folder:
            text = text.replace(folder, "<workdir>")
    return text


def _short_traceback(exc: BaseException, limit: int = 8) -> str:
    """The last frames as ``file.py:line in function`` (base names only: no server paths)."""
    frames = traceback.extract_tb(exc.__traceback__)[-limit:]
    return "".join(f"  {Path(frame.filename).name}:{frame.lineno} in {frame.name}\n" for frame in frames)


def build_in_scratch(backend: Backend, job: Any, upload: Path, scratch: Path, log: Callable[[str], None],
                     build_delay_s: float, hidden: Sequence[str]) -> tuple[Any, Path, float, dict[str, Any] | None]:
    """Build ``upload`` in ``scratch`` (the test build delay after it), then the optional benchmark: (the
    backend's output, artifact, build seconds, benchmark or its error). Shared by the embedded build threads
    and the scale-out workers."""
    started = time.perf_counter()
    output = backend.build(upload, job.options, job.inputs, scratch, log)
    artifact = Path(output.artifact_path)
    if artifact.parent.resolve() != scratch.resolve() or not artifact.is_file():
        raise RuntimeError(f"backend {backend.name} left no artifact in its scratch folder")
    build_s = time.perf_counter() - started
    log(f"build finished in {build_s:.2f} s")
    if build_delay_s > 0:
        log(f"test hook {BUILD_DELAY_ENV}: sleeping {build_delay_s} s before publishing")
        time.sleep(build_delay_s)
    benchmark = None
    if job.options.get("benchmark"):
        log(f"benchmark: {job.options.get('benchmark_duration_s')} s timed loop")
        try:
            benchmark = backend.benchmark(artifact, job.options, job.inputs,
                                          float(job.options.get("benchmark_duration_s", 1.0)))
        except Exception as exc:  # the engine is fine; report why the benchmark is missing
            benchmark = {"error": _describe_fault(exc, hidden)}
            log(f"benchmark failed: {benchmark['error']}")
    return output, artifact, build_s, benchmark


class BuildManager:
    """The build queue: submission with dedupe, worker threads, live logs, leases, cache
    eviction and start-up recovery.

    Args:
        store, artifacts, backend: persistence and the build backend.
        workers: build threads (one per GPU).
        build_delay_s: test hook, see the module docstring.
        lease_s: how long a running job's lease lasts without renewal; the watchdog renews
            it while the build thread lives and fails the job once it has run out.
        watchdog_interval_s: period of the watchdog (lease renewal and expiry, failures not
            yet recorded, dead workers, cache eviction); default ``lease_s / 4``.
        record_retry_s: how long a build thread keeps retrying to record its result (the
            database may be briefly unwritable, e.g. a full disk) before leaving it to the watchdog.
    """

    def __init__(self, store: JobStore, artifacts: ArtifactStore, backend: Backend, *, workers: int = 1,
                 build_delay_s: float = 0.0, lease_s: float = DEFAULT_LEASE_S, watchdog_interval_s: float | None = None,
                 record_retry_s: float = 5.0) -> None:
        if workers < 1:
            raise ValueError(f"workers={workers} must be >= 1")
        if not lease_s > 0:
            raise ValueError(f"lease_s={lease_s} must be > 0")
        self.store = store
        self.artifacts = artifacts
        self.backend = backend
        self.workers = int(workers)
        self.build_delay_s = float(build_delay_s)
        self.lease_s = float(lease_s)
        self.watchdog_interval_s = float(watchdog_interval_s) if watchdog_interval_s else self.lease_s / 4
        if not self.watchdog_interval_s < self.lease_s:
            raise ValueError(f"watchdog_interval_s={self.watchdog_interval_s} must be < lease_s={self.lease_s}")
        self.record_retry_s = max(0.0, float(record_retry_s))
        self.owner = default_owner()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._watchdog_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._live: dict[str, _JobLog] = {}
        self._live_lock = threading.Lock()
        self._building: dict[str, threading.Thread] = {}  # job id -> the thread building it (lease renewal)
        self._unrecorded: dict[str, str] = {}  # job id -> failure its thread could not record
        self._state_lock = threading.Lock()
        self._handler = _ThreadLogHandler()
        self._hidden = sorted({str(artifacts.workdir.absolute()), str(artifacts.workdir.resolve())})
        self.recovery: dict[str, Any] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Recover from a previous run, clean the work folder, re-queue queued builds, start workers
        and the watchdog."""
        recovered = self.store.recover()
        queued = self.store.queued_builds()
        cleaned = self.artifacts.reconcile(self.store.artifacts(), set(queued))
        for key in cleaned["missing"]:
            self.store.forget_artifact(key)
        lost = 0
        for job_id in queued:
            if not self.artifacts.upload_path(job_id).is_file():
                self.store.fail(job_id, "the uploaded ONNX was lost while the service was down; resubmit", "")
                lost += 1
            else:
                self._queue.put(job_id)
        evicted = self._evict()
        self.recovery = {**recovered, "requeued": recovered["requeued"] - lost, "uploads_lost": lost,
                         "removed_files": len(cleaned["removed"]), "artifacts_missing": len(cleaned["missing"]),
                         "artifacts_evicted": len(evicted)}
        if any(self.recovery.values()):
            _LOG.warning("start-up recovery: %s", self.recovery)
        if self.build_delay_s > 0:
            _LOG.warning("%s=%s: every build sleeps that long before publishing (test hook)", BUILD_DELAY_ENV,
                         self.build_delay_s)
        package_logger = logging.getLogger("trtquant")
        if package_logger.level == logging.NOTSET or package_logger.level > logging.INFO:
            package_logger.setLevel(logging.INFO)
        package_logger.addHandler(self._handler)
        for index in range(self.workers):
            self._threads.append(self._start_worker(index))
        self._watchdog_thread = threading.Thread(target=self._watchdog, name="trtquant-build-watchdog", daemon=True)
        self._watchdog_thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking builds; wait up to ``timeout`` s for running ones (left 'running' otherwise:
        the next start marks them failed). Queued builds stay queued in the database."""
        self._stopping.set()
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for thread in [*self._threads, *([self._watchdog_thread] if self._watchdog_thread else [])]:
            thread.join(max(0.0, deadline - time.monotonic()))
        logging.getLogger("trtquant").removeHandler(self._handler)

    def _start_worker(self, index: int) -> threading.Thread:
        thread = threading.Thread(target=self._worker, name=f"trtquant-build-{index}", daemon=True)
        thread.start()
        return thread

    # ------------------------------------------------------------------ submission

    def submit(self, *, upload: Path, onnx_sha256: str, onnx_bytes: int, filename: str | None, options: BuildOptions,
               inputs: Mapping[str, Any], check_report: Mapping[str, Any] | None) -> Job:
        """Create a job for a validated upload (``upload`` is moved or deleted)."""
        job_id = new_job_id()
        canonical = options.canonical()
        key = cache_key(onnx_sha256, canonical, self.backend.name, self.backend.version, self.backend.device)
        target = self.artifacts.upload_path(job_id)
        os.replace(upload, target)  # before the row exists, so a queued build always has its upload
        try:
            job = self.store.create_job(
                job_id=job_id, key=key, options=canonical, inputs=inputs, onnx_sha256=onnx_sha256,
                onnx_bytes=onnx_bytes, filename=filename, backend=self.backend.name,
                backend_version=self.backend.version, device=self.backend.device, check_report=check_report,
                artifact_ok=self.artifacts.is_complete,
            )
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        if job.status == "queued" and job.leader_id is None:
            self._queue.put(job.id)
        else:
            target.unlink(missing_ok=True)  # a cache hit or a duplicate never reads its upload
        return job

    def live_log(self, job_id: str) -> str | None:
        with self._live_lock:
            log = self._live.get(job_id)
        return None if log is None else log.text()

    # ------------------------------------------------------------------ workers

    def _worker(self) -> None:
        while not self._stopping.is_set():
            job_id = self._queue.get()
            if job_id is None or self._stopping.is_set():
                return
            try:
                job = self.store.claim(job_id, owner=self.owner, lease_s=self.lease_s)
                if job is not None:
                    with self._state_lock:
                        self._building[job.id] = threading.current_thread()
                    try:
                        self._run(job)
                    finally:
                        with self._state_lock:
                            self._building.pop(job.id, None)
            except Exception:  # the store itself failed: log, keep the worker alive
                _LOG.exception("build worker error on job %s", job_id)

    def _run(self, job: Job) -> None:
        """Build, publish and record one claimed job. Whatever fails on the way (the backend,
        publishing, recording, logging) ends in a recorded failure, or, when even that cannot
        be written now, in one the watchdog records (and the lease expires meanwhile)."""
        log = _JobLog()
        with self._live_lock:
            self._live[job.id] = log
        self._handler.local.sink = log
        upload = self.artifacts.upload_path(job.id)
        backend = self.backend
        stage = "build"
        published: Path | None = None
        recorded = False
        try:
            log(f"build {job.id} started on {backend.name} {backend.version} ({backend.device}); key {job.key}")
            existing = self.store.artifact(job.key)
            if existing is not None and self.artifacts.is_complete(existing):
                log(f"artifact already in the cache (built by job {existing.build_job_id}); not rebuilding")
                stage = "recording the result"
                self.store.succeed_from_cache(job.id, existing, log.text())
                recorded = True
                return
            if not upload.is_file():
                raise FileNotFoundError("the uploaded ONNX is missing from the work folder")
            output, artifact, build_s, benchmark = build_in_scratch(
                backend, job, upload, self.artifacts.scratch(job.id), log,
                self.build_delay_s, self._hidden)
            stage = "publishing the artifact"
            published, sha, size = self.artifacts.publish(job.key, artifact, backend.artifact_suffix)
            log(f"published artifact {job.key}{backend.artifact_suffix} ({size} bytes, sha256 {sha})")
            report = {"layers": output.layers, "benchmark": benchmark, "build": output.metadata,
                      "parity": output.parity, "build_time_s": round(build_s, 3)}
            record = ArtifactRecord(key=job.key, suffix=backend.artifact_suffix, sha256=sha, bytes=size,
                                    backend=backend.name, backend_version=backend.version, build_job_id=job.id,
                                    created_at=time.time(), report=report)
            stage = "recording the result"
            if not self.store.succeed(job.id, record, log.text()):
                _LOG.warning("job %s finished after its lease expired; its artifact is cached, the job stays failed",
                             job.id)
            recorded = True
        except BaseException as exc:
            error = f"{stage} failed: {_describe_fault(exc, self._hidden)}"
            if published is not None and not recorded:  # no row will point at it: free the space now
                with contextlib.suppress(OSError):
                    published.unlink()
            with contextlib.suppress(Exception):
                log(f"{error}\n{_short_traceback(exc)}")
            self._record_failure(job.id, error, log)
            if not isinstance(exc, Exception):
                raise
        finally:
            with contextlib.suppress(Exception):
                self._handler.local.sink = None
                self.artifacts.remove_scratch(job.id)
            with contextlib.suppress(OSError):
                upload.unlink(missing_ok=True)
            with self._live_lock:
                self._live.pop(job.id, None)
        if recorded:
            with contextlib.suppress(Exception):
                self._evict(keep={job.key})

    def _record_failure(self, job_id: str, error: str, log: _JobLog) -> None:
        """Record a failure, retrying for ``record_retry_s`` (the last tries without the log: a
        short write fits where a long one does not); else leave it to the watchdog."""
        deadline = time.monotonic() + self.record_retry_s
        delay, attempt = 0.05, 0
        while True:
            attempt += 1
            try:
                text: str | None = log.text() if attempt == 1 else None
            except Exception:
                text = None
            try:
                self.store.fail(job_id, error, text)
                return
            except Exception:
                if time.monotonic() + delay > deadline or self._stopping.is_set():
                    _LOG.exception("could not record the failure of job %s; the watchdog retries", job_id)
                    with self._state_lock:
                        self._unrecorded[job_id] = error
                    return
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    # ------------------------------------------------------------------ watchdog

    def _watchdog(self) -> None:
        while not self._stopping.wait(self.watchdog_interval_s):
            try:
                self.watchdog_tick()
            except Exception:  # the watchdog must outlive any single round
                _LOG.exception("watchdog round failed")

    def watchdog_tick(self) -> dict[str, Any]:
        """One round: renew the leases of live builds, record failures not yet recorded, fail
        jobs whose lease expired, replace dead worker threads, evict from the cache. Each step
        is independent: one failing (a full disk) does not skip the others."""
        done: dict[str, Any] = {"renewed": 0, "recorded": [], "expired": [], "workers_restarted": 0, "evicted": []}
        try:
            with self._state_lock:
                alive = {job_id for job_id, thread in self._building.items() if thread.is_alive()}
            done["renewed"] = len(self.store.renew_leases(alive, self.owner, self.lease_s))
        except Exception:
            _LOG.exception("watchdog: renewing build leases failed")
        with self._state_lock:
            pending = dict(self._unrecorded)
        for job_id, error in pending.items():
            try:
                self.store.fail(job_id, error, None)
                done["recorded"].append(job_id)
                with self._state_lock:
                    self._unrecorded.pop(job_id, None)
            except Exception:
                _LOG.exception("watchdog: recording the failure of job %s failed again", job_id)
        try:
            done["expired"] = self.store.expire_leases()
        except Exception:
            _LOG.exception("watchdog: failing jobs with expired leases failed")
        for job_id in done["expired"]:
            _LOG.warning("watchdog: job %s lost its build thread (lease expired); marked failed", job_id)
            with self._state_lock:
                building = job_id in self._building and self._building[job_id].is_alive()
            if not building:
                self.artifacts.remove_scratch(job_id)
                with contextlib.suppress(OSError, ValueError):
                    self.artifacts.upload_path(job_id).unlink(missing_ok=True)
                with self._live_lock:
                    self._live.pop(job_id, None)
        if not self._stopping.is_set():
            for index, thread in enumerate(self._threads):
                if not thread.is_alive():
                    _LOG.error("watchdog: build worker %s died; starting a new one", thread.name)
                    self._threads[index] = self._start_worker(index)
                    done["workers_restarted"] += 1
        done["evicted"] = self._evict()
        return done

    def _evict(self, keep: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Cache eviction (see :meth:`ArtifactStore.evict`); logs and swallows errors."""
        try:
            evicted = self.artifacts.evict(self.store, keep=keep)
        except Exception:
            _LOG.exception("artifact cache eviction failed")
            return []
        if evicted:
            _LOG.info("artifact cache: evicted %d artifact(s) (least recently used first)", len(evicted))
        return evicted

    def queue_depth(self) -> int:
        return self._queue.qsize()
