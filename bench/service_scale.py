"""Scale-out build service: throughput and queue latency with 1, 2 and 3 workers, and the API
node's memory after 500 submissions.

Needs PostgreSQL (127.0.0.1:5432, user postgres) and Redis (127.0.0.1:6379); each run uses
its own database (dropped afterwards) and Redis key prefix (deleted afterwards). Builds use
the ONNX Runtime backend and sleep ``--delay`` seconds before publishing
(``TRTQUANT_SERVICE_TEST_BUILD_DELAY_S``), so the numbers measure the service (queueing,
dispatch, claim, publish), not the CPU.

For each worker count: one API node and N workers of one kind; ``--builds`` distinct models
submitted at once; throughput = builds / (last finish - first submission) in builds/minute;
queue latency = claim time - submission time (from Postgres), p50/p99. Then ``--rss-submissions``
submissions (10 distinct models, the rest identical copies: cache hits and waiters) to one
API node and its resident memory before and after (``VmRSS``).

    python bench/service_scale.py [--workers 1,2,3] [--builds 24] [--delay 1.0] [--rss-submissions 500] [--s3]

``--s3`` keeps artifacts and uploads in an S3-compatible bucket (``--artifact-url``) served by
moto's standalone S3 server on a local port (needs the ``s3`` and ``dev`` extras) instead of
the shared folder.

Prints one JSON object and a table; reports, never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import redis

PG_ADMIN = os.environ.get("TRTQUANT_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("TRTQUANT_TEST_REDIS_URL", "redis://127.0.0.1:6379")
KIND = "bench-a"


def qdq_model(channels: int, seed: int) -> bytes:
    """A tiny Q/DQ conv (input [N, C, 8, 8]); ``seed`` changes the weights, so the bytes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.1, (channels, channels, 3, 3)).astype(np.float32)
    w_scale = (np.abs(weight).reshape(channels, -1).max(axis=1) / 127).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.zeros(channels, np.float32), "b"),
             numpy_helper.from_array(np.array(1 / 32, np.float32), "xs"), numpy_helper.from_array(np.array(0, np.int8), "xz"),
             numpy_helper.from_array(w_scale, "ws"), numpy_helper.from_array(np.zeros(channels, np.int8), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("QuantizeLinear", ["w", "ws", "wz"], ["wq"], axis=0),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "b"], ["output"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, channels, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, channels, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


class ObjectStore:
    """moto's S3 server on a free local port with one bucket (the ``--s3`` variant)."""

    def __init__(self) -> None:
        import socket

        import boto3
        from moto.server import ThreadedMotoServer

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        self.env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                    "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
        self.bucket = f"trtq-bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                     aws_access_key_id="bench", aws_secret_access_key="bench").create_bucket(Bucket=self.bucket)


class Cluster:
    def __init__(self, workers: int, delay: float, root: Path, s3: ObjectStore | None = None) -> None:
        self.root, self.procs = root, []
        self.db = f"trtquant_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{self.db}"')
        self.db_url = f"{PG_ADMIN.rsplit('/', 1)[0]}/{self.db}"
        self.redis_db = 1 + uuid.uuid4().int % 15
        self.prefix = f"trtq-bench-{uuid.uuid4().hex[:8]}:"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRTQUANT_SERVICE_")}
        env["TRTQUANT_SERVICE_TEST_BUILD_DELAY_S"] = str(delay)
        where = ["--shared-dir", str(root / "shared")]
        if s3 is not None:
            env.update(s3.env)
            where = ["--artifact-url", f"s3://{s3.bucket}/{self.prefix.rstrip(':')}"]
        common = ["--database-url", self.db_url, "--broker-url", f"{REDIS}/{self.redis_db}", *where,
                  "--key-prefix", self.prefix]
        port_file = root / "api.port"
        self._start([sys.executable, "-m", "trtquant.service", "--scale-out", "--port", "0", "--port-file", str(port_file),
                     "--workdir", str(root / "api"), "--log-level", "warning", "--max-upload-mb", "8", *common], env, "api")
        for i in range(workers):
            self._start([sys.executable, "-m", "trtquant.service.worker", "--kind", KIND, "--backend", "onnxruntime",
                         "--log-level", "warning", *common], env, f"worker{i}")
        deadline = time.monotonic() + 180
        while not port_file.is_file():
            if time.monotonic() > deadline:
                raise RuntimeError("API node did not start: " + (root / "api.log").read_text()[-2000:])
            time.sleep(0.2)
        self.url = f"http://127.0.0.1:{port_file.read_text().strip()}"
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while client.get("/healthz").json().get("kinds", {}).get(KIND, {}).get("workers", 0) < workers:
                if time.monotonic() > deadline:
                    raise RuntimeError("workers did not come online")
                time.sleep(0.3)

    def _start(self, cmd: list[str], env: dict[str, str], name: str) -> None:
        log = open(self.root / f"{name}.log", "wb")
        self.procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))

    def api_rss_mib(self) -> float:
        status = Path(f"/proc/{self.procs[0][0].pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024

    def sql(self, query: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            return conn.execute(query).fetchall()

    def stop(self) -> None:
        for proc, log in self.procs:
            proc.terminate()
        for proc, log in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        client = redis.Redis.from_url(f"{REDIS}/{self.redis_db}")
        keys = list(client.scan_iter(match=f"{self.prefix}*"))
        if keys:
            client.delete(*keys)
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')


def submit(url: str, model: bytes) -> str:
    with httpx.Client(base_url=url, timeout=120) as client:
        response = client.post("/v1/builds", params={"kinds": KIND}, files={"file": ("m.onnx", model)})
    response.raise_for_status()
    return str(response.json()["id"])


def wait_all(url: str, ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=30) as client:
        pending = set(ids)
        while pending:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(pending)} submissions not final after {timeout} s")
            for sid in list(pending):
                if client.get(f"/v1/builds/{sid}").json()["status"] in ("succeeded", "failed"):
                    pending.discard(sid)
            time.sleep(0.2)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def throughput_run(workers: int, builds: int, delay: float, s3: ObjectStore | None = None) -> dict[str, Any]:
    models = [qdq_model(8, seed) for seed in range(builds)]
    with tempfile.TemporaryDirectory(prefix="trtq-bench-") as tmp:
        cluster = Cluster(workers, delay, Path(tmp), s3)
        try:
            started = time.time()
            with ThreadPoolExecutor(8) as pool:
                ids = list(pool.map(lambda m: submit(cluster.url, m), models))
            wait_all(cluster.url, ids, timeout=60 + builds * (delay + 2))
            rows = cluster.sql("SELECT created_at, started_at, finished_at, status FROM jobs WHERE built = 1")
            failed = cluster.sql("SELECT COUNT(*) FROM jobs WHERE status = 'failed'")[0][0]
        finally:
            cluster.stop()
    last = max(r[2] for r in rows)
    waits = [r[1] - r[0] for r in rows]
    return {"workers": workers, "builds": len(rows), "failed": int(failed), "wall_s": round(last - started, 2),
            "builds_per_min": round(len(rows) / (last - started) * 60, 1),
            "queue_latency_p50_s": round(pct(waits, 50), 3), "queue_latency_p99_s": round(pct(waits, 99), 3),
            "build_time_p50_s": round(statistics.median(r[2] - r[1] for r in rows), 3)}


def rss_run(submissions: int, delay: float, s3: ObjectStore | None = None) -> dict[str, Any]:
    distinct = [qdq_model(8, 1000 + i) for i in range(10)]
    with tempfile.TemporaryDirectory(prefix="trtq-bench-") as tmp:
        cluster = Cluster(2, delay, Path(tmp), s3)
        try:
            before = cluster.api_rss_mib()
            started = time.time()
            with ThreadPoolExecutor(8) as pool:
                ids = list(pool.map(lambda i: submit(cluster.url, distinct[i % 10]), range(submissions)))
            submit_s = time.time() - started
            wait_all(cluster.url, ids, timeout=300)
            after = cluster.api_rss_mib()
            builds = cluster.sql("SELECT COUNT(*) FROM jobs WHERE built = 1")[0][0]
        finally:
            cluster.stop()
    return {"submissions": submissions, "builds": int(builds), "submit_wall_s": round(submit_s, 2),
            "submissions_per_s": round(submissions / submit_s, 1), "api_rss_before_mib": round(before, 1),
            "api_rss_after_mib": round(after, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,3")
    ap.add_argument("--builds", type=int, default=24)
    ap.add_argument("--delay", type=float, default=1.0)
    ap.add_argument("--rss-submissions", type=int, default=500)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--s3", action="store_true", help="artifacts in an S3 bucket (moto's server) instead of a folder")
    args = ap.parse_args()
    s3 = ObjectStore() if args.s3 else None
    try:
        runs = [throughput_run(int(n), args.builds, args.delay, s3) for n in args.workers.split(",")]
        rss = rss_run(args.rss_submissions, args.delay, s3) if args.rss_submissions > 0 else None
    finally:
        if s3 is not None:
            s3.server.stop()
    result = {"bench": "service_scale", "artifacts": "s3 (moto server)" if s3 else "shared folder",
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
              "build_delay_s": args.delay, "runs": runs, "rss": rss}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{'workers':>7} {'builds':>6} {'builds/min':>10} {'queue p50 s':>11} {'queue p99 s':>11} {'build p50 s':>11}")
    for r in runs:
        print(f"{r['workers']:>7} {r['builds']:>6} {r['builds_per_min']:>10} {r['queue_latency_p50_s']:>11} "
              f"{r['queue_latency_p99_s']:>11} {r['build_time_p50_s']:>11}")
    if rss:
        print(f"\nAPI RSS: {rss['api_rss_before_mib']} MiB before, {rss['api_rss_after_mib']} MiB after "
              f"{rss['submissions']} submissions ({rss['builds']} builds, {rss['submissions_per_s']} submissions/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
