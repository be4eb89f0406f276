"""Build worker of scale-out mode: one process per GPU, consuming its kind's Celery queue.

``trtquant worker --database-url ... --broker-url ... --shared-dir ...`` (or
``python -m trtquant.service.worker``). The worker

* detects its kind (:func:`~trtquant.service.kinds.detect_kind`; ``--kind`` overrides it,
  for tests and hand-pinned fleets) and registers it in the job store with a heartbeat, so
  the API nodes know which kinds are online;
* for each task: claims the job in Postgres (a conditional ``UPDATE``: a duplicate message
  or a job that finished meanwhile is skipped), builds it with the backend in a scratch
  folder on the shared volume, publishes the artifact there atomically (temp file + rename)
  and records it with its sha256;
* renews the lease of the build it runs (and stores its live log) every heartbeat. If the
  process dies — SIGKILL, OOM, a lost node — the lease runs out and an API node's watchdog
  requeues the build for another worker of the same kind.

A build that fails on its own (bad model, backend error) is recorded as failed at once: it
would fail again. A job store that is unreachable makes the task retry (Celery ``retry``).

Runs the task in the worker's main process (``--pool solo``, the default, or ``threads``):
the heartbeat thread must live in the process that builds. The test hook
``TRTQUANT_SERVICE_TEST_BUILD_DELAY_S`` applies as in embedded mode.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from trtquant.service.backends import Backend
from trtquant.service.jobs import (BUILD_DELAY_ENV, _describe_fault, _JobLog, _short_traceback, _ThreadLogHandler,
                                   build_in_scratch)
from trtquant.service.kinds import KIND_ENV, WorkerKind, queue_name
from trtquant.service.object_store import open_artifact_store
from trtquant.service.store import ArtifactRecord, ArtifactStore, default_owner

__all__ = ["BuildWorker", "add_worker_arguments", "main", "resolve_worker_args", "run_worker"]

_LOG = logging.getLogger("trtquant.service.worker")


class BuildWorker:
    """Claims, builds, publishes and records jobs of one kind; keeps its registration and
    the running build's lease alive.

    Args:
        store: a :class:`~trtquant.service.pg_store.PgJobStore`.
        artifacts: the shared artifact folder.
        backend: the build backend of this GPU.
        kind: what this worker advertises.
        lease_s: lease of a running build; must exceed ``heartbeat_s`` by a few beats.
        heartbeat_s: period of registration refresh and lease renewal (default min(5 s, lease/4):
            API nodes count a worker offline after ``worker_ttl_s``, 15 s by default).
        build_delay_s: test hook (sleep before publishing).
        heartbeat_file: rewritten at every successful heartbeat (a container health check
            tests its age: a worker that cannot reach Postgres turns unhealthy).
    """

    def __init__(self, store: Any, artifacts: ArtifactStore, backend: Backend, kind: WorkerKind, *,
                 lease_s: float = 60.0, heartbeat_s: float | None = None, build_delay_s: float = 0.0,
                 heartbeat_file: str | os.PathLike[str] | None = None) -> None:
        self.store = store
        self.artifacts = artifacts
        self.backend = backend
        self.kind = kind
        self.lease_s = float(lease_s)
        self.heartbeat_s = float(heartbeat_s) if heartbeat_s else min(5.0, self.lease_s / 4)
        if not self.heartbeat_s * 2 <= self.lease_s:
            raise ValueError(f"heartbeat_s={self.heartbeat_s} must be at most half of lease_s={self.lease_s}")
        self.build_delay_s = float(build_delay_s)
        self.heartbeat_file = Path(heartbeat_file) if heartbeat_file else None
        self.id = default_owner()
        self._current: str | None = None
        self._log: _JobLog | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handler = _ThreadLogHandler()
        self._hidden = sorted({str(artifacts.workdir.absolute()), str(artifacts.workdir.resolve())})

    def info(self) -> dict[str, Any]:
        return {**self.kind.to_dict(), "host": socket.gethostname(), "pid": os.getpid(), "device": self.backend.device}

    # ------------------------------------------------------------------ heartbeat

    def start(self) -> None:
        self.store.register_worker(self.id, self.kind.id, self.info())
        logging.getLogger("trtquant").addHandler(self._handler)
        self._thread = threading.Thread(target=self._beat, name="trtquant-worker-heartbeat", daemon=True)
        self._thread.start()
        _LOG.info("worker %s registered for kind %s (queue %s)", self.id, self.kind.id, queue_name(self.kind.id),
                  extra={"worker": self.id, "kind": self.kind.id})

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        logging.getLogger("trtquant").removeHandler(self._handler)
        with contextlib.suppress(Exception):
            self.store.unregister_worker(self.id)

    def beat(self) -> None:
        """One heartbeat: refresh the registration, renew the running build's lease (with its log)."""
        with self._lock:
            current, log = self._current, self._log
        self.store.register_worker(self.id, self.kind.id, self.info(), current)
        if self.heartbeat_file is not None:  # container health checks read its age
            self.heartbeat_file.write_text(f"{time.time():.3f} {self.kind.id} {current or '-'}\n")
        if current is not None:
            logs = {current: log.text()} if log is not None else None
            if not self.store.renew_leases({current}, self.id, self.lease_s, logs=logs) and self._lost(current):
                _LOG.warning("job %s: lease lost (expired and requeued); this build's result will not be recorded",
                             current, extra={"job_id": current, "kind": self.kind.id})

    def _lost(self, job_id: str) -> bool:
        """A renewal found nothing: the lease was lost, unless the build just finished (it is
        final, or no longer this worker's current build)."""
        with self._lock:
            if self._current != job_id:
                return False
        row = self.store.job_row(job_id)
        return row is not None and row["status"] not in ("succeeded", "failed")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.beat()
            except Exception as exc:  # the database restarting: keep beating
                _LOG.warning("heartbeat failed: %s", exc, extra={"worker": self.id})

    # ------------------------------------------------------------------ builds

    def run(self, job_id: str) -> str:
        """Build one job if it is still to be built: ``built``, ``cached``, ``failed`` or ``skipped``."""
        job = self.store.claim(job_id, owner=self.id, lease_s=self.lease_s, kind=self.kind.id)
        if job is None:
            _LOG.info("job %s: not claimable (done, running elsewhere, or another kind); skipped", job_id,
                      extra={"job_id": job_id, "kind": self.kind.id})
            return "skipped"
        log = _JobLog()
        with self._lock:
            self._current, self._log = job.id, log
        self._handler.local.sink = log
        try:
            return self._build(job, log)
        finally:
            self._handler.local.sink = None
            with self._lock:
                self._current, self._log = None, None

    def _build(self, job: Any, log: _JobLog) -> str:
        extra = {"job_id": job.id, "kind": self.kind.id, "worker": self.id}
        backend, stage, published, recorded = self.backend, "build", False, False
        try:
            log(f"build {job.id} started on worker {self.id} (kind {self.kind.id}; {backend.name} {backend.version}, "
                f"{backend.device}); key {job.key}")
            _LOG.info("build started", extra=extra)
            existing = self.store.artifact(job.key)
            if existing is not None and self.artifacts.is_complete(existing):
                log(f"artifact already in the cache (built by job {existing.build_job_id}); not rebuilding")
                self.store.succeed_from_cache(job.id, existing, log.text())
                self.artifacts.drop_upload(job.id)
                return "cached"
            stage = "fetching the upload"
            upload = self.artifacts.fetch_upload(job.id)
            if upload is None:
                raise FileNotFoundError("the uploaded ONNX is missing from the shared store")
            stage = "build"
            output, artifact, build_s, benchmark = build_in_scratch(
                backend, job, upload, self.artifacts.scratch(job.id), log,
                self.build_delay_s, self._hidden)
            stage = "publishing the artifact"
            _, sha, size = self.artifacts.publish(job.key, artifact, backend.artifact_suffix)
            published = True
            log(f"published artifact {job.key}{backend.artifact_suffix} ({size} bytes, sha256 {sha})")
            report = {"layers": output.layers, "benchmark": benchmark, "build": output.metadata, "parity": output.parity,
                      "build_time_s": round(build_s, 3), "kind": self.kind.to_dict(), "worker": self.id}
            record = ArtifactRecord(key=job.key, suffix=backend.artifact_suffix, sha256=sha, bytes=size,
                                    backend=backend.name, backend_version=backend.version, build_job_id=job.id,
                                    created_at=time.time(), report=report)
            stage = "recording the result"
            active = self.store.succeed(job.id, record, log.text())
            recorded = True
            if not active:
                _LOG.warning("build finished after its lease was lost; the artifact is recorded, the job was requeued",
                             extra=extra)
            _LOG.info("build succeeded in %.2f s", build_s, extra=extra)
            self.artifacts.drop_upload(job.id)
            return "built"
        except Exception as exc:
            from trtquant.service.pg_store import StoreUnavailable

            if isinstance(exc, StoreUnavailable):
                raise  # the database is down: the task retries; the lease decides who builds
            error = f"{stage} failed: {_describe_fault(exc, self._hidden)}"
            if published and not recorded:  # no row points at it (nor another build's): free the space
                with contextlib.suppress(Exception):
                    if self.store.artifact(job.key) is None:
                        self.artifacts.discard(job.key, backend.artifact_suffix)
            with contextlib.suppress(Exception):
                log(f"{error}\n{_short_traceback(exc)}")
            _LOG.warning("build failed: %s", error, extra=extra)
            self.store.fail(job.id, error, log.text())
            with contextlib.suppress(Exception):
                self.artifacts.drop_upload(job.id)
            return "failed"
        finally:
            self.artifacts.remove_scratch(job.id)


def resolve_worker_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset flags from their environment variables; ValueError naming what is missing."""
    from trtquant.settings import env_value

    args.database_url = args.database_url or env_value("TRTQUANT_SERVICE_DATABASE_URL")
    args.broker_url = args.broker_url or env_value("TRTQUANT_SERVICE_BROKER_URL")
    args.shared_dir = args.shared_dir or env_value("TRTQUANT_SERVICE_SHARED_DIR")
    args.kind = args.kind or env_value(KIND_ENV)
    args.key_prefix = args.key_prefix or env_value("TRTQUANT_SERVICE_KEY_PREFIX")
    args.artifact_url = args.artifact_url or env_value("TRTQUANT_SERVICE_ARTIFACT_URL")
    missing = [flag for flag, value in (("--database-url", args.database_url), ("--broker-url", args.broker_url),
                                        ("--shared-dir or --artifact-url", args.shared_dir or args.artifact_url))
               if not value]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or $TRTQUANT_SERVICE_DATABASE_URL, "
                         "$TRTQUANT_SERVICE_BROKER_URL, $TRTQUANT_SERVICE_SHARED_DIR/$TRTQUANT_SERVICE_ARTIFACT_URL)")
    if args.artifact_url:
        from trtquant.service.object_store import parse_artifact_url

        parse_artifact_url(args.artifact_url)  # ValueError naming the flag's problem
        if not args.shared_dir:  # only scratch and downloaded uploads: node-local
            import tempfile

            args.shared_dir = tempfile.mkdtemp(prefix="trtquant-worker-")
    if args.lease_s <= 0:
        raise ValueError(f"--lease-s must be > 0, got {args.lease_s}")
    return args


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``trtquant worker`` (shared with ``python -m trtquant.service.worker``)."""
    parser.add_argument("--database-url", default=None, help="Postgres URL (or $TRTQUANT_SERVICE_DATABASE_URL)")
    parser.add_argument("--broker-url", default=None, help="Celery broker URL, redis://... (or $TRTQUANT_SERVICE_BROKER_URL)")
    parser.add_argument("--shared-dir", default=None,
                        help="shared artifact folder, the same on every node (or $TRTQUANT_SERVICE_SHARED_DIR); "
                             "with --artifact-url a local work folder (default: a temporary folder)")
    parser.add_argument("--artifact-url", default=None,
                        help="s3://bucket[/prefix]: artifacts and uploads in an S3-compatible object store instead "
                             "of the shared folder (or $TRTQUANT_SERVICE_ARTIFACT_URL; endpoint and credentials "
                             "from the standard AWS variables, e.g. $AWS_ENDPOINT_URL)")
    parser.add_argument("--kind", default=None, help=f"advertise this kind id instead of the detected one (or ${KIND_ENV})")
    parser.add_argument("--backend", choices=("auto", "tensorrt", "onnxruntime"), default=None)
    parser.add_argument("--key-prefix", default=None, help="Redis key prefix of this deployment")
    parser.add_argument("--lease-s", type=float, default=60.0, help="lease of a running build (default 60)")
    parser.add_argument("--heartbeat-s", type=float, default=None, help="heartbeat period (default min(5, lease/4)); keep it under a third of the API's --worker-ttl-s")
    parser.add_argument("--heartbeat-file", default=None,
                        help="rewrite this file at every heartbeat (container health checks test its age)")
    parser.add_argument("--pool", choices=("solo", "threads"), default="solo", help="Celery pool (default solo)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    parser.add_argument("--log-format", default="json", choices=("json", "text"))


def main(argv: list[str] | None = None) -> int:
    """``python -m trtquant.service.worker``: parse the flags, run the worker."""
    parser = argparse.ArgumentParser(prog="python -m trtquant.service.worker", description=__doc__.split("\n\n")[0])
    add_worker_arguments(parser)
    try:
        args = resolve_worker_args(parser.parse_args(argv))
    except ValueError as exc:
        parser.error(str(exc))
    return run_worker(args)


def run_worker(args: argparse.Namespace) -> int:
    """Run one build worker in the foreground until SIGTERM/SIGINT (flags of :func:`add_worker_arguments`)."""
    from trtquant.service.backends import select_backend
    from trtquant.service.kinds import detect_kind
    from trtquant.service.logs import configure_logging
    from trtquant.service.pg_store import PgJobStore
    from trtquant.service.tasks import BUILD_TASK, celery_app
    from trtquant.settings import get_settings

    configure_logging(args.log_level, args.log_format)
    artifacts = open_artifact_store(Path(args.shared_dir), args.artifact_url, cache_max_bytes=None,
                                    cache_max_age_s=None)
    backend = select_backend(None if args.backend in (None, "auto") else args.backend, artifacts.timing)
    kind = detect_kind(backend, args.kind)
    store = PgJobStore(args.database_url, lease_s=args.lease_s, pool_size=2)
    worker = BuildWorker(store, artifacts, backend, kind, lease_s=args.lease_s, heartbeat_s=args.heartbeat_s,
                         build_delay_s=get_settings().test_build_delay_s, heartbeat_file=args.heartbeat_file)
    app = celery_app(args.broker_url, key_prefix=args.key_prefix)

    @app.task(name=BUILD_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=10)
    def build(task: Any, job_id: str) -> str:
        from trtquant.service.pg_store import StoreUnavailable

        try:
            return worker.run(job_id)
        except StoreUnavailable as exc:
            raise task.retry(exc=exc, countdown=min(30, 2 ** task.request.retries)) from exc

    worker.start()
    if worker.build_delay_s > 0:
        _LOG.warning("%s=%s: every build sleeps that long before publishing (test hook)", BUILD_DELAY_ENV,
                     worker.build_delay_s)
    try:
        app.worker_main(["worker", "-Q", queue_name(kind.id), "--pool", args.pool, "--concurrency", "1",
                         "-n", f"{kind.id}@{socket.gethostname()}-{os.getpid()}", "--without-gossip",
                         "--without-mingle", "--without-heartbeat", "--loglevel", args.log_level.upper()])
    finally:
        worker.stop()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
