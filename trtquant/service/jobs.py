"""Build options, the build queue and its worker threads.

:class:`BuildManager` owns the worker threads (one by default: one GPU). A submission is
deduplicated by cache key in :meth:`JobStore.create_job`: a published artifact answers at
once (``cache_hit``), an identical build in flight is waited for (the new job succeeds or
fails with it), anything else is queued. Workers claim queued builds, run the backend in a
scratch folder, optionally benchmark, then publish the artifact atomically and mark the
job (and every job waiting for it) succeeded in one transaction.

Test hook: ``TRTQUANT_SERVICE_TEST_BUILD_DELAY_S=<seconds>`` makes every build sleep that
long after the backend wrote its artifact into the scratch folder and before it is
published, so tests can kill the server mid-build. Never set it in production.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from trtquant.service.backends import Backend
from trtquant.service.store import ArtifactRecord, ArtifactStore, Job, JobStore, cache_key, iso_time, new_job_id

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
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    precision: Literal["int8", "fp16", "best"] = "int8"
    shapes: dict[InputName, ShapeProfile] = Field(default_factory=dict, max_length=64)
    workspace_mib: int | None = Field(default=None, ge=1, le=1 << 20)
    target: Literal["trt10", "trt11", "dla"] = "trt10"
    benchmark: bool = False
    benchmark_duration_s: float = Field(default=1.0, gt=0, le=30)
    optimization_level: int = Field(default=3, ge=0, le=5)
    dla_core: int = Field(default=0, ge=0, le=7)

    def strongly_typed(self) -> bool | None:
        """What the validator should assume for a ``trt10`` build."""
        if self.target == "dla":
            return None
        return self.precision == "int8" or self.target == "trt11"

    def canonical(self) -> dict[str, Any]:
        """All fields, defaults filled in, JSON types: the part of the cache key that is options."""
        return self.model_dump(mode="json")


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


class BuildManager:
    """The build queue: submission with dedupe, worker threads, live logs, start-up recovery."""

    def __init__(self, store: JobStore, artifacts: ArtifactStore, backend: Backend, *, workers: int = 1,
                 build_delay_s: float = 0.0) -> None:
        if workers < 1:
            raise ValueError(f"workers={workers} must be >= 1")
        self.store = store
        self.artifacts = artifacts
        self.backend = backend
        self.workers = int(workers)
        self.build_delay_s = float(build_delay_s)
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._live: dict[str, _JobLog] = {}
        self._live_lock = threading.Lock()
        self._handler = _ThreadLogHandler()
        self.recovery: dict[str, Any] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Recover from a previous run, clean the work folder, re-queue queued builds, start workers."""
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
        self.recovery = {**recovered, "requeued": recovered["requeued"] - lost, "uploads_lost": lost,
                         "removed_files": len(cleaned["removed"]), "artifacts_missing": len(cleaned["missing"])}
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
            thread = threading.Thread(target=self._worker, name=f"trtquant-build-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking builds; wait up to ``timeout`` s for running ones (left 'running' otherwise:
        the next start marks them failed). Queued builds stay queued in the database."""
        self._stopping.set()
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        logging.getLogger("trtquant").removeHandler(self._handler)

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
                job = self.store.claim(job_id)
                if job is not None:
                    self._run(job)
            except Exception:  # the store itself failed: log, keep the worker alive
                _LOG.exception("build worker error on job %s", job_id)

    def _run(self, job: Job) -> None:
        log = _JobLog()
        with self._live_lock:
            self._live[job.id] = log
        self._handler.local.sink = log
        upload = self.artifacts.upload_path(job.id)
        backend = self.backend
        try:
            log(f"build {job.id} started on {backend.name} {backend.version} ({backend.device}); key {job.key}")
            existing = self.store.artifact(job.key)
            if existing is not None and self.artifacts.is_complete(existing):
                log(f"artifact already in the cache (built by job {existing.build_job_id}); not rebuilding")
                self.store.succeed_from_cache(job.id, existing, log.text())
                return
            if not upload.is_file():
                raise FileNotFoundError("the uploaded ONNX is missing from the work folder")
            scratch = self.artifacts.scratch(job.id)
            started = time.perf_counter()
            output = backend.build(upload, job.options, job.inputs, scratch, log)
            artifact = Path(output.artifact_path)
            if artifact.parent.resolve() != scratch.resolve() or not artifact.is_file():
                raise RuntimeError(f"backend {backend.name} left no artifact in its scratch folder")
            build_s = time.perf_counter() - started
            log(f"build finished in {build_s:.2f} s")
            if self.build_delay_s > 0:
                log(f"test hook {BUILD_DELAY_ENV}: sleeping {self.build_delay_s} s before publishing")
                time.sleep(self.build_delay_s)
            benchmark = None
            if job.options.get("benchmark"):
                log(f"benchmark: {job.options.get('benchmark_duration_s')} s timed loop")
                try:
                    benchmark = backend.benchmark(artifact, job.options, job.inputs,
                                                  float(job.options.get("benchmark_duration_s", 1.0)))
                except Exception as exc:  # the engine is fine; report why the benchmark is missing
                    log(f"benchmark failed: {type(exc).__name__}: {exc}")
                    benchmark = {"error": f"{type(exc).__name__}: {exc}"}
            _, sha, size = self.artifacts.publish(job.key, artifact, backend.artifact_suffix)
            log(f"published artifact {job.key}{backend.artifact_suffix} ({size} bytes, sha256 {sha})")
            report = {"layers": output.layers, "benchmark": benchmark, "build": output.metadata,
                      "parity": output.parity, "build_time_s": round(build_s, 3)}
            record = ArtifactRecord(key=job.key, suffix=backend.artifact_suffix, sha256=sha, bytes=size,
                                    backend=backend.name, backend_version=backend.version, build_job_id=job.id,
                                    created_at=time.time(), report=report)
            self.store.succeed(job.id, record, log.text())
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log("build failed:\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-8)))
            try:
                self.store.fail(job.id, error, log.text())
            except Exception:
                _LOG.exception("could not record the failure of job %s", job.id)
        finally:
            self._handler.local.sink = None
            self.artifacts.remove_scratch(job.id)
            upload.unlink(missing_ok=True)
            with self._live_lock:
                self._live.pop(job.id, None)

    def queue_depth(self) -> int:
        return self._queue.qsize()
