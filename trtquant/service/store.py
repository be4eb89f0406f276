"""Persistent state of the build service: jobs in SQLite, artifacts in a content-addressed folder.

Layout of the work folder (``workdir``)::

    jobs.db                     SQLite (WAL) unless ``db_path`` points elsewhere
    uploads/<job id>.onnx       uploads of queued builds (deleted when the build ends)
    uploads/.upload-*.part      uploads being received (deleted at start-up)
    tmp/<job id>/               build scratch folders (wiped at start-up, never served)
    cache/<key[:2]>/<key><ext>  published artifacts (.engine or .onnx), one per cache key
    timing/                     TensorRT timing caches

Rules that keep half-written files from being served:

* an artifact is built in ``tmp/<job id>/`` and moved into ``cache/`` with ``os.replace``
  (atomic on one file system) only after the build succeeded; the ``artifacts`` row is
  inserted after the rename, in the same transaction that marks the job succeeded;
* the API serves a file only for a succeeded job whose ``artifacts`` row exists, from the
  path derived from the (hex) cache key, never from a client-supplied name;
* at start-up :meth:`ArtifactStore.reconcile` deletes ``tmp/``, cache files without an
  ``artifacts`` row (a crash between rename and commit) and rows whose file is gone.

Restart policy: a job found ``running`` at start-up is marked ``failed`` ("interrupted by
restart") — a build may have died half-way through a GPU allocation or a driver fault, so it
is not retried behind the client's back; resubmitting the same upload starts a fresh build.
Jobs still ``queued`` keep their place and are built after the restart.

Leases: a claimed (``running``) job carries ``lease_owner`` and ``lease_expires_at``; the
owning :class:`~trtquant.service.jobs.BuildManager` renews them while the build thread is
alive, and :meth:`JobStore.expire_leases` fails a running job whose lease ran out (its
thread died, or the process that claimed it is gone), so no job stays ``running`` forever.

Cache eviction (:meth:`ArtifactStore.evict`): least recently used first, by total size and
idle age; artifacts of jobs that are not final, and keys pinned while served, are kept. The
``artifacts`` row is deleted (committed) before the file: a crash in between leaves an
orphan file that :meth:`ArtifactStore.reconcile` removes at the next start, never a row
without its file.

One connection guarded by a lock serves every thread (builds and HTTP handlers): the
service writes a few rows per build, far below what serialising them costs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ARTIFACT_SUFFIXES",
    "INTERRUPTED_ERROR",
    "LEASE_EXPIRED_ERROR",
    "ArtifactRecord",
    "ArtifactStore",
    "Job",
    "JobStore",
    "cache_key",
    "canonical_json",
    "is_job_id",
    "is_key",
    "iso_time",
    "jsonable",
    "new_job_id",
]

SCHEMA_VERSION = 1
JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")
KEY_RE = re.compile(r"^[0-9a-f]{64}$")
ARTIFACT_SUFFIXES = (".engine", ".onnx")
STATUSES = ("queued", "running", "succeeded", "failed")
ACTIVE = ("queued", "running")
INTERRUPTED_ERROR = (
    "interrupted by restart: the service stopped while this build was running; "
    "nothing was published; resubmit to build again"
)
MAX_LOG_CHARS = 256 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
    cache_hit INTEGER NOT NULL DEFAULT 0,
    built INTEGER NOT NULL DEFAULT 0,
    leader_id TEXT,
    options TEXT NOT NULL,
    inputs TEXT NOT NULL DEFAULT '{}',
    onnx_sha256 TEXT NOT NULL,
    onnx_bytes INTEGER NOT NULL,
    filename TEXT,
    backend TEXT NOT NULL,
    backend_version TEXT NOT NULL,
    device TEXT,
    check_report TEXT,
    error TEXT,
    log TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    lease_owner TEXT,
    lease_expires_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_key_status ON jobs (key, status);
CREATE INDEX IF NOT EXISTS jobs_status_created ON jobs (status, created_at);
CREATE INDEX IF NOT EXISTS jobs_leader ON jobs (leader_id);
CREATE TABLE IF NOT EXISTS artifacts (
    key TEXT PRIMARY KEY,
    suffix TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    report TEXT NOT NULL DEFAULT '{}',
    backend TEXT NOT NULL,
    backend_version TEXT NOT NULL,
    build_job_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    last_used_at REAL
);
"""

#: Columns added after schema 1 shipped: added in place to older databases (additive, so the
#: schema version and with it every cache key stay the same).
_ADDED_COLUMNS = {
    "jobs": (("lease_owner", "TEXT"), ("lease_expires_at", "REAL")),
    "artifacts": (("last_used_at", "REAL"),),
}

LEASE_EXPIRED_ERROR = (
    "build lost: its worker stopped reporting (lease expired); nothing was published; resubmit to build again"
)
DEFAULT_LEASE_S = 60.0


def new_job_id() -> str:
    """A fresh job id: 32 lowercase hex characters (uuid4)."""
    import uuid

    return uuid.uuid4().hex


def is_job_id(text: str) -> bool:
    return isinstance(text, str) and JOB_ID_RE.match(text) is not None


def is_key(text: str) -> bool:
    return isinstance(text, str) and KEY_RE.match(text) is not None


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 as is: the same options always hash the same."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def cache_key(onnx_sha256: str, options: Mapping[str, Any], backend: str, backend_version: str,
              device: str | None) -> str:
    """SHA-256 over what decides an artifact: the ONNX bytes (via their sha256), the canonical
    options JSON, the backend name and version, and the GPU (or CPU) it builds for."""
    payload = canonical_json({
        "schema": SCHEMA_VERSION,
        "onnx_sha256": onnx_sha256,
        "options": dict(options),
        "backend": backend,
        "backend_version": backend_version,
        "device": device,
    })
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _plain(value: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays via ``tolist``, tuples/sets as lists, NaN/inf as None."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        return _plain(tolist())
    return str(value)


def to_json(value: Any) -> str:
    """Strict JSON text of reports that may hold numpy values, tuples, paths or NaN."""
    return json.dumps(_plain(value), allow_nan=False)


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (round trip through :func:`to_json`)."""
    return json.loads(to_json(value))


def iso_time(ts: float | None) -> str | None:
    if ts is None:
        return None
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Job:
    """One row of ``jobs``."""

    id: str
    key: str
    status: str
    cache_hit: bool
    built: bool
    leader_id: str | None
    options: dict[str, Any]
    inputs: dict[str, Any]
    onnx_sha256: str
    onnx_bytes: int
    filename: str | None
    backend: str
    backend_version: str
    device: str | None
    check_report: dict[str, Any] | None
    error: str | None
    log: str
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    lease_owner: str | None = None
    lease_expires_at: float | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        return cls(
            id=row["id"], key=row["key"], status=row["status"], cache_hit=bool(row["cache_hit"]),
            built=bool(row["built"]), leader_id=row["leader_id"], options=json.loads(row["options"]),
            inputs=json.loads(row["inputs"] or "{}"), onnx_sha256=row["onnx_sha256"],
            onnx_bytes=int(row["onnx_bytes"]), filename=row["filename"], backend=row["backend"],
            backend_version=row["backend_version"], device=row["device"],
            check_report=json.loads(row["check_report"]) if row["check_report"] else None,
            error=row["error"], log=row["log"] or "", created_at=row["created_at"],
            started_at=row["started_at"], finished_at=row["finished_at"],
            lease_owner=row["lease_owner"], lease_expires_at=row["lease_expires_at"],
        )


@dataclass
class ArtifactRecord:
    """One row of ``artifacts``: a published, complete artifact."""

    key: str
    suffix: str
    sha256: str
    bytes: int
    backend: str
    backend_version: str
    build_job_id: str
    created_at: float
    report: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> ArtifactRecord:
        return cls(key=row["key"], suffix=row["suffix"], sha256=row["sha256"], bytes=int(row["bytes"]),
                   backend=row["backend"], backend_version=row["backend_version"],
                   build_job_id=row["build_job_id"], created_at=row["created_at"],
                   report=json.loads(row["report"] or "{}"))


def _clip_log(text: str) -> str:
    if len(text) <= MAX_LOG_CHARS:
        return text
    return "[... earlier log lines dropped ...]\n" + text[-MAX_LOG_CHARS:]


class JobStore:
    """Jobs and artifact records in one SQLite database (WAL mode, one locked connection).

    Args:
        path: the database file.
        lease_s: lease of a claimed job when :meth:`claim` is not given one (seconds).
    """

    def __init__(self, path: str | os.PathLike[str], *, lease_s: float = DEFAULT_LEASE_S) -> None:
        if not lease_s > 0:
            raise ValueError(f"lease_s={lease_s} must be > 0")
        self.lease_s = float(lease_s)
        self.owner = default_owner()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=30000")
        with self._lock:
            self._db.executescript(_SCHEMA)  # CREATE ... IF NOT EXISTS, outside any transaction
            for table, columns in _ADDED_COLUMNS.items():
                have = {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}
                for name, kind in columns:
                    if name not in have:  # a database written before the column existed
                        with contextlib.suppress(sqlite3.OperationalError):  # another process added it
                            self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
        with self._tx() as db:
            row = db.execute("SELECT v FROM meta WHERE k = 'schema_version'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta (k, v) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row["v"]) != SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} has job-store schema {row['v']}; this trtquant reads {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``) under the lock.

        A failed ``COMMIT`` (disk full) is rolled back too: a transaction left open would make
        every later ``BEGIN`` fail, and with it every status update of every job.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        with self._lock:
            row: sqlite3.Row | None = self._db.execute(sql, args).fetchone()
            return row

    # ------------------------------------------------------------------ jobs

    def create_job(
        self,
        *,
        job_id: str,
        key: str,
        options: Mapping[str, Any],
        inputs: Mapping[str, Any],
        onnx_sha256: str,
        onnx_bytes: int,
        filename: str | None,
        backend: str,
        backend_version: str,
        device: str | None,
        check_report: Mapping[str, Any] | None,
        artifact_ok: Callable[[ArtifactRecord], bool],
    ) -> Job:
        """Insert a job, deduplicated by cache key in one transaction.

        * a published artifact for ``key`` exists (and ``artifact_ok`` confirms its file):
          the job is ``succeeded`` at once with ``cache_hit``;
        * another job with ``key`` is queued or running: this one waits for it
          (``queued``, ``cache_hit``, ``leader_id`` = that job) and is settled when it ends;
        * else: a new ``queued`` build (``leader_id`` NULL) for a worker to claim.
        """
        if not is_job_id(job_id) or not is_key(key):
            raise ValueError("bad job id or cache key")
        now = time.time()
        with self._tx() as db:
            status, cache_hit, leader, finished = "queued", 0, None, None
            art = db.execute("SELECT * FROM artifacts WHERE key = ?", (key,)).fetchone()
            if art is not None and artifact_ok(ArtifactRecord.from_row(art)):
                status, cache_hit, leader, finished = "succeeded", 1, art["build_job_id"], now
                db.execute("UPDATE artifacts SET last_used_at = ? WHERE key = ?", (now, key))
            else:
                if art is not None:  # row without its file: forget it and rebuild
                    db.execute("DELETE FROM artifacts WHERE key = ?", (key,))
                running = db.execute(
                    "SELECT id FROM jobs WHERE key = ? AND status IN ('queued', 'running') AND leader_id IS NULL "
                    "ORDER BY created_at LIMIT 1", (key,)).fetchone()
                if running is not None:
                    cache_hit, leader = 1, running["id"]
            log = ""
            if status == "succeeded":
                log = f"cache hit: artifact {key} built by job {leader}\n"
            elif leader is not None:
                log = f"identical build in flight: waiting for job {leader}\n"
            db.execute(
                "INSERT INTO jobs (id, key, status, cache_hit, built, leader_id, options, inputs, onnx_sha256, "
                "onnx_bytes, filename, backend, backend_version, device, check_report, log, created_at, finished_at) "
                "VALUES (?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, key, status, cache_hit, leader, canonical_json(dict(options)), to_json(dict(inputs)),
                 onnx_sha256, int(onnx_bytes), filename, backend, backend_version, device,
                 None if check_report is None else to_json(check_report), log, now, finished),
            )
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row)

    def get(self, job_id: str) -> Job | None:
        if not is_job_id(job_id):
            return None
        row = self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return None if row is None else Job.from_row(row)

    def claim(self, job_id: str, *, owner: str | None = None, lease_s: float | None = None) -> Job | None:
        """``queued`` -> ``running`` for a build job (not a waiting duplicate), with a lease held by
        ``owner`` for ``lease_s`` seconds (the store's defaults when None); None if not claimable."""
        now = time.time()
        lease = self.lease_s if lease_s is None else float(lease_s)
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET status = 'running', started_at = ?, lease_owner = ?, lease_expires_at = ? "
                "WHERE id = ? AND status = 'queued' AND leader_id IS NULL",
                (now, owner or self.owner, now + lease, job_id))
            if cur.rowcount != 1:
                return None
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row)

    def succeed(self, job_id: str, artifact: ArtifactRecord, log: str, *, built: bool = True) -> bool:
        """Record the artifact, mark the job and every job waiting for it succeeded (one transaction).

        Returns False when the job was no longer active (its lease expired and it was failed
        meanwhile): the artifact is still recorded, it is complete; the job keeps its failure.
        """
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO artifacts (key, suffix, sha256, bytes, report, backend, backend_version, "
                "build_job_id, created_at, last_used_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (artifact.key, artifact.suffix, artifact.sha256, artifact.bytes, to_json(artifact.report),
                 artifact.backend, artifact.backend_version, artifact.build_job_id, artifact.created_at, now))
            cur = db.execute(
                "UPDATE jobs SET status = 'succeeded', built = ?, cache_hit = ?, error = NULL, log = ?, finished_at = ?, "
                "lease_expires_at = NULL WHERE id = ? AND status IN ('queued', 'running')",
                (1 if built else 0, 0 if built else 1, _clip_log(log), now, job_id))
            db.execute(
                "UPDATE jobs SET status = 'succeeded', cache_hit = 1, finished_at = ?, "
                "log = log || ? WHERE leader_id = ? AND status = 'queued'",
                (now, f"job {job_id} finished the build: succeeded\n", job_id))
        return cur.rowcount == 1

    def succeed_from_cache(self, job_id: str, artifact: ArtifactRecord, log: str) -> None:
        """A claimed build whose artifact appeared meanwhile: succeed without building."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET status = 'succeeded', built = 0, cache_hit = 1, leader_id = ?, log = ?, "
                "finished_at = ?, lease_expires_at = NULL WHERE id = ? AND status IN ('queued', 'running')",
                (artifact.build_job_id, _clip_log(log), now, job_id))
            db.execute("UPDATE artifacts SET last_used_at = ? WHERE key = ?", (now, artifact.key))
            db.execute(
                "UPDATE jobs SET status = 'succeeded', cache_hit = 1, finished_at = ?, log = log || ? "
                "WHERE leader_id = ? AND status = 'queued'",
                (now, f"job {job_id} found the artifact in the cache\n", job_id))

    def fail(self, job_id: str, error: str, log: str | None) -> bool:
        """Mark an active build failed, and every job waiting for it (one transaction).

        ``log=None`` keeps the stored log (a short write, for when the disk is full). Returns
        False when the job was already final (a late report after its lease expired).
        """
        with self._tx() as db:
            return self._fail_in(db, job_id, error, log, time.time())

    @staticmethod
    def _fail_in(db: sqlite3.Connection, job_id: str, error: str, log: str | None, now: float) -> bool:
        if log is None:
            cur = db.execute(
                "UPDATE jobs SET status = 'failed', error = ?, finished_at = ?, lease_expires_at = NULL "
                "WHERE id = ? AND status IN ('queued', 'running')", (error, now, job_id))
        else:
            cur = db.execute(
                "UPDATE jobs SET status = 'failed', error = ?, log = ?, finished_at = ?, lease_expires_at = NULL "
                "WHERE id = ? AND status IN ('queued', 'running')", (error, _clip_log(log), now, job_id))
        db.execute(
            "UPDATE jobs SET status = 'failed', error = ?, finished_at = ?, log = log || ? "
            "WHERE leader_id = ? AND status = 'queued'",
            (f"the identical build it waited for (job {job_id}) failed: {error}", now,
             f"job {job_id} finished the build: failed\n", job_id))
        return cur.rowcount == 1

    def renew_leases(self, job_ids: list[str] | set[str], owner: str, lease_s: float) -> set[str]:
        """Extend the leases ``owner`` holds on running ``job_ids``; returns the ids renewed."""
        ids = [job_id for job_id in job_ids if is_job_id(job_id)]
        if not ids:
            return set()
        until = time.time() + float(lease_s)
        renewed: set[str] = set()
        with self._tx() as db:
            for job_id in ids:
                cur = db.execute("UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND status = 'running' "
                                 "AND lease_owner = ?", (until, job_id, owner))
                if cur.rowcount == 1:
                    renewed.add(job_id)
        return renewed

    def expire_leases(self, now: float | None = None) -> list[str]:
        """Fail every running job whose lease ran out (or that has none: claimed by an older
        service), and the jobs waiting for it; returns their ids."""
        now = time.time() if now is None else now
        with self._tx() as db:
            rows = db.execute("SELECT id FROM jobs WHERE status = 'running' AND "
                              "(lease_expires_at IS NULL OR lease_expires_at < ?)", (now,)).fetchall()
            for row in rows:
                self._fail_in(db, row["id"], LEASE_EXPIRED_ERROR, None, now)
                db.execute("UPDATE jobs SET log = log || ? WHERE id = ?",
                           (f"[{iso_time(now)}] {LEASE_EXPIRED_ERROR}\n", row["id"]))
        return [row["id"] for row in rows]

    def recover(self) -> dict[str, int]:
        """Start-up: ``running`` -> ``failed`` (interrupted), then settle waiting duplicates.

        Returns counts: ``interrupted`` builds, ``settled`` waiting jobs, ``requeued`` builds
        still queued.
        """
        now = time.time()
        with self._tx() as db:
            interrupted = db.execute(
                "UPDATE jobs SET status = 'failed', error = ?, finished_at = ?, lease_expires_at = NULL, log = log || ? "
                "WHERE status = 'running'",
                (INTERRUPTED_ERROR, now, f"[{iso_time(now)}] {INTERRUPTED_ERROR}\n")).rowcount
            settled = 0
            waiting = db.execute("SELECT id, leader_id FROM jobs WHERE status = 'queued' AND leader_id IS NOT NULL").fetchall()
            for row in waiting:
                leader = db.execute("SELECT status, error FROM jobs WHERE id = ?", (row["leader_id"],)).fetchone()
                if leader is None or leader["status"] == "failed":
                    why = "it is gone" if leader is None else leader["error"]
                    db.execute("UPDATE jobs SET status = 'failed', error = ?, finished_at = ? WHERE id = ?",
                               (f"the identical build it waited for (job {row['leader_id']}) failed: {why}", now, row["id"]))
                    settled += 1
                elif leader["status"] == "succeeded":
                    db.execute("UPDATE jobs SET status = 'succeeded', cache_hit = 1, finished_at = ? WHERE id = ?",
                               (now, row["id"]))
                    settled += 1
            requeued = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND leader_id IS NULL").fetchone()[0]
        return {"interrupted": int(interrupted), "settled": settled, "requeued": int(requeued)}

    def queued_builds(self) -> list[str]:
        """Ids of queued build jobs (not waiting duplicates), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM jobs WHERE status = 'queued' AND leader_id IS NULL ORDER BY created_at").fetchall()
        return [row["id"] for row in rows]

    def counts(self) -> dict[str, int]:
        """Jobs per status, plus ``waiting`` (queued duplicates) and ``builds`` (jobs that built)."""
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
            waiting = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND leader_id IS NOT NULL").fetchone()[0]
            builds = self._db.execute("SELECT COUNT(*) FROM jobs WHERE built = 1").fetchone()[0]
        out = {status: 0 for status in STATUSES}
        out.update({row["status"]: int(row["n"]) for row in rows})
        out["waiting"] = int(waiting)
        out["builds"] = int(builds)
        return out

    # ------------------------------------------------------------------ artifacts

    def artifact(self, key: str) -> ArtifactRecord | None:
        if not is_key(key):
            return None
        row = self._one("SELECT * FROM artifacts WHERE key = ?", (key,))
        return None if row is None else ArtifactRecord.from_row(row)

    def artifacts(self) -> dict[str, str]:
        """Every published artifact: key -> suffix."""
        with self._lock:
            rows = self._db.execute("SELECT key, suffix FROM artifacts").fetchall()
        return {row["key"]: row["suffix"] for row in rows}

    def forget_artifact(self, key: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM artifacts WHERE key = ?", (key,))

    def touch_artifact(self, key: str, now: float | None = None) -> None:
        """Mark an artifact used (a download): eviction takes the least recently used first."""
        if is_key(key):
            with self._tx() as db:
                db.execute("UPDATE artifacts SET last_used_at = ? WHERE key = ?", (time.time() if now is None else now, key))

    def cache_bytes(self) -> int:
        """Total size of the published artifacts."""
        row = self._one("SELECT COALESCE(SUM(bytes), 0) FROM artifacts")
        return int(row[0]) if row is not None else 0

    def evict_artifacts(self, *, max_bytes: int | None, max_age_s: float | None, keep: set[str] | frozenset[str] = frozenset(),
                        now: float | None = None) -> list[tuple[str, str]]:
        """Delete the rows of the artifacts to evict (one transaction); returns their ``(key, suffix)``.

        Least recently used first (``last_used_at``, else ``created_at``): every artifact idle
        for more than ``max_age_s``, then more until the total is at most ``max_bytes`` (None:
        no limit). Never the keys in ``keep``, nor those of jobs still queued or running (a
        build about to find its artifact, duplicates about to be settled by it).
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            rows = db.execute("SELECT key, suffix, bytes, COALESCE(last_used_at, created_at) AS used FROM artifacts "
                              "ORDER BY used, created_at, key").fetchall()
            pinned = {row["key"] for row in db.execute("SELECT DISTINCT key FROM jobs WHERE status IN ('queued', 'running')")}
            victims = eviction_victims(rows, pinned | set(keep), now, max_age_s, max_bytes)
            for key, _ in victims:
                db.execute("DELETE FROM artifacts WHERE key = ?", (key,))
        return victims


def default_owner() -> str:
    """This process as a lease owner: host, pid and a random tag (pids are reused)."""
    import socket
    import uuid

    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: Path, chunk: int = 1 << 20) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` with ``src``'s bytes: a hard link (same volume), else a copy renamed into place."""
    try:
        os.link(src, dst)
    except OSError:
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


DEFAULT_CACHE_MAX_BYTES = 10 * 1024**3
DEFAULT_CACHE_MAX_AGE_S = 30 * 24 * 3600.0


class ArtifactStore:
    """The content-addressed artifact folder, the build scratch folders and the uploads.

    Args:
        workdir: the work folder (layout in the module docstring).
        cache_max_bytes: total size of published artifacts kept by :meth:`evict` (None: no limit).
        cache_max_age_s: artifacts unused for longer are evicted (None: no limit).
    """

    def __init__(self, workdir: str | os.PathLike[str], *, cache_max_bytes: int | None = DEFAULT_CACHE_MAX_BYTES,
                 cache_max_age_s: float | None = DEFAULT_CACHE_MAX_AGE_S) -> None:
        if cache_max_bytes is not None and cache_max_bytes < 0:
            raise ValueError(f"cache_max_bytes={cache_max_bytes} must be >= 0 or None")
        if cache_max_age_s is not None and cache_max_age_s < 0:
            raise ValueError(f"cache_max_age_s={cache_max_age_s} must be >= 0 or None")
        self.cache_max_bytes = cache_max_bytes
        self.cache_max_age_s = cache_max_age_s
        # publish and evict never interleave, so an eviction cannot unlink a file just re-published
        self._cache_lock = threading.Lock()
        self._served: dict[str, int] = {}
        self._served_lock = threading.Lock()
        self.workdir = Path(workdir)
        self.cache = self.workdir / "cache"
        self.tmp = self.workdir / "tmp"
        self.uploads = self.workdir / "uploads"
        self.timing = self.workdir / "timing"
        for folder in (self.cache, self.tmp, self.uploads, self.timing):
            folder.mkdir(parents=True, exist_ok=True)

    # paths are only ever derived from validated hex ids/keys and fixed suffixes
    def path_for(self, key: str, suffix: str) -> Path:
        if not is_key(key) or suffix not in ARTIFACT_SUFFIXES:
            raise ValueError("bad artifact key or suffix")
        return self.cache / key[:2] / f"{key}{suffix}"

    def upload_path(self, job_id: str) -> Path:
        if not is_job_id(job_id):
            raise ValueError("bad job id")
        return self.uploads / f"{job_id}.onnx"

    def scratch(self, job_id: str) -> Path:
        """A fresh, empty scratch folder for one build."""
        if not is_job_id(job_id):
            raise ValueError("bad job id")
        path = self.tmp / job_id
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def remove_scratch(self, job_id: str) -> None:
        if is_job_id(job_id):
            shutil.rmtree(self.tmp / job_id, ignore_errors=True)

    # --- what crosses nodes: uploads and artifacts. Here the (shared) folder itself; an object
    # store keeps them in a bucket instead (trtquant.service.object_store.S3ArtifactStore).

    def describe(self) -> str:
        """Where artifacts live, for logs (no credentials)."""
        return f"folder {self.workdir}"

    def share_upload(self, src: Path, job_id: str) -> None:
        """Make ``src`` (a received upload) readable by the worker that builds ``job_id``."""
        link_or_copy(src, self.upload_path(job_id))

    def fetch_upload(self, job_id: str) -> Path | None:
        """The local path of ``job_id``'s upload, or None when it is gone."""
        path = self.upload_path(job_id)
        return path if path.is_file() else None

    def drop_upload(self, job_id: str) -> None:
        """Delete ``job_id``'s upload (its build ended or will never read it)."""
        with contextlib.suppress(OSError, ValueError):
            self.upload_path(job_id).unlink(missing_ok=True)

    def sweep_shared_uploads(self, unneeded: Callable[[str], bool], min_age_s: float) -> list[str]:
        """Uploads kept outside this node's folder whose job ``unneeded`` says is over; none here
        (the folder's own sweep covers them)."""
        return []

    def local_copy(self, record: ArtifactRecord) -> Path:
        """A local file with the artifact's bytes to serve (FileNotFoundError when it is gone);
        hand it back with :meth:`release_local` once it is open."""
        path = self.path_for(record.key, record.suffix)
        if not path.is_file():
            raise FileNotFoundError(record.key)
        return path

    def release_local(self, path: Path) -> None:
        """Called once a :meth:`local_copy` is open; the cache folder keeps its file."""

    def discard(self, key: str, suffix: str) -> None:
        """Remove one published artifact's bytes (a corrupt file, or one no row will point at)."""
        with contextlib.suppress(OSError):
            self.path_for(key, suffix).unlink(missing_ok=True)

    def is_complete(self, record: ArtifactRecord) -> bool:
        """The published file exists with the recorded size."""
        try:
            return self.path_for(record.key, record.suffix).stat().st_size == record.bytes
        except (OSError, ValueError):
            return False

    def publish(self, key: str, src: Path, suffix: str) -> tuple[Path, str, int]:
        """Move a finished artifact from a scratch folder to its final path (fsync + ``os.replace``).

        Returns ``(final path, sha256, size)``. The final path never holds a partial file:
        the rename is atomic, and a cross-device source is first copied to a temp file in
        the destination folder.
        """
        final = self.path_for(key, suffix)
        final.parent.mkdir(parents=True, exist_ok=True)
        with open(src, "rb+") as handle:
            os.fsync(handle.fileno())
        sha, size = sha256_file(src)
        with self._cache_lock:
            try:
                os.replace(src, final)
            except OSError:  # different file system: copy beside the target, then rename
                tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
                try:
                    shutil.copyfile(src, tmp)
                    with open(tmp, "rb+") as handle:
                        os.fsync(handle.fileno())
                    os.replace(tmp, final)
                except BaseException:
                    tmp.unlink(missing_ok=True)  # a partial copy only fills the disk further
                    raise
            _fsync_dir(final.parent)
        return final, sha, size

    @contextlib.contextmanager
    def serving(self, key: str) -> Iterator[None]:
        """Pin ``key`` while its file is being sent: :meth:`evict` skips it."""
        with self._served_lock:
            self._served[key] = self._served.get(key, 0) + 1
        try:
            yield
        finally:
            with self._served_lock:
                count = self._served.pop(key, 1) - 1
                if count > 0:
                    self._served[key] = count

    def evict(self, index: JobStore, *, keep: set[str] | frozenset[str] = frozenset(),
              now: float | None = None) -> list[str]:
        """Evict by ``cache_max_bytes``/``cache_max_age_s`` (see :meth:`JobStore.evict_artifacts`);
        returns the keys evicted. Index rows go first (committed), then the files."""
        if self.cache_max_bytes is None and self.cache_max_age_s is None:
            return []
        with self._cache_lock:
            with self._served_lock:
                pinned = set(keep) | set(self._served)
            victims = index.evict_artifacts(max_bytes=self.cache_max_bytes, max_age_s=self.cache_max_age_s,
                                            keep=pinned, now=now)
            self._remove_evicted(victims)
        return [key for key, _ in victims]

    def _remove_evicted(self, victims: list[tuple[str, str]]) -> None:
        folders = set()
        for key, suffix in victims:
            path = self.path_for(key, suffix)
            with contextlib.suppress(OSError):  # left behind: reconcile removes row-less files at start-up
                path.unlink()
            folders.add(path.parent)
        for folder in folders:
            _fsync_dir(folder)

    def reconcile(self, published: Mapping[str, str], keep_uploads: set[str]) -> dict[str, Any]:
        """Start-up clean-up: wipe scratch, drop unpublished cache files and stale uploads.

        Args:
            published: artifact key -> suffix, from the database.
            keep_uploads: job ids whose upload is still needed (queued builds).

        Returns ``{"removed": [...relative paths], "missing": [keys whose file is gone]}``.
        """
        removed: list[str] = []
        for entry in list(self.tmp.iterdir()):
            removed.append(str(entry.relative_to(self.workdir)))
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        for entry in list(self.cache.rglob("*")):
            if entry.is_dir():
                continue
            name = entry.name
            key, _, rest = name.partition(".")
            suffix = "." + rest if rest else ""
            if not (is_key(key) and published.get(key) == suffix and entry.parent.name == key[:2]):
                entry.unlink(missing_ok=True)  # temp files, orphans of a crash, foreign files
                removed.append(str(entry.relative_to(self.workdir)))
        for entry in list(self.uploads.iterdir()):
            stem = entry.name[:-5] if entry.name.endswith(".onnx") else None
            if stem is None or stem not in keep_uploads:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(str(entry.relative_to(self.workdir)))
        missing = [key for key, suffix in published.items() if not self.path_for(key, suffix).is_file()]
        return {"removed": removed, "missing": missing}


def eviction_victims(rows: Any, protected: Any, now: float, max_age_s: float | None,
                     max_bytes: int | None) -> list[tuple[str, str]]:
    """(key, suffix) of the artifacts to evict, least recently used first: older than ``max_age_s``, or while the
    total is over ``max_bytes``; ``protected`` keys (referenced by queued/running jobs, or kept) never. ``rows``
    have key, suffix, bytes and used (last use time), in eviction order. One policy for both job stores."""
    total = sum(int(row["bytes"]) for row in rows)
    victims: list[tuple[str, str]] = []
    for row in rows:
        if row["key"] in protected:
            continue
        too_old = max_age_s is not None and now - float(row["used"]) > max_age_s
        too_big = max_bytes is not None and total > max_bytes
        if too_old or too_big:
            victims.append((row["key"], row["suffix"]))
            total -= int(row["bytes"])
    return victims
