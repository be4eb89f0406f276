"""The Postgres job store of scale-out mode against a real PostgreSQL (127.0.0.1:5432, user
postgres, or ``$TRTQUANT_TEST_PG_ADMIN_URL``): migrations under the advisory lock, dedup of
concurrent identical submissions through separate stores (= separate API nodes), waiters
settled with their leader, lease expiry requeueing then failing, kinds online, eviction.

Each test creates its own uniquely named database and drops it afterwards; without a
reachable server the tests skip, naming it. No mocks.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

psycopg = pytest.importorskip("psycopg", reason="scale-out tests need psycopg 3 (the 'service' extra)")
pytest.importorskip("pydantic")

from trtquant.service.pg_migrations import MIGRATIONS, applied_versions, migrate  # noqa: E402
from trtquant.service.pg_store import NO_WORKER_ERROR, PgJobStore  # noqa: E402
from trtquant.service.store import LEASE_EXPIRED_ERROR, ArtifactRecord, cache_key, new_job_id  # noqa: E402

ADMIN_URL = os.environ.get("TRTQUANT_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
SHA = "ef" * 32


def _admin() -> Any:
    try:
        return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL server not reachable at {ADMIN_URL} ({str(exc).splitlines()[0]})")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh database on the test server, dropped afterwards."""
    name = f"trtquant_test_{uuid.uuid4().hex[:12]}"
    with _admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with _admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def key_of(kind: str = "kind-a", options: dict[str, Any] | None = None) -> str:
    return cache_key(SHA, options or {"precision": "int8"}, "kind", "1", kind)


def new_job(store: PgJobStore, key: str, kind: str = "kind-a", **kw: Any):
    return store.create_job(
        job_id=kw.pop("job_id", None) or new_job_id(), key=key, options={"precision": "int8"},
        inputs={"input": [None, 3, 8, 8]}, onnx_sha256=SHA, onnx_bytes=123, filename="m.onnx", backend="onnxruntime",
        backend_version="1.20", device=kind, check_report={"ok": True},
        artifact_ok=kw.pop("artifact_ok", lambda record: True), kind=kind, **kw)


def record(key: str, build_job_id: str, size: int = 4) -> ArtifactRecord:
    return ArtifactRecord(key=key, suffix=".onnx", sha256="cd" * 32, bytes=size, backend="onnxruntime",
                          backend_version="1.20", build_job_id=build_job_id, created_at=time.time(), report={})


def test_migrations_apply_once_under_concurrent_starts(pg_url: str) -> None:
    stores: list[PgJobStore] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            stores.append(PgJobStore(pg_url, pool_size=1))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert applied_versions(conn) == {v for v, _, _ in MIGRATIONS}
        assert migrate(conn) == []  # nothing left to apply
        rows = conn.execute("SELECT version, COUNT(*) FROM schema_migrations GROUP BY version").fetchall()
    assert all(count == 1 for _, count in rows)
    for store in stores:
        store.close()


def test_concurrent_identical_submissions_from_two_nodes_make_one_build(pg_url: str) -> None:
    node_a, node_b = PgJobStore(pg_url), PgJobStore(pg_url)
    key = key_of()
    jobs: list[Any] = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def submit(store: PgJobStore) -> None:
        barrier.wait(10)
        job = new_job(store, key)
        with lock:
            jobs.append(job)

    threads = [threading.Thread(target=submit, args=(node_a if i % 2 else node_b,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    leaders = [j for j in jobs if j.leader_id is None]
    assert len(jobs) == 16 and len(leaders) == 1
    assert {j.leader_id for j in jobs if j.leader_id} == {leaders[0].id}
    # the leader builds; every waiter settles with it in the same transaction
    claimed = node_b.claim(leaders[0].id, owner="w1", lease_s=30, kind="kind-a")
    assert claimed is not None and claimed.status == "running"
    assert node_a.claim(leaders[0].id, owner="w2") is None  # a duplicate message is a no-op
    assert node_a.succeed(leaders[0].id, record(key, leaders[0].id), "built\n")
    statuses = {node_b.get(j.id).status for j in jobs}  # type: ignore[union-attr]
    assert statuses == {"succeeded"}
    assert node_a.counts()["builds"] == 1
    late = new_job(node_b, key)  # after the build: a cache hit
    assert late.status == "succeeded" and late.cache_hit and late.leader_id == leaders[0].id
    node_a.close()
    node_b.close()


def test_claim_only_for_the_workers_kind(pg_url: str) -> None:
    store = PgJobStore(pg_url)
    job = new_job(store, key_of("kind-b"), kind="kind-b")
    assert store.claim(job.id, owner="w", kind="kind-a") is None
    assert store.claim(job.id, owner="w", kind="kind-b") is not None
    store.close()


def test_expired_lease_requeues_then_fails_with_waiters(pg_url: str) -> None:
    store = PgJobStore(pg_url)
    key = key_of()
    leader = new_job(store, key)
    waiter = new_job(store, key)
    assert waiter.leader_id == leader.id
    for attempt in (1, 2):
        assert store.claim(leader.id, owner=f"dead-{attempt}", lease_s=0.05) is not None
        time.sleep(0.15)
        requeued, failed = store.requeue_expired(max_attempts=2) if attempt == 1 else ([], [])
        if attempt == 1:
            assert (requeued, failed) == ([leader.id], [])
            row = store.job_row(leader.id)
            assert row["status"] == "queued" and row["dispatched_at"] is None and row["attempts"] == 1
            assert store.undispatched(older_than_s=0, redispatch_after_s=3600) == [(leader.id, "kind-a")]
    assert store.requeue_expired(max_attempts=2) == ([], [leader.id])
    assert store.get(leader.id).error == LEASE_EXPIRED_ERROR  # type: ignore[union-attr]
    assert store.get(waiter.id).status == "failed"  # type: ignore[union-attr]
    store.close()


def test_live_lease_is_renewed_and_not_requeued(pg_url: str) -> None:
    store = PgJobStore(pg_url)
    job = new_job(store, key_of())
    store.claim(job.id, owner="w", lease_s=0.3)
    for _ in range(4):
        time.sleep(0.1)
        assert store.renew_leases({job.id}, "w", 0.3, logs={job.id: "live log\n"}) == {job.id}
        assert store.requeue_expired() == ([], [])
    assert store.renew_leases({job.id}, "someone-else", 0.3) == set()
    assert store.get(job.id).log == "live log\n"  # type: ignore[union-attr]
    store.close()


def test_kinds_online_and_no_worker(pg_url: str) -> None:
    store = PgJobStore(pg_url)
    store.register_worker("w-a1", "kind-a", {"backend": "onnxruntime"})
    store.register_worker("w-a2", "kind-a", {"backend": "onnxruntime"})
    store.register_worker("w-b", "kind-b", {"backend": "tensorrt"})
    online = store.kinds_online(ttl_s=10)
    assert {k: v["workers"] for k, v in online.items()} == {"kind-a": 2, "kind-b": 1}
    store.unregister_worker("w-b")
    assert set(store.kinds_online(ttl_s=10)) == {"kind-a"}
    offline = new_job(store, key_of("kind-c"), kind="kind-c", no_worker=True)
    assert offline.status == "failed" and offline.error == NO_WORKER_ERROR.format(kind="kind-c")
    stranded = new_job(store, key_of("kind-b"), kind="kind-b")
    time.sleep(0.05)
    assert store.fail_queued_without_worker({"kind-a"}, grace_s=0.0) == [stranded.id]
    assert store.get(stranded.id).error.startswith("no_worker")  # type: ignore[union-attr]
    store.close()


def test_eviction_keeps_artifacts_of_active_jobs(pg_url: str, tmp_path: Path) -> None:
    store = PgJobStore(pg_url)
    done, active = key_of("kind-a"), key_of("kind-b")
    first = new_job(store, done)
    store.claim(first.id, owner="w")
    store.succeed(first.id, record(done, first.id, size=100), "")
    second = new_job(store, active, kind="kind-b")
    store.claim(second.id, owner="w")
    store.succeed(second.id, record(active, second.id, size=100), "")
    new_job(store, active, kind="kind-b", artifact_ok=lambda record: False)  # rebuild queued: pins the key
    assert store.cache_bytes() == 100  # the row without a file was dropped, the other stays
    assert store.evict_artifacts(max_bytes=0, max_age_s=None) == [(done, ".onnx")]
    assert store.artifacts() == {}
    store.close()


def test_unreachable_database_fails_fast_with_a_named_error() -> None:
    from trtquant.service.pg_store import StoreUnavailable

    with pytest.raises(StoreUnavailable, match="job database is unreachable"):
        PgJobStore("postgresql://postgres@127.0.0.1:1/none", retry_s=0.3)


def test_connections_killed_by_the_server_are_replaced(pg_url: str) -> None:
    """What a Postgres restart looks like to a node: every pooled connection dies. The next
    operations reconnect on their own."""
    store = PgJobStore(pg_url, pool_size=4, retry_s=10)
    job = new_job(store, key_of())
    name = pg_url.rsplit("/", 1)[1]
    with _admin() as admin:
        killed = admin.execute("SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s "
                               "AND application_name = 'trtquant'", (name,)).fetchone()[0]
    assert killed >= 1
    assert store.get(job.id).status == "queued"  # type: ignore[union-attr]
    assert store.claim(job.id, owner="w") is not None
    store.close()


def test_both_stores_implement_the_store_interface(pg_url: str, tmp_path: Path) -> None:
    import inspect

    from trtquant.service.store import JobStore
    from trtquant.service.store_api import JobIndex

    sqlite_store, pg_store = JobStore(tmp_path / "jobs.db"), PgJobStore(pg_url)
    assert isinstance(sqlite_store, JobIndex) and isinstance(pg_store, JobIndex)
    for name, member in inspect.getmembers(JobIndex, inspect.isfunction):
        if name.startswith("_"):
            continue
        wanted = set(inspect.signature(member).parameters)
        for store in (sqlite_store, pg_store):
            have = set(inspect.signature(getattr(type(store), name)).parameters)
            assert wanted <= have, (type(store).__name__, name, wanted - have)
    sqlite_store.close()
    pg_store.close()


def test_sweep_removes_files_of_final_jobs_only(pg_url: str, tmp_path: Path) -> None:
    from trtquant.service.app import ServiceConfig
    from trtquant.service.scale_out import ScaleOut

    config = ServiceConfig(workdir=tmp_path, scale_out=True, database_url=pg_url, broker_url="redis://127.0.0.1:1/0")
    scale = ScaleOut(config)  # the broker is not contacted by a sweep
    done, queued = new_job(scale.store, key_of("kind-a")), new_job(scale.store, key_of("kind-b"), kind="kind-b")
    scale.store.claim(done.id, owner="w")
    scale.store.fail(done.id, "broken", "")
    old = time.time() - 3600
    paths = [scale.artifacts.upload_path(done.id), scale.artifacts.upload_path(queued.id),
             scale.artifacts.uploads / ".upload-0123.part", scale.artifacts.tmp / done.id]
    for path in paths[:3]:
        path.write_bytes(b"x")
    paths[3].mkdir()
    for path in paths:
        os.utime(path, (old, old))
    fresh = scale.artifacts.upload_path(new_job_id())
    fresh.write_bytes(b"x")  # too young to judge
    assert sorted(scale.sweep()) == sorted([f"{done.id}.onnx", ".upload-0123.part", done.id])
    assert paths[1].is_file() and fresh.is_file() and not paths[0].exists() and not paths[3].exists()
    scale.store.close()


def test_health_names_the_broker_that_is_down(pg_url: str, tmp_path: Path) -> None:
    from trtquant.service.app import ServiceConfig
    from trtquant.service.scale_out import ScaleOut

    config = ServiceConfig(workdir=tmp_path, scale_out=True, database_url=pg_url, broker_url="redis://127.0.0.1:1/0")
    scale = ScaleOut(config)
    scale.store.register_worker("w1", "kind-a", {"backend": "onnxruntime"})
    started = time.monotonic()
    status, body = scale.health()
    assert time.monotonic() - started < 15
    assert status == 503 and body["status"] == "degraded"
    assert body["checks"]["database"]["ok"] and not body["checks"]["broker"]["ok"]
    assert body["kinds"]["kind-a"]["workers"] == 1
    scale.store.close()


def test_json_log_lines_carry_the_job_id() -> None:
    import json
    import logging

    from trtquant.service.logs import JsonFormatter

    record = logging.LogRecord("trtquant.service", logging.WARNING, __file__, 1, "job %s requeued", ("j1",), None)
    record.job_id, record.kind = "j1", "kind-a"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "job j1 requeued" and line["job_id"] == "j1" and line["kind"] == "kind-a"
    assert line["level"] == "warning" and line["ts"].endswith("Z")
