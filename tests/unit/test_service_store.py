"""The build service's persistence without a server: SQLite job store (dedupe, restart
recovery, WAL), the content-addressed artifact folder, cache keys, build options and the
TensorRT option mapping."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pydantic")

from trtquant.service.backends import trt_build_kwargs  # noqa: E402
from trtquant.service.jobs import BuildOptions, check_shapes  # noqa: E402
from trtquant.service.store import (  # noqa: E402
    INTERRUPTED_ERROR,
    ArtifactRecord,
    ArtifactStore,
    JobStore,
    cache_key,
    canonical_json,
    new_job_id,
)

SHA = "ab" * 32


def key_of(options: dict[str, Any] | None = None, **kw: Any) -> str:
    args = {"onnx_sha256": SHA, "options": options or {"precision": "int8"}, "backend": "onnxruntime",
            "backend_version": "1.20.0", "device": "cpu"}
    args.update(kw)
    return cache_key(args["onnx_sha256"], args["options"], args["backend"], args["backend_version"], args["device"])


def new_job(store: JobStore, key: str, artifact_ok: Any = lambda record: True, job_id: str | None = None):
    return store.create_job(
        job_id=job_id or new_job_id(), key=key, options={"precision": "int8"}, inputs={"input": [None, 3, 8, 8]},
        onnx_sha256=SHA, onnx_bytes=123, filename="m.onnx", backend="onnxruntime", backend_version="1.20.0",
        device="cpu", check_report={"ok": True}, artifact_ok=artifact_ok)


def record(key: str, build_job_id: str, size: int = 4) -> ArtifactRecord:
    return ArtifactRecord(key=key, suffix=".onnx", sha256="cd" * 32, bytes=size, backend="onnxruntime",
                          backend_version="1.20.0", build_job_id=build_job_id, created_at=0.0, report={"layers": None})


@pytest.fixture
def store(tmp_path: Path):
    s = JobStore(tmp_path / "db" / "jobs.db")
    yield s
    s.close()


# --------------------------------------------------------------------------- cache keys


def test_cache_key_is_canonical_and_covers_every_input() -> None:
    base = key_of({"precision": "int8", "target": "trt10"})
    assert base == key_of({"target": "trt10", "precision": "int8"})  # key order does not matter
    assert len(base) == 64 and int(base, 16) >= 0
    assert canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'
    others = [
        key_of({"precision": "fp16", "target": "trt10"}),
        key_of({"precision": "int8", "target": "trt10"}, onnx_sha256="cd" * 32),
        key_of({"precision": "int8", "target": "trt10"}, backend="tensorrt"),
        key_of({"precision": "int8", "target": "trt10"}, backend_version="1.21.0"),
        key_of({"precision": "int8", "target": "trt10"}, device="NVIDIA H100 (sm 9.0)"),
    ]
    assert len({base, *others}) == 6


# --------------------------------------------------------------------------- job store


def test_database_is_wal(store: JobStore, tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "db" / "jobs.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_identical_jobs_wait_for_one_build_and_settle_with_it(store: JobStore) -> None:
    key, other = key_of(), key_of({"precision": "fp16"})
    leader = new_job(store, key)
    assert (leader.status, leader.cache_hit, leader.leader_id) == ("queued", False, None)
    follower = new_job(store, key)
    assert (follower.status, follower.cache_hit, follower.leader_id) == ("queued", True, leader.id)
    distinct = new_job(store, other)
    assert distinct.leader_id is None
    assert store.queued_builds() == [leader.id, distinct.id]  # the follower never reaches a worker

    assert store.claim(follower.id) is None
    claimed = store.claim(leader.id)
    assert claimed is not None and claimed.status == "running" and claimed.started_at is not None
    assert store.claim(leader.id) is None  # claimed once
    late = new_job(store, key)  # arrives while the build runs: waits too
    assert late.leader_id == leader.id

    store.succeed(leader.id, record(key, leader.id), "log text")
    done = store.get(leader.id)
    assert done.status == "succeeded" and done.built and not done.cache_hit and done.log == "log text"
    for job_id in (follower.id, late.id):
        job = store.get(job_id)
        assert job.status == "succeeded" and job.cache_hit and not job.built and job.finished_at is not None
    hit = new_job(store, key)  # after publication: answered from the cache at once
    assert (hit.status, hit.cache_hit, hit.leader_id) == ("succeeded", True, leader.id)
    counts = store.counts()
    assert counts["builds"] == 1 and counts["succeeded"] == 4 and counts["queued"] == 1

    missing = new_job(store, key, artifact_ok=lambda rec: False)  # the file is gone: rebuild
    assert missing.status == "queued" and missing.leader_id is None and store.artifact(key) is None


def test_failed_build_fails_its_waiters_and_is_not_cached(store: JobStore) -> None:
    key = key_of()
    leader = new_job(store, key)
    follower = new_job(store, key)
    store.claim(leader.id)
    store.fail(leader.id, "RuntimeError: boom", "trace")
    assert store.get(leader.id).error == "RuntimeError: boom"
    waited = store.get(follower.id)
    assert waited.status == "failed" and leader.id in waited.error and "boom" in waited.error
    retry = new_job(store, key)
    assert retry.status == "queued" and retry.leader_id is None and not retry.cache_hit


def test_recover_fails_running_keeps_queued(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    store = JobStore(path)
    running, queued = key_of(), key_of({"precision": "fp16"})
    crashed = new_job(store, running)
    waiter = new_job(store, running)
    pending = new_job(store, queued)
    pending_waiter = new_job(store, queued)
    store.claim(crashed.id)
    store.close()  # the process "dies" with a running build

    reopened = JobStore(path)
    try:
        assert reopened.recover() == {"interrupted": 1, "settled": 1, "requeued": 1}
        job = reopened.get(crashed.id)
        assert job.status == "failed" and job.error == INTERRUPTED_ERROR and job.finished_at is not None
        assert reopened.get(waiter.id).status == "failed"
        assert reopened.get(pending.id).status == "queued" and reopened.get(pending_waiter.id).status == "queued"
        assert reopened.queued_builds() == [pending.id]
        assert reopened.counts()["running"] == 0
        assert reopened.recover() == {"interrupted": 0, "settled": 0, "requeued": 1}  # idempotent
    finally:
        reopened.close()


def test_concurrent_identical_submissions_make_one_build(store: JobStore) -> None:
    key = key_of()
    jobs: list[Any] = []
    barrier = threading.Barrier(8)

    def submit() -> None:
        barrier.wait()
        jobs.append(new_job(store, key))

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    leaders = [job for job in jobs if job.leader_id is None]
    assert len(jobs) == 8 and len(leaders) == 1
    assert all(job.leader_id == leaders[0].id and job.cache_hit for job in jobs if job is not leaders[0])
    assert store.queued_builds() == [leaders[0].id]


def test_store_rejects_bad_ids(store: JobStore) -> None:
    assert store.get("../../etc/passwd") is None and store.get("A" * 32) is None
    assert store.artifact("not-a-key") is None
    with pytest.raises(ValueError):
        new_job(store, key_of(), job_id="x" * 32)
    with pytest.raises(ValueError):
        new_job(store, "../" + "a" * 61)


# --------------------------------------------------------------------------- artifact store


def test_publish_is_an_atomic_move_into_the_key_path(tmp_path: Path) -> None:
    artifacts = ArtifactStore(tmp_path / "work")
    job_id = new_job_id()
    scratch = artifacts.scratch(job_id)
    src = scratch / "model.opt.onnx"
    src.write_bytes(b"onnx-bytes")
    key = key_of()
    final, sha, size = artifacts.publish(key, src, ".onnx")
    assert final == tmp_path / "work" / "cache" / key[:2] / f"{key}.onnx"
    assert final.read_bytes() == b"onnx-bytes" and size == 10 and not src.exists()
    import hashlib

    assert sha == hashlib.sha256(b"onnx-bytes").hexdigest()
    rec = record(key, job_id, size=10)
    assert artifacts.is_complete(rec)
    assert not artifacts.is_complete(record(key, job_id, size=11))  # a truncated file is not served
    artifacts.remove_scratch(job_id)
    assert not scratch.exists()


@pytest.mark.parametrize("key, suffix", [("../" + "a" * 61, ".onnx"), ("A" * 64, ".onnx"), ("a" * 64, ".sh"),
                                         ("a" * 64, "/../x")])
def test_paths_only_from_hex_keys_and_fixed_suffixes(tmp_path: Path, key: str, suffix: str) -> None:
    artifacts = ArtifactStore(tmp_path)
    with pytest.raises(ValueError):
        artifacts.path_for(key, suffix)
    with pytest.raises(ValueError):
        artifacts.scratch("../evil")
    with pytest.raises(ValueError):
        artifacts.upload_path("x/../../y")


def test_reconcile_removes_everything_unpublished(tmp_path: Path) -> None:
    artifacts = ArtifactStore(tmp_path / "work")
    published, orphan, gone = key_of(), key_of({"precision": "fp16"}), key_of({"precision": "best"})
    good = artifacts.path_for(published, ".onnx")
    good.parent.mkdir(parents=True)
    good.write_bytes(b"ok")
    orphan_path = artifacts.path_for(orphan, ".engine")  # renamed, but the commit never happened
    orphan_path.parent.mkdir(parents=True, exist_ok=True)
    orphan_path.write_bytes(b"orphan")
    temp = good.with_name(f".{good.name}.123.tmp")
    temp.write_bytes(b"partial")
    scratch = artifacts.scratch(new_job_id())
    (scratch / "model.engine").write_bytes(b"half")
    keep, stale = new_job_id(), new_job_id()
    artifacts.upload_path(keep).write_bytes(b"queued upload")
    artifacts.upload_path(stale).write_bytes(b"finished upload")
    (artifacts.uploads / ".upload-1234.part").write_bytes(b"interrupted")

    result = artifacts.reconcile({published: ".onnx", gone: ".onnx"}, {keep})
    assert result["missing"] == [gone]
    remaining = sorted(str(p.relative_to(tmp_path / "work")) for p in (tmp_path / "work").rglob("*") if p.is_file())
    assert remaining == sorted([str(good.relative_to(tmp_path / "work")), f"uploads/{keep}.onnx"])
    assert len(result["removed"]) == 5


# --------------------------------------------------------------------------- options


def test_build_options_forbid_unknown_and_coerce_nothing() -> None:
    assert BuildOptions.model_validate_json("{}").canonical() == {
        "precision": "int8", "shapes": {}, "workspace_mib": None, "target": "trt10", "benchmark": False,
        "benchmark_duration_s": 1.0, "optimization_level": 3, "dla_core": 0,
    }
    for bad in ('{"turbo": 1}', '{"benchmark": "yes"}', '{"precision": "int4"}', '{"workspace_mib": 0}',
                '{"workspace_mib": "64"}', '{"target": "trt9"}', '{"shapes": {"x": {"min": [1], "opt": [1]}}}',
                '{"shapes": {"x": {"min": [2], "opt": [1], "max": [4]}}}',
                '{"shapes": {"x": {"min": [1, 3], "opt": [1], "max": [4]}}}',
                '{"shapes": {"x": {"min": [1], "opt": [1], "max": [1], "axis": 0}}}', "[]", "not json"):
        with pytest.raises(ValueError):
            BuildOptions.model_validate_json(bad)
    options = BuildOptions.model_validate_json(json.dumps({"precision": "fp16", "benchmark": True,
                                                           "shapes": {"input": {"min": [1, 3], "opt": [2, 3], "max": [4, 3]}}}))
    assert options.strongly_typed() is False and BuildOptions().strongly_typed() is True
    assert BuildOptions(target="dla").strongly_typed() is None


def test_check_shapes_against_model_inputs() -> None:
    inputs = {"input": [None, 3, 64, 64]}
    ok = BuildOptions.model_validate({"shapes": {"input": {"min": [1, 3, 64, 64], "opt": [2, 3, 64, 64], "max": [8, 3, 64, 64]}}})
    assert check_shapes(ok, inputs) == []
    unknown = BuildOptions.model_validate({"shapes": {"x": {"min": [1], "opt": [1], "max": [1]}}})
    assert "'x'" in check_shapes(unknown, inputs)[0]
    rank = BuildOptions.model_validate({"shapes": {"input": {"min": [1, 3], "opt": [1, 3], "max": [1, 3]}}})
    assert "rank" in check_shapes(rank, inputs)[0]
    static = BuildOptions.model_validate({"shapes": {"input": {"min": [1, 3, 32, 64], "opt": [1, 3, 64, 64], "max": [1, 3, 64, 64]}}})
    assert "static" in check_shapes(static, inputs)[0]


def test_trt_build_kwargs() -> None:
    int8 = trt_build_kwargs(BuildOptions().canonical(), 10)
    assert int8 == {"strongly_typed": True, "precision_flags": (), "optimization_level": 3}
    fp16_10 = trt_build_kwargs(BuildOptions(precision="fp16").canonical(), 10)
    assert fp16_10["strongly_typed"] is False and fp16_10["precision_flags"] == ("int8", "fp16")
    best_11 = trt_build_kwargs(BuildOptions(precision="best").canonical(), 11)
    assert best_11["strongly_typed"] is True and best_11["precision_flags"] == ()
    full = BuildOptions.model_validate({
        "shapes": {"input": {"min": [1, 3], "opt": [4, 3], "max": [8, 3]}}, "workspace_mib": 512, "target": "dla",
        "dla_core": 1, "optimization_level": 5})
    kwargs = trt_build_kwargs(full.canonical(), 10)
    assert kwargs["min_shapes"] == {"input": (1, 3)} and kwargs["opt_shapes"] == {"input": (4, 3)}
    assert kwargs["max_shapes"] == {"input": (8, 3)} and kwargs["workspace_mib"] == 512
    assert kwargs["dla_core"] == 1 and kwargs["gpu_fallback"] is True and kwargs["optimization_level"] == 5


def test_one_service_per_work_folder(tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from trtquant.service.app import _exclusive_lock

    first = _exclusive_lock(tmp_path / ".service.lock")
    try:
        with pytest.raises(RuntimeError, match="another trtquant service"):
            _exclusive_lock(tmp_path / ".service.lock")
    finally:
        first.close()
    _exclusive_lock(tmp_path / ".service.lock").close()  # free again once the holder is gone


def test_reports_become_strict_json() -> None:
    import numpy as np

    from trtquant.service.store import jsonable, to_json

    value = {"a": np.float32(1.5), "b": (1, np.int64(2)), "c": float("nan"), "d": np.arange(3), "e": Path("/x"), 3: {1}}
    assert jsonable(value) == {"a": 1.5, "b": [1, 2], "c": None, "d": [0, 1, 2], "e": "/x", "3": [1]}
    assert "NaN" not in to_json(value)


# --------------------------------------------------------------------------- TensorRT backend glue


def test_tensorrt_backend_glue_with_a_stubbed_builder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wiring around build_engine (arguments, layer report, metadata) without TensorRT;
    the real build runs in tests/flows/test_service.py::test_tensorrt_backend_builds_engine."""
    import trtquant.engine.build as build_mod
    from trtquant.service.backends import TensorRTBackend

    layers = {"Layers": [{"Name": "/conv/Conv + /relu/Relu", "LayerType": "CaskConvolution",
                          "Inputs": [{"Name": "x", "Format/Datatype": "Int8 NC/32HW32"}],
                          "Outputs": [{"Name": "y", "Format/Datatype": "Row major linear FP32"}],
                          "Metadata": "[ONNX Layer: /conv/Conv]"}], "Bindings": ["input", "output"]}
    calls: dict[str, Any] = {}

    def fake_build_engine(onnx_path: Path, engine_path: Path, **kwargs: Any) -> Any:
        calls.update(kwargs, onnx_path=onnx_path)
        Path(engine_path).write_bytes(b"plan")
        layer_path = Path(str(engine_path) + ".layers.json")
        layer_path.write_text(json.dumps(layers))
        meta = {"tensorrt_version": "10.8.0", "onnx": {"path": "x"}, "engine": {"path": "y"},
                "options": {"timing_cache_path": "/secret/path"}}
        return build_mod.BuildResult(Path(engine_path), Path(str(engine_path) + ".json"), meta, layer_path, ())

    monkeypatch.setattr(build_mod, "build_engine", fake_build_engine)
    backend = object.__new__(TensorRTBackend)
    backend._version = build_mod.parse_trt_version("10.8.0")
    backend.version, backend.device, backend._timing_cache_dir = "10.8.0", "GPU (sm 9.0)", tmp_path / "timing"
    options = BuildOptions.model_validate({"precision": "fp16", "workspace_mib": 256,
                                           "shapes": {"input": {"min": [1, 16], "opt": [4, 16], "max": [8, 16]}}})
    lines: list[str] = []
    out = backend.build(tmp_path / "in.onnx", options.canonical(), {"input": [None, 16]}, tmp_path, lines.append)
    assert out.artifact_path == tmp_path / "model.engine" and out.artifact_path.read_bytes() == b"plan"
    assert calls["strongly_typed"] is False and calls["precision_flags"] == ("int8", "fp16")
    assert calls["opt_shapes"] == {"input": (4, 16)} and calls["workspace_mib"] == 256
    assert calls["profiling_verbosity"] == "detailed" and calls["timing_cache_path"].parent == tmp_path / "timing"
    assert out.layers["precision_counts"] == {"INT8": 1} and out.layers["not_int8_layers"] == []
    assert "onnx" not in out.metadata and "timing_cache_path" not in out.metadata["options"]
    assert any("build_engine(" in line for line in lines)


# --------------------------------------------------------------------------- leases, full disk, eviction


def test_claim_takes_a_lease_that_expiry_turns_into_a_failure(store: JobStore) -> None:
    from trtquant.service.store import LEASE_EXPIRED_ERROR

    key = key_of()
    leader, waiter = new_job(store, key), new_job(store, key)
    claimed = store.claim(leader.id, owner="host:1:a", lease_s=10.0)
    assert claimed.lease_owner == "host:1:a" and claimed.lease_expires_at > claimed.started_at + 9
    assert store.renew_leases({leader.id}, "host:2:b", 10.0) == set()  # only the owner renews
    assert store.renew_leases({leader.id}, "host:1:a", 10.0) == {leader.id}
    assert store.expire_leases(now=claimed.lease_expires_at - 1) == []
    assert store.expire_leases(now=time.time() + 11) == [leader.id]
    job = store.get(leader.id)
    assert job.status == "failed" and job.error == LEASE_EXPIRED_ERROR and job.lease_expires_at is None
    assert store.get(waiter.id).status == "failed" and leader.id in store.get(waiter.id).error
    # a late report of the lost build neither revives the job nor loses its artifact
    assert store.fail(leader.id, "RuntimeError: late", "log") is False
    assert store.succeed(leader.id, record(key, leader.id), "log") is False
    assert store.get(leader.id).status == "failed" and store.artifact(key) is not None


def test_failure_is_recordable_when_the_database_is_full(store: JobStore) -> None:
    """A full disk refuses the failure with its long log; the short write still fits, and the
    refused transaction leaves the connection usable."""
    job = new_job(store, key_of())
    store.claim(job.id)
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(sqlite3.OperationalError, match="full"):
        store.fail(job.id, "OSError: [Errno 28] No space left on device", "x" * 200_000)
    assert store.fail(job.id, "OSError: [Errno 28] No space left on device", None) is True
    assert store.get(job.id).status == "failed"


def test_old_database_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    from trtquant.service import store as store_mod

    old_schema = store_mod._SCHEMA.replace(",\n    lease_owner TEXT,\n    lease_expires_at REAL", "").replace(
        ",\n    last_used_at REAL", "")
    assert "lease_owner" not in old_schema and "last_used_at" not in old_schema
    conn.executescript(old_schema)
    conn.close()
    reopened = JobStore(path)
    try:
        job = new_job(reopened, key_of())
        assert reopened.claim(job.id).lease_expires_at is not None
    finally:
        reopened.close()


def published(store: JobStore, artifacts: ArtifactStore, key: str, used_at: float, size: int = 4) -> None:
    """An artifact file of ``size`` bytes with its row, last used at ``used_at``."""
    path = artifacts.path_for(key, ".onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    store.succeed(new_job_id(), record(key, new_job_id(), size=size), "")
    store.touch_artifact(key, now=used_at)


def test_eviction_takes_least_recently_used_first_and_keeps_pinned(store: JobStore, tmp_path: Path) -> None:
    artifacts = ArtifactStore(tmp_path / "work", cache_max_bytes=10, cache_max_age_s=None)
    k1, k2, k3, k4 = (key_of({"precision": p}) for p in ("int8", "fp16", "best", "x"))
    pinned_job = new_job(store, k1)  # a queued build of k1: never evicted under it
    for key, used in ((k1, 100.0), (k2, 300.0), (k3, 200.0), (k4, 400.0)):
        published(store, artifacts, key, used)
    assert store.cache_bytes() == 16
    assert artifacts.evict(store) == [k3, k2]  # oldest use first, skipping pinned k1, down to <= 10 bytes
    assert set(store.artifacts()) == {k1, k4} and store.cache_bytes() == 8
    assert not artifacts.path_for(k3, ".onnx").exists() and not artifacts.path_for(k2, ".onnx").exists()
    assert artifacts.path_for(k1, ".onnx").is_file() and artifacts.path_for(k4, ".onnx").is_file()
    assert artifacts.evict(store) == []  # within the budget

    tight = ArtifactStore(tmp_path / "work", cache_max_bytes=0, cache_max_age_s=None)
    with tight.serving(k4):
        assert tight.evict(store) == []  # k1 pinned by its job, k4 being served
    store.fail(pinned_job.id, "RuntimeError: x", "")
    assert tight.evict(store, keep={k4}) == [k1]
    new_job(store, k4)  # a cache hit is final: it does not pin
    assert tight.evict(store) == [k4] and store.artifacts() == {}
    assert not list(artifacts.cache.rglob("*.onnx"))


def test_eviction_by_idle_age_and_disabled_limits(store: JobStore, tmp_path: Path) -> None:
    artifacts = ArtifactStore(tmp_path / "work", cache_max_bytes=None, cache_max_age_s=50)
    old, recent = key_of(), key_of({"precision": "fp16"})
    published(store, artifacts, old, 100.0)
    published(store, artifacts, recent, 400.0)
    assert ArtifactStore(tmp_path / "work", cache_max_bytes=None, cache_max_age_s=None).evict(store, now=450.0) == []
    assert artifacts.evict(store, now=450.0) == [old]
    assert store.artifacts() == {recent: ".onnx"}
    hit = new_job(store, recent)  # a cache hit is a use: the idle clock restarts
    assert hit.cache_hit and artifacts.evict(store, now=time.time() + 40) == []


def test_eviction_drops_the_row_before_the_file(store: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the file cannot be removed (or the process dies in between), the index no longer
    names it and start-up reconcile deletes the orphan: never a row without its file."""
    artifacts = ArtifactStore(tmp_path / "work", cache_max_bytes=0, cache_max_age_s=None)
    key = key_of()
    published(store, artifacts, key, 1.0)
    path = artifacts.path_for(key, ".onnx")

    def unlink_fails(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", unlink_fails)
    assert artifacts.evict(store) == [key]
    monkeypatch.undo()
    assert store.artifact(key) is None and path.is_file()
    artifacts.reconcile(store.artifacts(), set())
    assert not path.exists()
