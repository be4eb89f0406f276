"""Scale-out mode with artifacts and uploads in an S3-compatible object store instead of a
shared folder: the cluster of ``test_service_scale_out`` (two API nodes, three Celery workers
on PostgreSQL and Redis) started with ``--artifact-url s3://bucket/prefix`` against moto's
standalone S3 server (a real HTTP endpoint on a local port; the nodes find it through
``$AWS_ENDPOINT_URL`` as they would find MinIO or AWS). No node shares a folder with another.

* submissions through both nodes while a worker is SIGKILLed mid-build: every one succeeds,
  one build per (model, options, kind), the killed build is finished by the other worker;
* the bucket holds exactly one object per artifact row, each with the recorded sha256, no
  upload left behind, and no node keeps artifacts in its own folder;
* a corrupted object is caught by the sha256 check (503, object and row removed) and the next
  submission rebuilds it.

Without PostgreSQL, Redis or moto[server] the test skips, naming what is missing.
"""

from __future__ import annotations

import hashlib
import socket
import time
import uuid
from collections.abc import Iterator

import pytest
from test_service_scale_out import Cluster, _pg_admin, _redis_db, download, submit, wait_final

import httpx

boto3 = pytest.importorskip("boto3", reason="the object-store cluster needs boto3 (the 's3' extra)")
moto_server = pytest.importorskip("moto.server", reason="the object-store cluster needs moto[server] (the 'dev' extra)")
from _models import qdq_conv_onnx  # noqa: E402

S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


class S3:
    """moto's S3 server on a free local port with one bucket."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        self.server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                   aws_access_key_id="test", aws_secret_access_key="test")
        self.bucket = f"trtq-{uuid.uuid4().hex[:10]}"
        self.client.create_bucket(Bucket=self.bucket)

    def objects(self) -> dict[str, bytes]:
        names = [item["Key"] for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
                 for item in page.get("Contents", [])]
        return {name: self.client.get_object(Bucket=self.bucket, Key=name)["Body"].read() for name in names}


@pytest.fixture(scope="module")
def s3_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, S3]]:
    with _pg_admin():
        pass
    _redis_db()[0].close()
    s3 = S3()
    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3.endpoint}
    c = Cluster(tmp_path_factory.mktemp("scale-out-s3"), artifact_url=f"s3://{s3.bucket}/fleet", env=env)
    try:
        yield c.start(), s3
    finally:
        c.stop()
        s3.server.stop()


@pytest.fixture(scope="module")
def s3_models(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    root = tmp_path_factory.mktemp("s3-models")
    return [qdq_conv_onnx(root / f"m{c}.onnx", channels=c).read_bytes() for c in (4, 8, 12, 16)]


def test_object_store_cluster_survives_a_killed_worker_and_catches_corruption(
        s3_cluster: tuple[Cluster, S3], s3_models: list[bytes]) -> None:
    cluster, s3 = s3_cluster
    pairs = [(model, {"optimization_level": level}) for model in s3_models for level in (1, 3)]  # 8 distinct
    ids: list[str] = []
    killed_job = None
    for i in range(16):
        response = submit(cluster.api_urls[i % 2], *pairs[i % len(pairs)])
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
        if killed_job is None:  # a kind-a build under way: SIGKILL its worker
            rows = cluster.sql("SELECT id, lease_owner FROM jobs WHERE status = 'running' AND kind = 'kind-a'")
            if rows:
                killed_job, owner = rows[0]
                pid = int(owner.split(":")[1])
                next(w for w in cluster.workers if w.proc.pid == pid).kill()
    deadline = time.monotonic() + 20
    while killed_job is None and time.monotonic() < deadline:
        rows = cluster.sql("SELECT id, lease_owner FROM jobs WHERE status = 'running' AND kind = 'kind-a'")
        if rows:
            killed_job, owner = rows[0]
            next(w for w in cluster.workers if w.proc.pid == int(owner.split(":")[1])).kill()
        time.sleep(0.05)
    assert killed_job is not None, "no kind-a build started"
    views = wait_final(cluster.api_urls[0], ids, timeout=120)
    assert {v["status"] for v in views.values()} == {"succeeded"}, [v for v in views.values() if v["status"] != "succeeded"][:2]
    built = cluster.sql("SELECT key, kind, COUNT(*) FROM jobs WHERE built = 1 GROUP BY key, kind")
    assert len(built) == 16 and all(n == 1 for _, _, n in built)  # 8 pairs x 2 kinds, each built once
    status, attempts = cluster.sql("SELECT status, attempts FROM jobs WHERE id = %s", (killed_job,))[0]
    assert status == "succeeded" and attempts >= 2

    # every node downloads the same verified bytes; the bucket is the only copy
    for i in range(len(pairs)):
        data_a, sha_a = download(cluster.api_urls[0], ids[i], "kind-a")
        data_b, sha_b = download(cluster.api_urls[1], ids[i + len(pairs)], "kind-a")
        assert sha_a == sha_b and data_a == data_b
    rows = cluster.sql("SELECT key, suffix, sha256 FROM artifacts")
    stored = s3.objects()
    assert sorted(stored) == sorted(f"fleet/cache/{key[:2]}/{key}{suffix}" for key, suffix, _ in rows)
    for key, suffix, sha in rows:
        assert hashlib.sha256(stored[f"fleet/cache/{key[:2]}/{key}{suffix}"]).hexdigest() == sha
    assert not [p for p in cluster.root.rglob("cache/*/*") if p.is_file()]  # no node keeps an artifact itself

    # a corrupted object (same size, other bytes): caught before a byte is served, removed, rebuilt
    key, suffix, sha = rows[0]
    name = f"fleet/cache/{key[:2]}/{key}{suffix}"
    s3.client.put_object(Bucket=s3.bucket, Key=name, Body=bytes(b ^ 0xFF for b in stored[name]))
    index, kind = next((i, kind) for i in range(len(pairs)) for kind in ("kind-a", "kind-b")
                       if views[ids[i]]["kinds"][kind]["key"] == key)
    with httpx.Client(base_url=cluster.api_urls[1], timeout=30) as client:
        response = client.get(f"/v1/builds/{ids[index]}/artifact", params={"kind": kind})
    assert response.status_code == 503 and "sha256" in response.text, response.text
    assert cluster.sql("SELECT COUNT(*) FROM artifacts WHERE key = %s", (key,)) == [(0,)]
    assert name not in s3.objects()
    again = submit(cluster.api_urls[0], *pairs[index], kinds=kind)
    assert again.status_code == 202, again.text
    view = wait_final(cluster.api_urls[0], [again.json()["id"]], timeout=60)[again.json()["id"]]
    assert view["status"] == "succeeded" and not view["kinds"][kind]["cache_hit"]
    data, new_sha = download(cluster.api_urls[1], again.json()["id"], kind)
    assert new_sha == sha and hashlib.sha256(data).hexdigest() == sha  # the same deterministic build
    assert not [name for name in s3.objects() if "/uploads/" in name]  # every upload deleted after its build

