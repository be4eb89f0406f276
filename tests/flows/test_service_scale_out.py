"""Scale-out mode end to end with real servers: two API nodes (uvicorn) and three Celery build
workers (two of kind ``kind-a``, one of ``kind-b``; ONNX Runtime stands in for TensorRT and
``--kind`` overrides the advertised kind) on PostgreSQL 127.0.0.1:5432 and Redis
127.0.0.1:6379 (``$TRTQUANT_TEST_PG_ADMIN_URL`` / ``$TRTQUANT_TEST_REDIS_URL`` to point
elsewhere).

The cluster gets its own database (created, dropped afterwards), its own Redis database
number and key prefix (keys deleted afterwards) and its own shared folder. Builds sleep
``TRTQUANT_SERVICE_TEST_BUILD_DELAY_S`` before publishing so builds, not the CPU, dominate.

* 50 concurrent submissions (10 distinct (model, options) pairs, 5 copies each, both kinds)
  through both nodes: every one accepted, one build per distinct (model, options, kind), no
  failed job, no 5xx, copies served the same (sha256-verified) artifact; a kind with no
  worker is reported ``no_worker``; ``/metrics`` and ``/healthz`` tell the same story.
* faults during load: a ``kind-a`` worker SIGKILLed mid-build (its build is requeued when its
  lease runs out and finished by the other ``kind-a`` worker) and an API node SIGKILLed while
  submissions arrive: every acknowledged submission reaches a final state, succeeded, none
  stuck, every artifact's sha256 verifies.

Without a reachable server the tests skip, naming it. No mocks.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from _models import qdq_conv_onnx

httpx = pytest.importorskip("httpx", reason="the service tests need the 'service' extra (httpx)")
psycopg = pytest.importorskip("psycopg", reason="scale-out tests need psycopg 3 (the 'service' extra)")
redis = pytest.importorskip("redis", reason="scale-out tests need redis-py (celery[redis], the 'service' extra)")
pytest.importorskip("celery", reason="scale-out tests need Celery (the 'service' extra)")
pytest.importorskip("onnxruntime")

PG_ADMIN = os.environ.get("TRTQUANT_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("TRTQUANT_TEST_REDIS_URL", "redis://127.0.0.1:6379")
DELAY_S = 0.6
LEASE_S = 3.0
FINAL = ("succeeded", "failed")


def _pg_admin() -> Any:
    try:
        return psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL server not reachable at {PG_ADMIN} ({str(exc).splitlines()[0]})")


def _redis_db() -> tuple[Any, int]:
    """A Redis client on a database number chosen at random (1-15) and that number."""
    number = 1 + uuid.uuid4().int % 15
    try:
        client = redis.Redis.from_url(f"{REDIS}/{number}", socket_connect_timeout=3)
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis server not reachable at {REDIS} ({exc})")
    return client, number


class Proc:
    """A service process with its log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], logdir: Path) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


class Cluster:
    """Two API nodes and three workers on one test database, Redis db and shared folder."""

    def __init__(self, root: Path, artifact_url: str | None = None, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.artifact_url = artifact_url
        self.shared = root / "shared"
        self.shared.mkdir(parents=True)
        self.db_name = f"trtquant_scale_{uuid.uuid4().hex[:12]}"
        with _pg_admin() as admin:
            admin.execute(f'CREATE DATABASE "{self.db_name}"')
        self.db_url = f"{PG_ADMIN.rsplit('/', 1)[0]}/{self.db_name}"
        self.redis, number = _redis_db()
        self.broker = f"{REDIS}/{number}"
        self.prefix = f"trtq-test-{uuid.uuid4().hex[:8]}:"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TRTQUANT_SERVICE_")}
        self.env["TRTQUANT_SERVICE_TEST_BUILD_DELAY_S"] = str(DELAY_S)
        self.env.update(env or {})
        self.apis: list[Proc] = []
        self.api_urls: list[str] = []
        self.workers: list[Proc] = []

    def common(self) -> list[str]:
        where = ["--artifact-url", self.artifact_url] if self.artifact_url else ["--shared-dir", str(self.shared)]
        return ["--database-url", self.db_url, "--broker-url", self.broker, *where,
                "--key-prefix", self.prefix, "--lease-s", str(LEASE_S)]

    def start(self) -> Cluster:
        for index in range(2):
            port_file = self.root / f"api{index}.port"
            cmd = [sys.executable, "-m", "trtquant.service", "--scale-out", "--host", "127.0.0.1", "--port", "0",
                   "--port-file", str(port_file), "--workdir", str(self.root / f"api{index}"), "--backend",
                   "onnxruntime", "--log-level", "warning", "--watchdog-s", "0.5", "--worker-ttl-s", "5",
                   "--no-worker-grace-s", "30", *self.common()]
            self.apis.append(Proc(f"api{index}", cmd, self.env, self.root))
        for index, kind in enumerate(("kind-a", "kind-a", "kind-b")):
            cmd = [sys.executable, "-m", "trtquant.service.worker", "--kind", kind, "--backend", "onnxruntime",
                   "--heartbeat-s", "0.5", "--pool", "solo", "--log-level", "warning", *self.common()]
            self.workers.append(Proc(f"worker{index}-{kind}", cmd, self.env, self.root))
        deadline = time.monotonic() + 120
        for index, api in enumerate(self.apis):
            port_file = self.root / f"api{index}.port"
            while not port_file.is_file():
                if api.proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{api.name} did not start:\n{api.log()}")
                time.sleep(0.2)
            self.api_urls.append(f"http://127.0.0.1:{port_file.read_text().strip()}")
        with httpx.Client(base_url=self.api_urls[0], timeout=10) as client:
            while True:
                health = client.get("/healthz")
                kinds = health.json().get("kinds", {}) if health.status_code == 200 else {}
                if kinds.get("kind-a", {}).get("workers") == 2 and kinds.get("kind-b", {}).get("workers") == 1:
                    break
                dead = [w for w in self.workers if w.proc.poll() is not None]
                if dead or time.monotonic() > deadline:
                    pytest.fail(f"workers not online ({health.text}):\n" + "\n".join(w.log() for w in self.workers))
                time.sleep(0.3)
        return self

    def sql(self, query: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            return conn.execute(query, args).fetchall()

    def stop(self) -> None:
        for proc in [*self.apis, *self.workers]:
            proc.stop()
        keys = list(self.redis.scan_iter(match=f"{self.prefix}*", count=1000))  # queues, bindings, unacked
        if keys:
            self.redis.delete(*keys)
        self.redis.close()
        with _pg_admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with _pg_admin():
        pass
    _redis_db()[0].close()
    c = Cluster(tmp_path_factory.mktemp("scale-out"))
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    root = tmp_path_factory.mktemp("scale-models")
    return [qdq_conv_onnx(root / f"m{c}.onnx", channels=c).read_bytes() for c in (4, 8, 12, 16, 20)]


def submit(url: str, model: bytes, options: dict[str, Any], kinds: str = "kind-a,kind-b") -> httpx.Response:
    with httpx.Client(base_url=url, timeout=60) as client:
        return client.post("/v1/builds", params={"kinds": kinds}, data={"options": json.dumps(options)},
                           files={"file": ("m.onnx", model, "application/octet-stream")})


def wait_final(url: str, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    views: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=url, timeout=30) as client:
        pending = list(ids)
        while pending and time.monotonic() < deadline:
            for sid in list(pending):
                response = client.get(f"/v1/builds/{sid}")
                assert response.status_code == 200, response.text
                view = response.json()
                if view["status"] in FINAL:
                    views[sid] = view
                    pending.remove(sid)
            if pending:
                time.sleep(0.3)
    stuck = {sid: client_view for sid, client_view in views.items() if client_view["status"] not in FINAL}
    assert not pending and not stuck, f"not final after {timeout} s: {pending}"
    return views


def download(url: str, sid: str, kind: str) -> tuple[bytes, str]:
    with httpx.Client(base_url=url, timeout=30) as client:
        response = client.get(f"/v1/builds/{sid}/artifact", params={"kind": kind})
    assert response.status_code == 200, response.text
    assert hashlib.sha256(response.content).hexdigest() == response.headers["x-artifact-sha256"]
    return response.content, response.headers["x-artifact-sha256"]


def test_fifty_concurrent_submissions_two_nodes_three_workers(cluster: Cluster, models: list[bytes]) -> None:
    pairs = [(model, {"optimization_level": level}) for model in models for level in (1, 2)]  # 10 distinct
    work = [(cluster.api_urls[i % 2], *pairs[i % len(pairs)]) for i in range(50)]
    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda w: submit(*w), work))
    assert [r.status_code for r in responses] == [202] * 50, [r.text for r in responses if r.status_code != 202][:3]
    ids = [r.json()["id"] for r in responses]
    views = wait_final(cluster.api_urls[0], ids, timeout=90)
    elapsed = time.monotonic() - started
    assert {v["status"] for v in views.values()} == {"succeeded"}, [v for v in views.values() if v["status"] != "succeeded"][:2]
    # one build per distinct (model, options, kind): 10 pairs x 2 kinds
    built = cluster.sql("SELECT key, kind, COUNT(*) FROM jobs WHERE built = 1 GROUP BY key, kind")
    assert len(built) == 20 and all(n == 1 for _, _, n in built)
    assert sorted(k for _, k, _ in built) == ["kind-a"] * 10 + ["kind-b"] * 10
    assert cluster.sql("SELECT COUNT(*) FROM jobs WHERE status <> 'succeeded'") == [(0,)]
    # kind-b has one worker: its 10 builds ran one after another
    assert elapsed >= 10 * DELAY_S
    # identical submissions: the same artifact per kind, served verified by either node
    by_pair: dict[tuple[int, str], set[str]] = {}
    for i, sid in enumerate(ids):
        for kind in ("kind-a", "kind-b"):
            by_pair.setdefault((i % len(pairs), kind), set()).add(views[sid]["kinds"][kind]["artifact"]["sha256"])
    assert len(by_pair) == 20 and all(len(shas) == 1 for shas in by_pair.values())
    for i in range(len(pairs)):
        data_a, sha_a = download(cluster.api_urls[i % 2], ids[i], "kind-a")
        data_b, sha_b = download(cluster.api_urls[(i + 1) % 2], ids[i + len(pairs)], "kind-a")
        assert sha_a == sha_b and data_a == data_b
    # a kind without any worker is reported at once, the online kind is served from the cache
    response = submit(cluster.api_urls[1], *pairs[0], kinds="kind-a,kind-zz")
    assert response.status_code == 202
    body = response.json()
    assert body["kinds"]["kind-zz"]["state"] == "no_worker" and body["kinds"]["kind-a"]["state"] == "succeeded"
    # operations: health and metrics agree with the database
    with httpx.Client(base_url=cluster.api_urls[1], timeout=10) as client:
        health = client.get("/healthz")
        metrics = client.get("/metrics").text
    assert health.status_code == 200 and health.json()["checks"]["broker"]["ok"] and health.json()["checks"]["database"]["ok"]
    assert 'trtquant_builds_total{kind="kind-a"} 10.0' in metrics
    assert 'trtquant_queue_depth{kind="kind-b"} 0.0' in metrics
    assert 'trtquant_workers_online{kind="kind-a"} 2.0' in metrics
    assert 'trtquant_build_duration_seconds_count{kind="kind-b"} 10.0' in metrics
    hits = [line for line in metrics.splitlines() if line.startswith('trtquant_cache_hits_total{kind="kind-a"}')]
    assert hits and float(hits[0].split()[-1]) == 41.0  # 40 copies + the no_worker probe


def test_worker_and_api_node_killed_during_load(cluster: Cluster, models: list[bytes]) -> None:
    pairs = [(model, {"optimization_level": level}) for model in models for level in (4, 5)]  # 10 new builds/kind
    survivor, doomed = cluster.api_urls
    acknowledged: list[str] = []
    refused: list[str] = []
    counter = itertools.count()
    stop = threading.Event()

    def load() -> None:  # submissions alternate between the nodes until told to stop
        while not stop.is_set():
            i = next(counter)
            try:
                response = submit(survivor if i % 2 == 0 else doomed, *pairs[i % len(pairs)])
            except httpx.TransportError as exc:  # the node was killed: never acknowledged
                refused.append(type(exc).__name__)
                time.sleep(0.05)
                continue
            assert response.status_code == 202, response.text
            acknowledged.append(response.json()["id"])
            time.sleep(0.1)

    killed_job = None
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(load) for _ in range(4)]
        try:
            deadline = time.monotonic() + 30
            while killed_job is None and time.monotonic() < deadline:  # a kind-a build mid-way: kill its worker
                rows = cluster.sql("SELECT id, lease_owner FROM jobs WHERE status = 'running' AND kind = 'kind-a' "
                                   "AND started_at < extract(epoch from clock_timestamp()) - 0.2")
                if rows:
                    killed_job, owner = rows[0]
                    pid = int(owner.split(":")[1])
                    next(w for w in cluster.workers if w.proc.pid == pid).kill()
                else:
                    time.sleep(0.05)
            assert killed_job is not None, "no kind-a build started"
            while len(acknowledged) < 16 and time.monotonic() < deadline:
                time.sleep(0.05)
            cluster.apis[1].kill()  # the second node dies while submissions keep arriving
            time.sleep(1.0)
        finally:
            stop.set()
        for future in futures:
            future.result()
    assert acknowledged and refused, (len(acknowledged), refused)
    views = wait_final(survivor, acknowledged, timeout=90)
    assert {v["status"] for v in views.values()} == {"succeeded"}, [v for v in views.values() if v["status"] != "succeeded"][:2]
    # the killed build was requeued after its lease and finished by the other kind-a worker
    status, attempts, owner = cluster.sql("SELECT status, attempts, lease_owner FROM jobs WHERE id = %s", (killed_job,))[0]
    assert status == "succeeded" and attempts >= 2, (status, attempts)
    # nothing stuck, nothing built twice, every artifact intact
    assert cluster.sql("SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')") == [(0,)]
    assert all(n <= 1 for (n,) in cluster.sql("SELECT COUNT(*) FROM jobs WHERE built = 1 GROUP BY key"))
    for sid in acknowledged:
        for kind in ("kind-a", "kind-b"):
            data, sha = download(survivor, sid, kind)
            assert len(data) > 0 and sha == views[sid]["kinds"][kind]["artifact"]["sha256"]
    for key, suffix, sha in cluster.sql("SELECT key, suffix, sha256 FROM artifacts"):  # the shared folder itself
        assert hashlib.sha256((cluster.shared / "cache" / key[:2] / f"{key}{suffix}").read_bytes()).hexdigest() == sha
    assert not list((cluster.shared / "cache").rglob("*.tmp"))  # no half-written file left behind


def test_database_and_broker_connections_dropped(cluster: Cluster, models: list[bytes]) -> None:
    """What a Postgres or Redis restart does to the nodes: every connection of this cluster is
    cut (server side) while builds are queued; API node and workers reconnect on their own."""
    survivor = cluster.api_urls[0]
    pairs = [(model, {"optimization_level": 0}) for model in models[:3]]
    first = [submit(survivor, *pair) for pair in pairs]
    assert [r.status_code for r in first] == [202] * 3
    time.sleep(0.5)
    with _pg_admin() as admin:
        cut = admin.execute("SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s "
                            "AND pid <> pg_backend_pid()", (cluster.db_name,)).fetchone()[0]
    db = int(cluster.broker.rsplit("/", 1)[1])
    ours = [line for line in cluster.redis.client_list() if int(line.get("db", -1)) == db
            and line.get("id") != str(cluster.redis.client_id())]
    for client in ours:
        cluster.redis.client_kill_filter(_id=client["id"])
    assert cut >= 1 and ours
    second = [submit(survivor, model, {"optimization_level": 0}, kinds="kind-b") for model in models[3:]]
    assert [r.status_code for r in second] == [202] * 2, [r.text for r in second]
    views = wait_final(survivor, [r.json()["id"] for r in first + second], timeout=60)
    assert {v["status"] for v in views.values()} == {"succeeded"}
    with httpx.Client(base_url=survivor, timeout=10) as client:
        assert client.get("/healthz").status_code == 200
