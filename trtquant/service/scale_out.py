"""The API node's side of scale-out mode: submissions fanned out per GPU kind, views, artifact
serving with sha256 verification, health, and the watchdog.

An API node holds no state of its own: a submission is committed to Postgres (one job per
target kind, each deduplicated by its cache key) *before* the 2xx is returned, then each new
build is sent to its kind's Celery queue. If the node dies between the two, the job is
still in Postgres with ``dispatched_at`` unset and any node's watchdog sends it.

The watchdog (a thread in every API node; its steps are idempotent, so nodes need not
coordinate) each round:

* requeues running builds whose lease ran out (their worker died) — up to ``max_attempts``
  claims, then fails them — and sends them again;
* sends queued builds whose message never reached the broker (or was lost with it);
* fails queued builds of a kind that has had no worker online for ``no_worker_grace_s``:
  a kind without workers is reported (state ``no_worker``), never waited on forever;
* evicts from the shared artifact cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trtquant.service.kinds import check_kind
from trtquant.service.object_store import open_artifact_store
from trtquant.service.store import ArtifactRecord, Job, cache_key, is_job_id, iso_time, new_job_id

__all__ = ["KIND_KEY_SCHEME", "ScaleOut", "ScaleOutRejected", "parse_kinds"]

_LOG = logging.getLogger("trtquant.service")

#: The ``backend``/``backend_version`` slots of the cache key in scale-out mode: the kind id
#: itself names backend, version, GPU and platform (see :mod:`~trtquant.service.kinds`).
KIND_KEY_SCHEME = ("kind", "1")
MAX_KINDS = 32


class ScaleOutRejected(Exception):
    """A client-visible refusal (status, detail)."""

    def __init__(self, status: int, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.detail, self.extra = status, detail, extra


def parse_kinds(text: str | None) -> list[str] | None:
    """The ``kinds`` query parameter: None for every kind online (absent, empty or ``all``),
    else the distinct kind ids of a comma-separated list."""
    if text is None or text.strip() in ("", "all", "*"):
        return None
    kinds: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            check_kind(part)
        except ValueError as exc:
            raise ScaleOutRejected(422, f"query parameter kinds: {exc}") from None
        if part not in kinds:
            kinds.append(part)
    if not kinds:
        return None
    if len(kinds) > MAX_KINDS:
        raise ScaleOutRejected(422, f"query parameter kinds names {len(kinds)} kinds; at most {MAX_KINDS}")
    return kinds


def kind_state(row: Mapping[str, Any]) -> str:
    """A job's per-kind state: queued, waiting (an identical build runs), running, succeeded,
    failed, or no_worker."""
    status = row["status"]
    if status == "queued" and row.get("leader_id"):
        return "waiting"
    if status == "failed" and str(row.get("error") or "").startswith("no_worker"):
        return "no_worker"
    return str(status)


class ScaleOut:
    """Postgres store, shared artifacts and the Celery producer of one API node.

    Args:
        config: a :class:`~trtquant.service.app.ServiceConfig` with ``scale_out`` set.
    """

    def __init__(self, config: Any) -> None:
        from trtquant.service.pg_store import PgJobStore
        from trtquant.service.tasks import celery_app

        if not config.database_url or not config.broker_url:
            raise ValueError("scale-out mode needs database_url (Postgres) and broker_url (Redis); "
                             "pass --database-url/--broker-url or set $TRTQUANT_SERVICE_DATABASE_URL/"
                             "$TRTQUANT_SERVICE_BROKER_URL")
        self.config = config
        self.worker_ttl_s = float(config.worker_ttl_s)
        self.no_worker_grace_s = float(config.no_worker_grace_s)
        self.max_attempts = int(config.max_attempts)
        self.redispatch_after_s = float(config.redispatch_after_s)
        self.interval_s = float(config.watchdog_interval_s or max(0.5, min(5.0, config.lease_s / 4)))
        self.store = PgJobStore(config.database_url, lease_s=config.lease_s)
        self.artifacts = open_artifact_store(Path(config.shared_dir or config.workdir), config.artifact_url,
                                             cache_max_bytes=config.cache_max_bytes,
                                             cache_max_age_s=config.cache_max_age_s)
        self.celery = celery_app(config.broker_url, key_prefix=config.redis_key_prefix)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256 seen
        self._last_sweep = 0.0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watchdog, name="trtquant-scale-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10.0)
        self.store.close()

    def live_log(self, job_id: str) -> str | None:
        return None  # workers store the live log with each lease renewal

    # ------------------------------------------------------------------ submission

    def kinds_online(self) -> dict[str, dict[str, Any]]:
        return self.store.kinds_online(self.worker_ttl_s)

    def submit(self, *, upload: Path, onnx_sha256: str, onnx_bytes: int, filename: str | None, options: Any,
               inputs: Mapping[str, Any], check_report: Mapping[str, Any] | None, kinds: list[str] | None) -> dict[str, Any]:
        """Commit one job per target kind, then send the new builds; returns the 202 body."""
        online = self.kinds_online()
        targets = sorted(online) if kinds is None else kinds
        if not targets:
            raise ScaleOutRejected(503, "no build worker is online (every kind requested); start a worker "
                                        "(trtquant worker) or name the target kinds")
        problems = []
        for kind in targets:
            if online.get(kind, {}).get("info", {}).get("backend") == "tensorrt":
                problems += [f"input {name!r} {dims} has dynamic dimensions: TensorRT (kind {kind}) needs an "
                             f"optimization profile, pass shapes={{{name!r}: {{min, opt, max}}}}"
                             for name, dims in inputs.items() if None in dims and name not in options.shapes]
        if problems:
            raise ScaleOutRejected(422, "shapes do not fit the model", problems=problems, inputs=dict(inputs))
        canonical = options.canonical()
        submission_id = new_job_id()
        self.store.create_submission(submission_id, "all" if kinds is None else kinds, targets)
        jobs: dict[str, Job] = {}
        send: list[tuple[str, str]] = []
        for kind in targets:
            info = online.get(kind, {}).get("info", {})
            job_id = new_job_id()
            key = cache_key(onnx_sha256, canonical, KIND_KEY_SCHEME[0], KIND_KEY_SCHEME[1], kind)
            if kind in online:
                self.artifacts.share_upload(upload, job_id)  # before the row exists: a queued build has its upload
            try:
                job = self.store.create_job(
                    job_id=job_id, key=key, options=canonical, inputs=inputs, onnx_sha256=onnx_sha256,
                    onnx_bytes=onnx_bytes, filename=filename, backend=str(info.get("backend", "unknown")),
                    backend_version=str(info.get("backend_version", "unknown")), device=kind,
                    check_report=check_report, artifact_ok=self.artifacts.is_complete, submission_id=submission_id,
                    kind=kind, no_worker=kind not in online)
            except BaseException:
                self.artifacts.drop_upload(job_id)
                raise
            if job.status == "queued" and job.leader_id is None:
                send.append((job.id, kind))
            elif kind in online:
                self.artifacts.drop_upload(job_id)  # a cache hit or a waiter: never reads it
            jobs[kind] = job
            _LOG.info("submission %s: kind %s -> job %s (%s%s)", submission_id, kind, job.id, job.status,
                      ", cache hit" if job.cache_hit else "", extra={"submission_id": submission_id, "job_id": job.id,
                                                                     "kind": kind})
        self._send(send)
        return {"id": submission_id, "status": _overall([{"status": j.status, "leader_id": j.leader_id,
                                                           "error": j.error} for j in jobs.values()]),
                "url": f"/v1/builds/{submission_id}",
                "kinds": {kind: {"job_id": j.id, "state": kind_state({"status": j.status, "leader_id": j.leader_id,
                                                                      "error": j.error}),
                                 "cache_hit": j.cache_hit, "key": j.key} for kind, j in jobs.items()}}

    def _send(self, builds: list[tuple[str, str]]) -> int:
        """Send builds to their queues; those sent are marked dispatched. Never raises: what is not
        sent now is sent by a watchdog round (the jobs are safe in Postgres)."""
        from trtquant.service.tasks import send_build

        sent: list[str] = []
        for job_id, kind in builds:
            try:
                send_build(self.celery, job_id, kind)
                sent.append(job_id)
            except Exception as exc:
                _LOG.error("could not send build %s to the broker (%s); the watchdog re-sends it", job_id, exc,
                           extra={"job_id": job_id, "kind": kind})
        with contextlib.suppress(Exception):
            self.store.mark_dispatched(sent)
        return len(sent)

    # ------------------------------------------------------------------ views

    def view(self, submission_id: str) -> dict[str, Any] | None:
        """A submission with each kind's state, or None when ``submission_id`` is no submission."""
        found = self.store.submission(submission_id)
        if found is None:
            return None
        sub, rows = found
        kinds: dict[str, Any] = {}
        for row in rows:
            artifact = None
            if row["status"] == "succeeded":
                record = self.store.artifact(row["key"])
                if record is not None:
                    artifact = {"url": f"/v1/builds/{submission_id}/artifact?kind={row['kind']}", "bytes": record.bytes,
                                "sha256": record.sha256, "filename": f"{row['id']}{record.suffix}"}
            kinds[row["kind"]] = {
                "state": kind_state(row), "job_id": row["id"], "status": row["status"], "cache_hit": bool(row["cache_hit"]),
                "built": bool(row["built"]), "build_job_id": row["id"] if row["built"] else row["leader_id"],
                "key": row["key"], "error": row["error"], "attempts": int(row["attempts"]),
                "backend": {"name": row["backend"], "version": row["backend_version"]},
                "created_at": iso_time(row["created_at"]), "started_at": iso_time(row["started_at"]),
                "finished_at": iso_time(row["finished_at"]), "artifact": artifact, "job_url": f"/v1/builds/{row['id']}",
            }
        first = rows[0] if rows else None
        return {
            "id": submission_id, "status": _overall(rows), "requested": json.loads(sub["requested"]),
            "kinds": kinds, "created_at": iso_time(sub["created_at"]),
            "options": json.loads(first["options"]) if first else None,
            "onnx": ({"sha256": first["onnx_sha256"], "bytes": first["onnx_bytes"], "filename": first["filename"]}
                     if first else None),
        }

    def artifact_job(self, build_id: str, kind: str | None) -> Job | None:
        """The job whose artifact ``GET .../artifact`` serves: the submission's job of ``kind`` (or
        its only job), or the job ``build_id`` itself. ScaleOutRejected when ``kind`` is ambiguous."""
        found = self.store.submission(build_id)
        if found is None:
            return self.store.get(build_id)
        _, rows = found
        if kind is None:
            if len(rows) != 1:
                raise ScaleOutRejected(422, f"build {build_id} has one artifact per kind ({', '.join(r['kind'] for r in rows)});"
                                            " add ?kind=<kind>")
            return self.store.get(rows[0]["id"])
        for row in rows:
            if row["kind"] == kind:
                return self.store.get(row["id"])
        raise ScaleOutRejected(404, f"build {build_id} has no target kind {kind[:128]!r}")

    def verified_path(self, record: ArtifactRecord) -> Path:
        """A local file with the artifact's bytes once they match the recorded sha256 (cached per
        size and mtime for the shared folder; an object store's copy is checked as it is fetched).
        Hand it to ``self.artifacts.release_local`` once it is open.

        A mismatch (a corrupt or half-copied file or object) removes it and its record and raises
        ScaleOutRejected(503): the next submission rebuilds it."""
        try:
            path = self.artifacts.local_copy(record)
            stat = path.stat()
        except FileNotFoundError:
            raise ScaleOutRejected(404, "the artifact is no longer in the cache; resubmit the build") from None
        marker = (str(path), stat.st_size, stat.st_mtime_ns)
        if self._verified.get(marker) == record.sha256:
            return path
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != record.sha256 or stat.st_size != record.bytes:
            _LOG.error("artifact %s failed its sha256 check (recorded %s, got %s); removed", record.key, record.sha256,
                       digest.hexdigest())
            self.store.forget_artifact(record.key)
            self.artifacts.release_local(path)
            self.artifacts.discard(record.key, record.suffix)
            raise ScaleOutRejected(503, "the artifact failed its sha256 check and was removed; resubmit to rebuild it")
        if len(self._verified) > 4096:
            self._verified.clear()
        self._verified[marker] = record.sha256
        return path

    # ------------------------------------------------------------------ health

    def health(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body): 200 when Postgres and the broker answer, else 503 naming which did not."""
        from trtquant.service.tasks import broker_ping

        checks: dict[str, Any] = {}
        try:
            checks["database"] = {"ok": True, "latency_ms": round(self.store.ping() * 1000, 2)}
        except Exception as exc:
            checks["database"] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        try:
            started = time.perf_counter()
            broker_ping(self.celery)
            checks["broker"] = {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}
        except Exception as exc:
            checks["broker"] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        body: dict[str, Any] = {"mode": "scale-out", "checks": checks}
        if checks["database"]["ok"]:
            with contextlib.suppress(Exception):
                online = self.kinds_online()
                per_kind = self.store.kind_counts()
                body["kinds"] = {kind: {"workers": online.get(kind, {}).get("workers", 0),
                                        "queue_depth": per_kind.get(kind, {}).get("queued", 0),
                                        "running": per_kind.get(kind, {}).get("running", 0),
                                        "info": online.get(kind, {}).get("info")}
                                 for kind in sorted(set(online) | set(per_kind))}
        ok = checks["database"]["ok"] and checks["broker"]["ok"]
        body["status"] = "ok" if ok else "degraded"
        return (200 if ok else 503), body

    # ------------------------------------------------------------------ watchdog

    def _watchdog(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.watchdog_tick()
            except Exception:
                _LOG.exception("scale-out watchdog round failed")

    def watchdog_tick(self) -> dict[str, Any]:
        """One round (see the module docstring); each step runs even when another failed."""
        done: dict[str, Any] = {"requeued": [], "failed": [], "sent": 0, "no_worker": [], "evicted": [], "swept": []}
        try:
            done["requeued"], done["failed"] = self.store.requeue_expired(self.max_attempts)
            for job_id in done["requeued"]:
                _LOG.warning("job %s: its worker stopped reporting (lease expired); requeued", job_id,
                             extra={"job_id": job_id})
            for job_id in done["failed"]:
                _LOG.error("job %s: lease expired after %d attempts; failed", job_id, self.max_attempts,
                           extra={"job_id": job_id})
        except Exception:
            _LOG.exception("watchdog: requeueing expired builds failed")
        try:
            pending = self.store.undispatched(older_than_s=min(5.0, self.interval_s * 2),
                                              redispatch_after_s=self.redispatch_after_s)
            if done["requeued"]:
                seen = {job_id for job_id, _ in pending}
                pending += [(row["id"], row["kind"]) for row in (self.store.job_row(j) for j in done["requeued"])
                            if row is not None and row["id"] not in seen and row["kind"]]
            done["sent"] = self._send(pending)
        except Exception:
            _LOG.exception("watchdog: re-sending builds failed")
        try:
            online = set(self.kinds_online())
            done["no_worker"] = self.store.fail_queued_without_worker(online, self.no_worker_grace_s)
            for job_id in done["no_worker"]:
                _LOG.error("job %s: no worker of its kind online for %.0f s; failed (no_worker)", job_id,
                           self.no_worker_grace_s, extra={"job_id": job_id})
        except Exception:
            _LOG.exception("watchdog: failing builds without workers failed")
        try:
            done["evicted"] = self.artifacts.evict(self.store)  # type: ignore[arg-type]
        except Exception:
            _LOG.exception("watchdog: artifact cache eviction failed")
        try:
            done["swept"] = self.sweep()
        except Exception:
            _LOG.exception("watchdog: sweeping the shared folder failed")
        return done

    def sweep(self, min_age_s: float = 600.0) -> list[str]:
        """Remove uploads and scratch folders of jobs that are final (or unknown), and partial
        uploads of API nodes that died, once older than ``min_age_s`` (at most every minute).
        The shared folder has no single owner to clean it at start-up, as embedded mode does."""
        now = time.time()
        if now - self._last_sweep < 60.0:
            return []
        self._last_sweep = now
        removed: list[str] = []
        candidates: list[tuple[str, Path]] = []
        for folder in (self.artifacts.uploads, self.artifacts.tmp):
            with contextlib.suppress(FileNotFoundError):
                for entry in folder.iterdir():
                    try:
                        if now - entry.stat().st_mtime < min_age_s:
                            continue
                    except FileNotFoundError:
                        continue
                    name = entry.name.removesuffix(".onnx")
                    if entry.name.startswith(".upload-") and entry.name.endswith(".part"):
                        entry.unlink(missing_ok=True)
                        removed.append(entry.name)
                    elif is_job_id(name):
                        candidates.append((name, entry))
        for job_id, entry in candidates:
            row = self.store.job_row(job_id)
            if row is None or row["status"] in ("succeeded", "failed"):
                if entry.is_dir() and not entry.is_symlink():
                    import shutil

                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry.name)
        removed += self.artifacts.sweep_shared_uploads(self._upload_unneeded, min_age_s)
        return removed

    def _upload_unneeded(self, job_id: str) -> bool:
        row = self.store.job_row(job_id)
        return row is None or row["status"] in ("succeeded", "failed")


def _overall(rows: Sequence[Mapping[str, Any]]) -> str:
    """A submission's status from its jobs: succeeded when all did, running/queued while any is
    active, else failed (see each kind's state)."""
    states = [kind_state(row) for row in rows]
    if states and all(s == "succeeded" for s in states):
        return "succeeded"
    if any(s == "running" for s in states):
        return "running"
    if any(s in ("queued", "waiting") for s in states):
        return "queued"
    return "failed"
