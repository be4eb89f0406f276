"""Scale-out artifacts in an S3-compatible object store (``--artifact-url s3://...``), against
moto's standalone S3 server on a local port (a real HTTP endpoint driven through boto3, as
MinIO or AWS would be): atomic verified publish, downloads for serving, shared uploads,
eviction from the job store's index and the sweep of stale uploads."""

from __future__ import annotations

import hashlib
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pydantic")
boto3 = pytest.importorskip("boto3", reason="the object-store tests need boto3 (the 's3' extra)")
moto_server = pytest.importorskip("moto.server", reason="the object-store tests need moto[server] (the 'dev' extra)")

from trtquant.service.object_store import S3ArtifactStore, open_artifact_store, parse_artifact_url  # noqa: E402
from trtquant.service.store import ArtifactRecord, ArtifactStore, JobStore, cache_key, new_job_id  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                        aws_secret_access_key="test")


@pytest.fixture
def bucket(client: Any) -> Iterator[str]:
    name = f"trtq-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    yield name
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=item["Key"])
    client.delete_bucket(Bucket=name)


def key_of(tag: str) -> str:
    return cache_key("ab" * 32, {"precision": tag}, "onnxruntime", "1.20", "kind-a")


def record(key: str, sha: str, size: int) -> ArtifactRecord:
    return ArtifactRecord(key=key, suffix=".onnx", sha256=sha, bytes=size, backend="onnxruntime",
                          backend_version="1.20", build_job_id=new_job_id(), created_at=0.0, report={})


def objects(client: Any, bucket: str) -> list[str]:
    return sorted(item["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                  for item in page.get("Contents", []))


def test_artifact_url_is_parsed_and_bad_ones_name_the_flag() -> None:
    assert parse_artifact_url("s3://my-bucket") == ("my-bucket", "")
    assert parse_artifact_url("s3://my-bucket/team/a/") == ("my-bucket", "team/a/")
    for bad, why in (("/mnt/shared", "expected s3://"), ("gs://b/x", "expected s3://"),
                     ("s3://UPPER/x", "not a valid bucket"), ("s3://b", "not a valid bucket"),
                     ("s3://bucket/../x", "prefix"), ("s3://bucket/a b", "prefix")):
        with pytest.raises(ValueError, match="--artifact-url") as info:
            parse_artifact_url(bad)
        assert why in str(info.value)


def test_folder_store_without_url(tmp_path: Path) -> None:
    store = open_artifact_store(tmp_path, None, cache_max_bytes=None, cache_max_age_s=None)
    assert type(store) is ArtifactStore


def test_missing_bucket_fails_at_start_naming_it(tmp_path: Path, client: Any) -> None:
    with pytest.raises(RuntimeError, match=r"s3://no-such-bucket-here/x/ is not usable"):
        S3ArtifactStore("s3://no-such-bucket-here/x", tmp_path, client=client)


def test_publish_is_verified_and_served_from_a_private_copy(tmp_path: Path, client: Any, bucket: str) -> None:
    store = S3ArtifactStore(f"s3://{bucket}/fleet", tmp_path / "node", client=client)
    src = store.scratch(new_job_id()) / "model.onnx"
    payload = bytes(range(256)) * 40
    src.write_bytes(payload)
    key = key_of("int8")
    _, sha, size = store.publish(key, src, ".onnx")
    assert sha == hashlib.sha256(payload).hexdigest() and size == len(payload)
    name = f"fleet/cache/{key[:2]}/{key}.onnx"
    assert objects(client, bucket) == [name]
    head = client.head_object(Bucket=bucket, Key=name)
    assert head["Metadata"]["sha256"] == sha and head["ContentLength"] == size
    assert not list((tmp_path / "node" / "cache").rglob("*.onnx"))  # nothing kept on the node
    rec = record(key, sha, size)
    assert store.is_complete(rec) and not store.is_complete(record(key, sha, size + 1))
    copy = store.local_copy(rec)
    assert copy.read_bytes() == payload and copy.parent == store.tmp
    with open(copy, "rb") as handle:
        store.release_local(copy)  # removed once open; the open handle still reads it
        assert not copy.exists() and handle.read() == payload
    store.discard(key, ".onnx")
    assert objects(client, bucket) == [] and not store.is_complete(rec)
    with pytest.raises(FileNotFoundError):
        store.local_copy(rec)


def test_another_node_sees_the_upload_and_it_is_dropped(tmp_path: Path, client: Any, bucket: str) -> None:
    api = S3ArtifactStore(f"s3://{bucket}", tmp_path / "api", client=client)
    worker = S3ArtifactStore(f"s3://{bucket}", tmp_path / "worker", client=client)
    job_id = new_job_id()
    received = tmp_path / "received.onnx"
    received.write_bytes(b"onnx" * 100)
    api.share_upload(received, job_id)
    assert objects(client, bucket) == [f"uploads/{job_id}.onnx"]
    fetched = worker.fetch_upload(job_id)
    assert fetched is not None and fetched.read_bytes() == b"onnx" * 100 and fetched.parent == worker.uploads
    worker.drop_upload(job_id)
    assert objects(client, bucket) == [] and not fetched.exists()
    assert worker.fetch_upload(job_id) is None and worker.fetch_upload(new_job_id()) is None


def test_eviction_deletes_objects_chosen_by_the_index(tmp_path: Path, client: Any, bucket: str) -> None:
    index = JobStore(tmp_path / "jobs.db")
    try:
        store = S3ArtifactStore(f"s3://{bucket}/p", tmp_path / "node", client=client, cache_max_bytes=10,
                                cache_max_age_s=None)
        keys = [key_of(tag) for tag in ("a", "b", "c", "d")]
        for used, key in zip((100.0, 300.0, 200.0, 400.0), keys):
            src = store.scratch(new_job_id()) / "m.onnx"
            src.write_bytes(b"x" * 4)
            _, sha, size = store.publish(key, src, ".onnx")
            index.succeed(new_job_id(), record(key, sha, size), "")
            index.touch_artifact(key, now=used)
        with store.serving(keys[0]):  # pinned while served
            evicted = store.evict(index)
        assert evicted == [keys[2], keys[1]]  # least recently used first, down to <= 10 bytes, keys[0] pinned
        assert objects(client, bucket) == sorted(f"p/cache/{k[:2]}/{k}.onnx" for k in (keys[0], keys[3]))
        assert set(index.artifacts()) == {keys[0], keys[3]}
    finally:
        index.close()


def test_sweep_removes_stale_uploads_of_finished_jobs_only(tmp_path: Path, client: Any, bucket: str) -> None:
    store = S3ArtifactStore(f"s3://{bucket}", tmp_path / "node", client=client)
    src = tmp_path / "u.onnx"
    src.write_bytes(b"u")
    done, running = new_job_id(), new_job_id()
    for job_id in (done, running):
        store.share_upload(src, job_id)
    client.put_object(Bucket=bucket, Key="uploads/not-a-job.onnx", Body=b"?")
    leftover = store.tmp / ".serve-crashed.onnx"
    leftover.write_bytes(b"x")
    assert store.sweep_shared_uploads(lambda job_id: job_id == done, min_age_s=3600) == []  # too young
    time.sleep(1.1)
    removed = store.sweep_shared_uploads(lambda job_id: job_id == done, min_age_s=1.0)
    assert sorted(removed) == sorted([f"{done}.onnx", "not-a-job.onnx"])
    assert objects(client, bucket) == [f"uploads/{running}.onnx"] and not leftover.exists()


def test_the_option_is_refused_where_it_cannot_apply(tmp_path: Path) -> None:
    import argparse

    pytest.importorskip("fastapi")
    from trtquant.service.app import ServiceConfig, create_app
    from trtquant.service.worker import add_worker_arguments, resolve_worker_args

    with pytest.raises(ValueError, match="artifact_url .* is a scale-out option"):
        create_app(ServiceConfig(workdir=tmp_path, artifact_url="s3://some-bucket"))
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    common = ["--database-url", "postgresql://x/y", "--broker-url", "redis://x"]
    args = resolve_worker_args(parser.parse_args([*common, "--artifact-url", "s3://some-bucket/p"]))
    assert Path(args.shared_dir).is_dir()  # a node-local temporary work folder
    Path(args.shared_dir).rmdir()
    with pytest.raises(ValueError, match="--artifact-url 'gs://b'"):
        resolve_worker_args(parser.parse_args([*common, "--artifact-url", "gs://b"]))
    with pytest.raises(ValueError, match="--shared-dir or --artifact-url"):
        resolve_worker_args(parser.parse_args(common))
