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
    finished_at REAL
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
    created_at REAL NOT NULL
);
"""


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
    """Jobs and artifact records in one SQLite database (WAL mode, one locked connection)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
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
        """One write transaction (``BEGIN IMMEDIATE``) under the lock."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

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

    def claim(self, job_id: str) -> Job | None:
        """``queued`` -> ``running`` for a build job (not a waiting duplicate); None if not claimable."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET status = 'running', started_at = ? WHERE id = ? AND status = 'queued' AND leader_id IS NULL",
                (time.time(), job_id))
            if cur.rowcount != 1:
                return None
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row)

    def succeed(self, job_id: str, artifact: ArtifactRecord, log: str, *, built: bool = True) -> None:
        """Record the artifact, mark the job and every job waiting for it succeeded (one transaction)."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO artifacts (key, suffix, sha256, bytes, report, backend, backend_version, "
                "build_job_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (artifact.key, artifact.suffix, artifact.sha256, artifact.bytes, to_json(artifact.report),
                 artifact.backend, artifact.backend_version, artifact.build_job_id, artifact.created_at))
            db.execute(
                "UPDATE jobs SET status = 'succeeded', built = ?, cache_hit = ?, error = NULL, log = ?, finished_at = ? "
                "WHERE id = ?", (1 if built else 0, 0 if built else 1, _clip_log(log), now, job_id))
            db.execute(
                "UPDATE jobs SET status = 'succeeded', cache_hit = 1, finished_at = ?, "
                "log = log || ? WHERE leader_id = ? AND status = 'queued'",
                (now, f"job {job_id} finished the build: succeeded\n", job_id))

    def succeed_from_cache(self, job_id: str, artifact: ArtifactRecord, log: str) -> None:
        """A claimed build whose artifact appeared meanwhile: succeed without building."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET status = 'succeeded', built = 0, cache_hit = 1, leader_id = ?, log = ?, "
                "finished_at = ? WHERE id = ?", (artifact.build_job_id, _clip_log(log), now, job_id))
            db.execute(
                "UPDATE jobs SET status = 'succeeded', cache_hit = 1, finished_at = ?, log = log || ? "
                "WHERE leader_id = ? AND status = 'queued'",
                (now, f"job {job_id} found the artifact in the cache\n", job_id))

    def fail(self, job_id: str, error: str, log: str) -> None:
        """Mark a build failed, and every job waiting for it."""
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE jobs SET status = 'failed', error = ?, log = ?, finished_at = ? WHERE id = ?",
                       (error, _clip_log(log), now, job_id))
            db.execute(
                "UPDATE jobs SET status = 'failed', error = ?, finished_at = ?, log = log || ? "
                "WHERE leader_id = ? AND status = 'queued'",
                (f"the identical build it waited for (job {job_id}) failed: {error}", now,
                 f"job {job_id} finished the build: failed\n", job_id))

    def recover(self) -> dict[str, int]:
        """Start-up: ``running`` -> ``failed`` (interrupted), then settle waiting duplicates.

        Returns counts: ``interrupted`` builds, ``settled`` waiting jobs, ``requeued`` builds
        still queued.
        """
        now = time.time()
        with self._tx() as db:
            interrupted = db.execute(
                "UPDATE jobs SET status = 'failed', error = ?, finished_at = ?, log = log || ? WHERE status = 'running'",
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


class ArtifactStore:
    """The content-addressed artifact folder, the build scratch folders and the uploads."""

    def __init__(self, workdir: str | os.PathLike[str]) -> None:
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
        try:
            os.replace(src, final)
        except OSError:  # different file system: copy beside the target, then rename
            tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, final)
        _fsync_dir(final.parent)
        return final, sha, size

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
