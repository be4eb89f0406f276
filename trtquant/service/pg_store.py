"""The job store of scale-out mode: jobs, artifact metadata, the cache index and the worker
registry in Postgres (psycopg 3), behind the interface of the SQLite :class:`JobStore`.

Why Postgres: API nodes are stateless and any number of them write at once, so the
invariants the SQLite store keeps with one process-wide lock are kept by the database:

* one build per cache key: the unique partial index ``jobs_one_build_per_key`` (see
  :mod:`~trtquant.service.pg_migrations`) plus ``INSERT ... ON CONFLICT DO NOTHING``; the
  loser of a race becomes a waiter of the winner;
* a waiter never misses its leader's end: it is inserted while holding ``FOR SHARE`` on the
  leader's row, and :meth:`succeed`/:meth:`fail` update the leader's row (``FOR UPDATE``)
  before settling waiters, so either the waiter is visible to the settling statement or the
  waiter sees the leader already final and retries (then finding the artifact);
* leases use the database clock, never a node's, so skewed clocks cannot expire a build early.

Where the SQLite store fails a job whose lease ran out, :meth:`PgJobStore.requeue_expired`
puts it back in the queue (its worker died; another worker of the same kind takes it) up to
``max_attempts`` claims, and fails it after that.

Connections come from a small pool; a connection that fails (Postgres restarted) is
discarded and the operation retried on a fresh one, so a restart needs no manual step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from trtquant.service.store import (
    DEFAULT_LEASE_S,
    INTERRUPTED_ERROR,
    LEASE_EXPIRED_ERROR,
    STATUSES,
    ArtifactRecord,
    Job,
    _clip_log,
    canonical_json,
    eviction_victims,
    default_owner,
    is_job_id,
    is_key,
    iso_time,
    to_json,
)

__all__ = ["NO_WORKER_ERROR", "PgJobStore", "StoreUnavailable"]

_LOG = logging.getLogger("trtquant.service")
_T = TypeVar("_T")

NOW = "extract(epoch from clock_timestamp())"
NO_WORKER_ERROR = "no_worker: no build worker of kind {kind!r} is online; start one, then resubmit"


def _job(row: Any) -> Job:
    """A Job from a psycopg dict row (the columns are the SQLite store's, plus scale-out ones)."""
    return Job.from_row(row)


class StoreUnavailable(RuntimeError):
    """Postgres could not be reached after the retries."""


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - the service extra installs it
        raise ImportError(f"scale-out mode needs psycopg 3: pip install 'trtquant[service]' ({exc})") from exc
    return psycopg


class _Pool:
    """A few autocommit connections reused across threads; broken ones are dropped."""

    def __init__(self, url: str, size: int, connect_timeout_s: float) -> None:
        self.url, self.size, self.connect_timeout_s = url, size, connect_timeout_s
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False

    def _connect(self) -> Any:
        psycopg = _psycopg()
        from psycopg.rows import dict_row

        return psycopg.connect(self.url, autocommit=True, row_factory=dict_row,
                               connect_timeout=max(1, int(self.connect_timeout_s)), application_name="trtquant")

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        psycopg = _psycopg()
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None or conn.closed:
            conn = self._connect()
        ok = False
        try:
            yield conn
            ok = True
        except (psycopg.OperationalError, psycopg.InterfaceError):
            with contextlib.suppress(Exception):
                conn.close()
            with self._lock:  # a restarted server broke its siblings too: reconnect all at once
                idle, self._idle = self._idle, []
            for other in idle:
                with contextlib.suppress(Exception):
                    other.close()
            raise
        finally:
            if ok:
                healthy = not conn.closed and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
                with self._lock:
                    if healthy and not self._closed and len(self._idle) < self.size:
                        self._idle.append(conn)
                        conn = None
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                conn.close()


class PgJobStore:
    """Jobs, artifact records, submissions and workers in Postgres.

    Args:
        url: a libpq connection string (``postgresql://user@host:5432/db``).
        lease_s: lease of a claimed job when :meth:`claim` is not given one (seconds).
        pool_size: idle connections kept.
        retry_s: how long an operation keeps retrying while Postgres is unreachable (a restart).
        migrate: apply missing schema migrations now (every node does; the advisory lock serialises them).
    """

    def __init__(self, url: str, *, lease_s: float = DEFAULT_LEASE_S, pool_size: int = 8, retry_s: float = 30.0,
                 migrate: bool = True) -> None:
        if not lease_s > 0:
            raise ValueError(f"lease_s={lease_s} must be > 0")
        self.url = url
        self.lease_s = float(lease_s)
        self.retry_s = float(retry_s)
        self.owner = default_owner()
        self._pool = _Pool(url, pool_size, connect_timeout_s=5.0)
        if migrate:
            from trtquant.service.pg_migrations import migrate as apply

            applied = self._run(lambda conn: apply(conn))
            if applied:
                _LOG.info("job database: applied schema migration(s) %s", applied)

    def close(self) -> None:
        self._pool.close()

    def _run(self, op: Callable[[Any], _T], *, retry: bool = True) -> _T:
        """``op(conn)``, retried on a fresh connection while Postgres is unreachable (``retry_s``).

        Every operation here is one transaction, so a retry after a lost connection either
        repeats an operation that did not commit or finds its effect (callers are idempotent).
        """
        psycopg = _psycopg()
        deadline = time.monotonic() + (self.retry_s if retry else 0.0)
        delay = 0.1
        while True:
            try:
                with self._pool.connection() as conn:
                    return op(conn)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                if time.monotonic() + delay > deadline:
                    raise StoreUnavailable(f"the job database is unreachable ({type(exc).__name__}: "
                                           f"{str(exc).splitlines()[0] if str(exc) else ''}); check Postgres") from exc
                _LOG.warning("job database: %s; retrying in %.1f s", str(exc).splitlines()[0] if str(exc) else exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def ping(self) -> float:
        """Round-trip time of ``SELECT 1`` in seconds (raises when Postgres is down; no retry)."""
        started = time.perf_counter()
        self._run(lambda conn: conn.execute("SELECT 1").fetchone(), retry=False)
        return time.perf_counter() - started

    # ------------------------------------------------------------------ jobs

    def create_job(self, *, job_id: str, key: str, options: Mapping[str, Any], inputs: Mapping[str, Any],
                   onnx_sha256: str, onnx_bytes: int, filename: str | None, backend: str, backend_version: str,
                   device: str | None, check_report: Mapping[str, Any] | None,
                   artifact_ok: Callable[[ArtifactRecord], bool], submission_id: str | None = None,
                   kind: str | None = None, no_worker: bool = False) -> Job:
        """Insert a job, deduplicated by cache key (see :meth:`JobStore.create_job`); safe when
        many API nodes insert the same key at once. ``no_worker``: record it failed at once
        (its kind has no worker online)."""
        if not is_job_id(job_id) or not is_key(key):
            raise ValueError("bad job id or cache key")
        psycopg = _psycopg()
        values = {
            "id": job_id, "submission_id": submission_id, "kind": kind, "key": key,
            "options": canonical_json(dict(options)), "inputs": to_json(dict(inputs)), "onnx_sha256": onnx_sha256,
            "onnx_bytes": int(onnx_bytes), "filename": filename, "backend": backend, "backend_version": backend_version,
            "device": device, "check_report": None if check_report is None else to_json(check_report),
        }
        columns = ", ".join(values)
        params = ", ".join(f"%({name})s" for name in values)

        def insert(conn: Any, status: str, cache_hit: int, leader: str | None, log: str, error: str | None = None,
                   conflict: bool = False) -> dict[str, Any] | None:
            on_conflict = (" ON CONFLICT (key) WHERE status IN ('queued', 'running') AND leader_id IS NULL DO NOTHING"
                           if conflict else "")
            final = status in ("succeeded", "failed")
            return conn.execute(
                f"INSERT INTO jobs ({columns}, status, cache_hit, leader_id, log, error, created_at, finished_at) "
                f"VALUES ({params}, %(status)s, %(cache_hit)s, %(leader)s, %(log)s, %(error)s, {NOW}, "
                f"{NOW if final else 'NULL'}){on_conflict} RETURNING *",
                {**values, "status": status, "cache_hit": cache_hit, "leader": leader, "log": log, "error": error},
            ).fetchone()

        def op(conn: Any) -> Job:
            existing = conn.execute("SELECT * FROM jobs WHERE id = %s", (job_id,)).fetchone()
            if existing is not None:  # a retry after a commit whose answer was lost
                return _job(existing)
            if no_worker:
                with conn.transaction():
                    row = insert(conn, "failed", 0, None, "", NO_WORKER_ERROR.format(kind=kind))
                return _job(row)
            for _ in range(20):  # each round ends unless a leader finished between two statements
                with conn.transaction():
                    art = conn.execute("SELECT * FROM artifacts WHERE key = %s", (key,)).fetchone()
                    if art is not None and artifact_ok(ArtifactRecord.from_row(art)):
                        conn.execute(f"UPDATE artifacts SET last_used_at = {NOW} WHERE key = %s", (key,))
                        row = insert(conn, "succeeded", 1, art["build_job_id"],
                                     f"cache hit: artifact {key} built by job {art['build_job_id']}\n")
                        return _job(row)
                    if art is not None:  # a row without its file: forget it and rebuild
                        conn.execute("DELETE FROM artifacts WHERE key = %s", (key,))
                    row = insert(conn, "queued", 0, None, "", conflict=True)
                    if row is not None:
                        return _job(row)
                    leader = conn.execute(
                        "SELECT id FROM jobs WHERE key = %s AND status IN ('queued', 'running') AND leader_id IS NULL "
                        "FOR SHARE", (key,)).fetchone()
                    if leader is not None:
                        row = insert(conn, "queued", 1, leader["id"],
                                     f"identical build in flight: waiting for job {leader['id']}\n")
                        return _job(row)
            raise RuntimeError(f"could not settle the submission of key {key} (20 rounds of concurrent changes)")

        try:
            return self._run(op)
        except psycopg.errors.UniqueViolation:  # the id itself: a retried insert that had committed
            job = self.get(job_id)
            if job is None:
                raise
            return job

    def get(self, job_id: str) -> Job | None:
        if not is_job_id(job_id):
            return None
        row = self._run(lambda conn: conn.execute("SELECT * FROM jobs WHERE id = %s", (job_id,)).fetchone())
        return None if row is None else _job(row)

    def job_row(self, job_id: str) -> dict[str, Any] | None:
        """The raw row (with ``kind``, ``attempts``, ``submission_id``) for scale-out views."""
        if not is_job_id(job_id):
            return None
        return self._run(lambda conn: conn.execute("SELECT * FROM jobs WHERE id = %s", (job_id,)).fetchone())

    def claim(self, job_id: str, *, owner: str | None = None, lease_s: float | None = None,
              kind: str | None = None) -> Job | None:
        """``queued`` -> ``running`` for a build job, with a lease (database clock); counts the attempt.
        ``kind``: only a job of that kind (a worker never builds for another GPU kind)."""
        if not is_job_id(job_id):
            return None
        lease = self.lease_s if lease_s is None else float(lease_s)
        row = self._run(lambda conn: conn.execute(
            f"UPDATE jobs SET status = 'running', started_at = {NOW}, lease_owner = %s, "
            f"lease_expires_at = {NOW} + %s, attempts = attempts + 1 "
            "WHERE id = %s AND status = 'queued' AND leader_id IS NULL AND (%s::text IS NULL OR kind = %s) RETURNING *",
            (owner or self.owner, lease, job_id, kind, kind)).fetchone())
        return None if row is None else _job(row)

    def _settle_waiters(self, conn: Any, job_id: str, status: str, log: str, error: str | None = None) -> None:
        if status == "succeeded":
            conn.execute(f"UPDATE jobs SET status = 'succeeded', cache_hit = 1, finished_at = {NOW}, log = log || %s "
                         "WHERE leader_id = %s AND status = 'queued'", (log, job_id))
        else:
            conn.execute(f"UPDATE jobs SET status = 'failed', error = %s, finished_at = {NOW}, log = log || %s "
                         "WHERE leader_id = %s AND status = 'queued'", (error, log, job_id))

    def succeed(self, job_id: str, artifact: ArtifactRecord, log: str, *, built: bool = True) -> bool:
        """Record the artifact, mark the job and its waiters succeeded (one transaction); False
        when the job was no longer active (the artifact is recorded all the same)."""
        def op(conn: Any) -> bool:
            with conn.transaction():
                conn.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
                conn.execute(
                    "INSERT INTO artifacts (key, suffix, sha256, bytes, report, backend, backend_version, build_job_id, "
                    f"created_at, last_used_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, {NOW}) "
                    "ON CONFLICT (key) DO UPDATE SET suffix = EXCLUDED.suffix, sha256 = EXCLUDED.sha256, "
                    "bytes = EXCLUDED.bytes, report = EXCLUDED.report, backend = EXCLUDED.backend, "
                    "backend_version = EXCLUDED.backend_version, build_job_id = EXCLUDED.build_job_id, "
                    "created_at = EXCLUDED.created_at, last_used_at = EXCLUDED.last_used_at",
                    (artifact.key, artifact.suffix, artifact.sha256, artifact.bytes, to_json(artifact.report),
                     artifact.backend, artifact.backend_version, artifact.build_job_id, artifact.created_at))
                cur = conn.execute(
                    f"UPDATE jobs SET status = 'succeeded', built = %s, cache_hit = %s, error = NULL, log = %s, "
                    f"finished_at = {NOW}, lease_expires_at = NULL WHERE id = %s AND status IN ('queued', 'running')",
                    (1 if built else 0, 0 if built else 1, _clip_log(log), job_id))
                self._settle_waiters(conn, job_id, "succeeded", f"job {job_id} finished the build: succeeded\n")
                return cur.rowcount == 1

        return self._run(op)

    def succeed_from_cache(self, job_id: str, artifact: ArtifactRecord, log: str) -> None:
        """A claimed build whose artifact appeared meanwhile: succeed without building."""
        def op(conn: Any) -> None:
            with conn.transaction():
                conn.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
                conn.execute(
                    f"UPDATE jobs SET status = 'succeeded', built = 0, cache_hit = 1, leader_id = %s, log = %s, "
                    f"finished_at = {NOW}, lease_expires_at = NULL WHERE id = %s AND status IN ('queued', 'running')",
                    (artifact.build_job_id, _clip_log(log), job_id))
                conn.execute(f"UPDATE artifacts SET last_used_at = {NOW} WHERE key = %s", (artifact.key,))
                self._settle_waiters(conn, job_id, "succeeded", f"job {job_id} found the artifact in the cache\n")

        self._run(op)

    def fail(self, job_id: str, error: str, log: str | None) -> bool:
        """Mark an active build failed, and every job waiting for it (one transaction)."""
        def op(conn: Any) -> bool:
            with conn.transaction():
                return self._fail_in(conn, job_id, error, log)

        return self._run(op)

    def _fail_in(self, conn: Any, job_id: str, error: str, log: str | None) -> bool:
        conn.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
        if log is None:
            cur = conn.execute(f"UPDATE jobs SET status = 'failed', error = %s, finished_at = {NOW}, "
                               "lease_expires_at = NULL WHERE id = %s AND status IN ('queued', 'running')", (error, job_id))
        else:
            cur = conn.execute(f"UPDATE jobs SET status = 'failed', error = %s, log = %s, finished_at = {NOW}, "
                               "lease_expires_at = NULL WHERE id = %s AND status IN ('queued', 'running')",
                               (error, _clip_log(log), job_id))
        self._settle_waiters(conn, job_id, "failed", f"job {job_id} finished the build: failed\n",
                             f"the identical build it waited for (job {job_id}) failed: {error}")
        return cur.rowcount == 1

    def renew_leases(self, job_ids: list[str] | set[str], owner: str, lease_s: float,
                     logs: Mapping[str, str] | None = None) -> set[str]:
        """Extend the leases ``owner`` holds on running ``job_ids`` (and store their live logs)."""
        ids = [job_id for job_id in job_ids if is_job_id(job_id)]
        if not ids:
            return set()

        def op(conn: Any) -> set[str]:
            renewed: set[str] = set()
            for job_id in ids:
                log = (logs or {}).get(job_id)
                row = conn.execute(
                    f"UPDATE jobs SET lease_expires_at = {NOW} + %s, log = COALESCE(%s, log) WHERE id = %s "
                    "AND status = 'running' AND lease_owner = %s RETURNING id",
                    (float(lease_s), None if log is None else _clip_log(log), job_id, owner)).fetchone()
                if row is not None:
                    renewed.add(job_id)
            return renewed

        return self._run(op)

    def expire_leases(self, now: float | None = None) -> list[str]:
        """Fail every running job whose lease ran out (SQLite-store semantics; scale-out uses
        :meth:`requeue_expired`)."""
        requeued, failed = self.requeue_expired(max_attempts=0)
        return requeued + failed

    def requeue_expired(self, max_attempts: int = 3) -> tuple[list[str], list[str]]:
        """Running jobs whose lease ran out (their worker died): back to ``queued`` while they
        have had fewer than ``max_attempts`` claims, else failed with their waiters.
        Returns ``(requeued ids, failed ids)``."""
        def op(conn: Any) -> tuple[list[str], list[str]]:
            requeued: list[str] = []
            failed: list[str] = []
            with conn.transaction():
                rows = conn.execute(
                    f"SELECT id, attempts, lease_owner FROM jobs WHERE status = 'running' AND "
                    f"(lease_expires_at IS NULL OR lease_expires_at < {NOW}) FOR UPDATE SKIP LOCKED").fetchall()
                for row in rows:
                    stamp = iso_time(time.time())
                    if row["attempts"] < max_attempts:
                        conn.execute(
                            "UPDATE jobs SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL, "
                            "dispatched_at = NULL, log = log || %s WHERE id = %s",
                            (f"[{stamp}] worker {row['lease_owner']} stopped reporting (lease expired); "
                             f"requeued after attempt {row['attempts']} of {max_attempts}\n", row["id"]))
                        requeued.append(row["id"])
                    else:
                        self._fail_in(conn, row["id"], LEASE_EXPIRED_ERROR, None)
                        conn.execute("UPDATE jobs SET log = log || %s WHERE id = %s",
                                     (f"[{stamp}] {LEASE_EXPIRED_ERROR}\n", row["id"]))
                        failed.append(row["id"])
            return requeued, failed

        return self._run(op)

    def recover(self) -> dict[str, int]:
        """SQLite-store start-up semantics (interface parity). In scale-out mode nothing runs at
        start-up: other nodes are live; leases and :meth:`requeue_expired` handle dead workers."""
        return {"interrupted": 0, "settled": 0, "requeued": len(self.queued_builds())}

    def recover_interrupted(self) -> int:
        """Fail every running job (the SQLite store's restart policy): only for a whole-fleet reset."""
        def op(conn: Any) -> int:
            with conn.transaction():
                rows = conn.execute("SELECT id FROM jobs WHERE status = 'running' FOR UPDATE").fetchall()
                for row in rows:
                    self._fail_in(conn, row["id"], INTERRUPTED_ERROR, None)
            return len(rows)

        return self._run(op)

    def queued_builds(self, kind: str | None = None) -> list[str]:
        """Ids of queued build jobs (not waiting duplicates), oldest first."""
        sql = "SELECT id FROM jobs WHERE status = 'queued' AND leader_id IS NULL"
        args: tuple[Any, ...] = ()
        if kind is not None:
            sql, args = sql + " AND kind = %s", (kind,)
        rows = self._run(lambda conn: conn.execute(sql + " ORDER BY created_at", args).fetchall())
        return [row["id"] for row in rows]

    def mark_dispatched(self, job_ids: list[str]) -> None:
        """The build tasks of ``job_ids`` are on the broker."""
        if job_ids:
            self._run(lambda conn: conn.execute(f"UPDATE jobs SET dispatched_at = {NOW} WHERE id = ANY(%s)",
                                                (list(job_ids),)))

    def undispatched(self, older_than_s: float, redispatch_after_s: float) -> list[tuple[str, str]]:
        """Queued builds whose task never reached the broker (the API node died between commit and
        send, or the broker was down) older than ``older_than_s``, or sent longer than
        ``redispatch_after_s`` ago (a broker restarted without its queue): ``(job id, kind)``."""
        rows = self._run(lambda conn: conn.execute(
            "SELECT id, kind FROM jobs WHERE status = 'queued' AND leader_id IS NULL AND kind IS NOT NULL AND "
            f"((dispatched_at IS NULL AND created_at < {NOW} - %s) OR dispatched_at < {NOW} - %s) ORDER BY created_at",
            (float(older_than_s), float(redispatch_after_s))).fetchall())
        return [(row["id"], row["kind"]) for row in rows]

    def counts(self) -> dict[str, int]:
        """Jobs per status, plus ``waiting`` (queued duplicates) and ``builds`` (jobs that built)."""
        def op(conn: Any) -> dict[str, int]:
            rows = conn.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
            extra = conn.execute(
                "SELECT COUNT(*) FILTER (WHERE status = 'queued' AND leader_id IS NOT NULL) AS waiting, "
                "COUNT(*) FILTER (WHERE built = 1) AS builds FROM jobs").fetchone()
            out = {status: 0 for status in STATUSES}
            out.update({row["status"]: int(row["n"]) for row in rows})
            out["waiting"] = int(extra["waiting"])
            out["builds"] = int(extra["builds"])
            return out

        return self._run(op)

    def kind_counts(self) -> dict[str, dict[str, int]]:
        """Per kind: ``queued`` builds (the queue depth), ``running``, ``succeeded``, ``failed``, ``builds``."""
        rows = self._run(lambda conn: conn.execute(
            "SELECT kind, COUNT(*) FILTER (WHERE status = 'queued' AND leader_id IS NULL) AS queued, "
            "COUNT(*) FILTER (WHERE status = 'running') AS running, "
            "COUNT(*) FILTER (WHERE status = 'succeeded') AS succeeded, "
            "COUNT(*) FILTER (WHERE status = 'failed') AS failed, "
            "COUNT(*) FILTER (WHERE cache_hit = 1) AS cache_hits, "
            "COUNT(*) FILTER (WHERE built = 1) AS builds FROM jobs WHERE kind IS NOT NULL GROUP BY kind").fetchall())
        return {row["kind"]: {k: int(v) for k, v in row.items() if k != "kind"} for row in rows}

    def build_durations(self, buckets: tuple[float, ...]) -> dict[str, tuple[list[tuple[float, int]], float]]:
        """Per kind: cumulative ``[(le, count), ..., (inf, count)]`` and the sum of the build times
        (claim to publish) of jobs that built."""
        cols = ", ".join(f"COUNT(*) FILTER (WHERE d <= {float(b)!r}) AS b{i}" for i, b in enumerate(buckets))
        rows = self._run(lambda conn: conn.execute(
            f"SELECT kind, {cols}, COUNT(*) AS n, COALESCE(SUM(d), 0) AS s FROM (SELECT kind, finished_at - started_at "
            "AS d FROM jobs WHERE built = 1 AND kind IS NOT NULL AND started_at IS NOT NULL) t GROUP BY kind").fetchall())
        out: dict[str, tuple[list[tuple[float, int]], float]] = {}
        for row in rows:
            series = [(b, int(row[f"b{i}"])) for i, b in enumerate(buckets)] + [(float("inf"), int(row["n"]))]
            out[row["kind"]] = (series, float(row["s"]))
        return out

    def fail_queued_without_worker(self, online: set[str], grace_s: float) -> list[str]:
        """Fail queued builds of kinds with no worker online that waited longer than ``grace_s``."""
        def op(conn: Any) -> list[str]:
            failed: list[str] = []
            with conn.transaction():
                rows = conn.execute(
                    "SELECT id, kind FROM jobs WHERE status = 'queued' AND leader_id IS NULL AND kind IS NOT NULL "
                    f"AND NOT (kind = ANY(%s)) AND created_at < {NOW} - %s FOR UPDATE SKIP LOCKED",
                    (sorted(online), float(grace_s))).fetchall()
                for row in rows:
                    if self._fail_in(conn, row["id"], NO_WORKER_ERROR.format(kind=row["kind"]), None):
                        failed.append(row["id"])
            return failed

        return self._run(op)

    # ------------------------------------------------------------------ submissions

    def create_submission(self, submission_id: str, requested: list[str] | str, kinds: list[str]) -> None:
        self._run(lambda conn: conn.execute(
            f"INSERT INTO submissions (id, requested, kinds, created_at) VALUES (%s, %s, %s, {NOW}) "
            "ON CONFLICT (id) DO NOTHING", (submission_id, json.dumps(requested), json.dumps(kinds))))

    def submission(self, submission_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """The submission row and its jobs' rows (one per kind), or None."""
        if not is_job_id(submission_id):
            return None

        def op(conn: Any) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
            sub = conn.execute("SELECT * FROM submissions WHERE id = %s", (submission_id,)).fetchone()
            if sub is None:
                return None
            jobs = conn.execute("SELECT * FROM jobs WHERE submission_id = %s ORDER BY kind", (submission_id,)).fetchall()
            return sub, jobs

        return self._run(op)

    # ------------------------------------------------------------------ workers

    def register_worker(self, worker_id: str, kind: str, info: Mapping[str, Any], current_job: str | None = None) -> None:
        """Insert or refresh a worker's registration (its heartbeat)."""
        self._run(lambda conn: conn.execute(
            f"INSERT INTO workers (id, kind, info, started_at, last_seen, current_job) VALUES (%s, %s, %s, {NOW}, {NOW}, %s) "
            f"ON CONFLICT (id) DO UPDATE SET last_seen = {NOW}, current_job = EXCLUDED.current_job, kind = EXCLUDED.kind",
            (worker_id, kind, to_json(dict(info)), current_job)))

    def unregister_worker(self, worker_id: str) -> None:
        self._run(lambda conn: conn.execute("DELETE FROM workers WHERE id = %s", (worker_id,)), retry=False)

    def workers(self, ttl_s: float) -> list[dict[str, Any]]:
        """Workers seen within ``ttl_s`` seconds (database clock), with ``info`` decoded."""
        rows = self._run(lambda conn: conn.execute(
            f"SELECT id, kind, info, started_at, last_seen, current_job, {NOW} - last_seen AS age FROM workers "
            f"WHERE last_seen > {NOW} - %s ORDER BY kind, id", (float(ttl_s),)).fetchall())
        return [{**row, "info": json.loads(row["info"])} for row in rows]

    def kinds_online(self, ttl_s: float) -> dict[str, dict[str, Any]]:
        """kind -> ``{"workers": n, "info": one worker's advertisement}`` for live workers."""
        out: dict[str, dict[str, Any]] = {}
        for row in self.workers(ttl_s):
            entry = out.setdefault(row["kind"], {"workers": 0, "info": row["info"]})
            entry["workers"] += 1
        return out

    def forget_workers(self, older_than_s: float) -> int:
        """Delete registrations not seen for ``older_than_s`` seconds."""
        return int(self._run(lambda conn: conn.execute(
            f"DELETE FROM workers WHERE last_seen < {NOW} - %s", (float(older_than_s),)).rowcount))

    # ------------------------------------------------------------------ artifacts

    def artifact(self, key: str) -> ArtifactRecord | None:
        if not is_key(key):
            return None
        row = self._run(lambda conn: conn.execute("SELECT * FROM artifacts WHERE key = %s", (key,)).fetchone())
        return None if row is None else ArtifactRecord.from_row(row)

    def artifacts(self) -> dict[str, str]:
        rows = self._run(lambda conn: conn.execute("SELECT key, suffix FROM artifacts").fetchall())
        return {row["key"]: row["suffix"] for row in rows}

    def forget_artifact(self, key: str) -> None:
        self._run(lambda conn: conn.execute("DELETE FROM artifacts WHERE key = %s", (key,)))

    def touch_artifact(self, key: str, now: float | None = None) -> None:
        if is_key(key):
            if now is None:
                self._run(lambda conn: conn.execute(f"UPDATE artifacts SET last_used_at = {NOW} WHERE key = %s", (key,)))
            else:
                self._run(lambda conn: conn.execute("UPDATE artifacts SET last_used_at = %s WHERE key = %s", (now, key)))

    def cache_bytes(self) -> int:
        row = self._run(lambda conn: conn.execute("SELECT COALESCE(SUM(bytes), 0) AS n FROM artifacts").fetchone())
        return int(row["n"])

    def evict_artifacts(self, *, max_bytes: int | None, max_age_s: float | None,
                        keep: set[str] | frozenset[str] = frozenset(), now: float | None = None) -> list[tuple[str, str]]:
        """Delete the rows of the artifacts to evict (see :meth:`JobStore.evict_artifacts`)."""
        def op(conn: Any) -> list[tuple[str, str]]:
            with conn.transaction():
                clock = float(conn.execute(f"SELECT {NOW} AS t").fetchone()["t"]) if now is None else now
                rows = conn.execute("SELECT key, suffix, bytes, COALESCE(last_used_at, created_at) AS used FROM artifacts "
                                    "ORDER BY used, created_at, key FOR UPDATE").fetchall()
                pinned = {row["key"] for row in conn.execute(
                    "SELECT DISTINCT key FROM jobs WHERE status IN ('queued', 'running')").fetchall()}
                victims = eviction_victims(rows, pinned | set(keep), clock, max_age_s, max_bytes)
                if victims:
                    conn.execute("DELETE FROM artifacts WHERE key = ANY(%s)", ([key for key, _ in victims],))
                return victims

        return self._run(op)

