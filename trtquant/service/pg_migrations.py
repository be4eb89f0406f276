"""Versioned schema of the Postgres job store, applied at start-up under an advisory lock.

Each migration is (version, name, SQL) and runs once, in its own transaction, recorded in
``schema_migrations``. Every API node and worker calls :func:`migrate` when it starts; the
advisory lock makes the first one apply what is missing while the others wait, so nodes of
one release can start together. Migrations are only ever appended: never edit a shipped one.

The unique partial index ``jobs_one_build_per_key`` is what makes deduplication hold across
API nodes: at most one active (queued or running) build per cache key can exist, so two
nodes inserting the same build at once get one row and one waiter.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LOCK_ID", "MIGRATIONS", "applied_versions", "migrate"]

#: pg_advisory_lock key of the migration step ("trtq" in ASCII).
LOCK_ID = 0x74727471

MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "jobs, artifacts, submissions, workers", """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    submission_id TEXT,
    kind TEXT,
    key TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
    cache_hit INTEGER NOT NULL DEFAULT 0,
    built INTEGER NOT NULL DEFAULT 0,
    leader_id TEXT,
    options TEXT NOT NULL,
    inputs TEXT NOT NULL DEFAULT '{}',
    onnx_sha256 TEXT NOT NULL,
    onnx_bytes BIGINT NOT NULL,
    filename TEXT,
    backend TEXT NOT NULL,
    backend_version TEXT NOT NULL,
    device TEXT,
    check_report TEXT,
    error TEXT,
    log TEXT NOT NULL DEFAULT '',
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    lease_owner TEXT,
    lease_expires_at DOUBLE PRECISION,
    attempts INTEGER NOT NULL DEFAULT 0,
    dispatched_at DOUBLE PRECISION
);
CREATE UNIQUE INDEX jobs_one_build_per_key ON jobs (key)
    WHERE status IN ('queued', 'running') AND leader_id IS NULL;
CREATE INDEX jobs_leader ON jobs (leader_id) WHERE leader_id IS NOT NULL;
CREATE INDEX jobs_status_kind ON jobs (status, kind);
CREATE INDEX jobs_submission ON jobs (submission_id);
CREATE TABLE artifacts (
    key TEXT PRIMARY KEY,
    suffix TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    report TEXT NOT NULL DEFAULT '{}',
    backend TEXT NOT NULL,
    backend_version TEXT NOT NULL,
    build_job_id TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    last_used_at DOUBLE PRECISION
);
CREATE TABLE submissions (
    id TEXT PRIMARY KEY,
    requested TEXT NOT NULL,
    kinds TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    info TEXT NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL,
    current_job TEXT
);
CREATE INDEX workers_kind_seen ON workers (kind, last_seen);
"""),
]


def applied_versions(conn: Any) -> set[int]:
    rows = conn.execute("SELECT version FROM schema_migrations").fetchall()
    return {int(row["version"] if isinstance(row, dict) else row[0]) for row in rows}


def migrate(conn: Any) -> list[int]:
    """Apply the missing migrations on ``conn`` (a psycopg connection in autocommit mode);
    returns the versions applied by this call. Raises RuntimeError when the database was
    migrated by a newer trtquant (its schema is ahead of this code)."""
    conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_ID,))
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                     "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        have = applied_versions(conn)
        known = {version for version, _, _ in MIGRATIONS}
        ahead = sorted(have - known)
        if ahead:
            raise RuntimeError(f"the job database has schema migration(s) {ahead} that this trtquant does not know "
                               f"(it knows up to {max(known)}); upgrade trtquant on this node")
        done: list[int] = []
        for version, name, sql in MIGRATIONS:
            if version in have:
                continue
            with conn.transaction():
                conn.execute(sql)
                conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name))
            done.append(version)
        return done
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_ID,))
