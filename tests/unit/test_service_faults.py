"""The build service's fault handling, in process (no server): a full disk while publishing,
build threads that die without reporting, jobs of a process that is gone, cache eviction
end to end and the reference run's input budget. Real builds on the ONNX Runtime backend
with a tiny Q/DQ conv model; every wait is bounded."""

from __future__ import annotations

import errno
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pydantic")
pytest.importorskip("onnxruntime")

from _models import qdq_conv_onnx  # noqa: E402

from trtquant.service import backends as backends_mod  # noqa: E402
from trtquant.service.backends import OnnxRuntimeBackend, ReferenceInputTooLarge  # noqa: E402
from trtquant.service.jobs import BuildManager, BuildOptions  # noqa: E402
from trtquant.service.store import LEASE_EXPIRED_ERROR, ArtifactStore, Job, JobStore, new_job_id  # noqa: E402

INPUTS = {"input": [None, 16, 8, 8]}
FINAL = ("succeeded", "failed")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return qdq_conv_onnx(tmp_path_factory.mktemp("faults-model") / "qdq_conv.onnx")


@pytest.fixture(scope="module")
def backend() -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend()


class Service:
    """A BuildManager on a temporary work folder, stopped at the end of the test."""

    def __init__(self, root: Path, backend: Any, model: Path, *, artifacts: dict[str, Any] | None = None,
                 **manager: Any) -> None:
        self.root, self.model = root, model
        self.artifacts = ArtifactStore(root / "work", **(artifacts or {}))
        self.store = JobStore(root / "work" / "jobs.db")
        self.manager = BuildManager(self.store, self.artifacts, backend, **manager)

    def submit(self, **options: Any) -> Job:
        part = self.artifacts.uploads / f".upload-{new_job_id()}.part"
        shutil.copyfile(self.model, part)
        return self.manager.submit(upload=part, onnx_sha256="ab" * 32, onnx_bytes=part.stat().st_size,
                                   filename="m.onnx", options=BuildOptions.model_validate(options), inputs=INPUTS,
                                   check_report={"ok": True})

    def wait(self, job_id: str, timeout: float = 20.0) -> Job:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.store.get(job_id)
            assert job is not None
            if job.status in FINAL:
                return job
            time.sleep(0.05)
        pytest.fail(f"job {job_id} still {self.store.get(job_id).status} after {timeout} s")


@pytest.fixture
def make_service(tmp_path: Path, backend: OnnxRuntimeBackend, model: Path) -> Iterator[Any]:
    started: list[Service] = []

    def make(**kwargs: Any) -> Service:
        service = Service(tmp_path / f"s{len(started)}", kwargs.pop("backend", backend), model, **kwargs)
        started.append(service)
        service.manager.start()
        return service

    yield make
    for service in started:
        service.manager.stop(timeout=10)
        service.store.close()


def store_job(store: JobStore, key: str = "cd" * 32) -> Job:
    return store.create_job(job_id=new_job_id(), key=key, options={}, inputs=INPUTS, onnx_sha256="ab" * 32,
                            onnx_bytes=1, filename=None, backend="onnxruntime", backend_version="1",
                            device="cpu", check_report=None, artifact_ok=lambda record: True)


def disk_full_publish(self: ArtifactStore, key: str, src: Path, suffix: str) -> Any:
    raise OSError(errno.ENOSPC, "No space left on device", str(self.path_for(key, suffix)))


# --------------------------------------------------------------------------- 1. artifact that does not fit


def test_disk_full_on_publish_fails_the_job_and_releases_its_duplicates(make_service: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """publish raises ENOSPC and, the disk being full, the first write of the failure raises
    too: the job must still end failed (no server path in its error) and free its duplicates."""
    service = make_service(build_delay_s=0.3)  # time to submit a duplicate while the build runs
    real_publish = ArtifactStore.publish
    monkeypatch.setattr(ArtifactStore, "publish", disk_full_publish)
    real_fail, calls = JobStore.fail, []

    def fail_while_disk_full(self: JobStore, *args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database or disk is full")
        return real_fail(self, *args, **kwargs)

    monkeypatch.setattr(JobStore, "fail", fail_while_disk_full)
    leader = service.submit()
    duplicate = service.submit()
    assert duplicate.leader_id == leader.id

    job = service.wait(leader.id, timeout=15)
    assert job.status == "failed", job
    assert "publishing the artifact failed" in job.error and "No space left on device" in job.error
    root = str(service.root)
    assert root not in job.error and root not in job.log and "/cache/" not in job.error
    waited = service.wait(duplicate.id, timeout=5)
    assert waited.status == "failed" and leader.id in waited.error and "No space left" in waited.error
    assert service.store.counts()["running"] == 0
    assert not list(service.artifacts.cache.rglob("*.onnx"))

    monkeypatch.setattr(ArtifactStore, "publish", real_publish)
    retry = service.submit()  # the disk has room again: a fresh build, not a wait on the failed one
    assert retry.leader_id is None and retry.status == "queued"
    assert service.wait(retry.id).status == "succeeded"


def test_failure_the_thread_cannot_record_is_recorded_by_the_watchdog(make_service: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The database stays unwritable for longer than the build thread retries: the watchdog
    records the real error later (not a bare lease expiry)."""
    service = make_service(lease_s=5.0, watchdog_interval_s=0.1, record_retry_s=0.0)
    monkeypatch.setattr(ArtifactStore, "publish", disk_full_publish)
    real_fail, calls = JobStore.fail, []

    def fail_three_times(self: JobStore, *args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        if len(calls) <= 3:
            raise sqlite3.OperationalError("database or disk is full")
        return real_fail(self, *args, **kwargs)

    monkeypatch.setattr(JobStore, "fail", fail_three_times)
    job = service.wait(service.submit().id, timeout=4)  # well before the 5 s lease runs out
    assert job.status == "failed" and "No space left on device" in job.error and len(calls) == 4


# --------------------------------------------------------------------------- 2. leases and the watchdog


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the deliberate death
def test_watchdog_fails_a_job_whose_build_thread_died(make_service: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    service = make_service(lease_s=0.6, watchdog_interval_s=0.1)
    manager = service.manager

    def die_without_reporting(job: Job) -> None:
        raise SystemExit  # ends the worker thread silently: no failure recorded, no cleanup

    monkeypatch.setattr(manager, "_run", die_without_reporting)
    leader = service.submit()
    duplicate = service.submit()
    job = service.wait(leader.id, timeout=10)
    assert job.status == "failed" and job.error == LEASE_EXPIRED_ERROR
    waited = service.wait(duplicate.id, timeout=5)
    assert waited.status == "failed" and leader.id in waited.error

    monkeypatch.undo()  # builds work again; the dead worker must have been replaced
    retry = service.submit()
    assert retry.leader_id is None
    assert service.wait(retry.id).status == "succeeded"


def test_watchdog_fails_running_job_of_a_gone_process(make_service: Any) -> None:
    service = make_service(lease_s=30.0, watchdog_interval_s=5.0)
    other = JobStore(service.store.path)  # another process claimed a build, then vanished
    try:
        orphan, waiter = store_job(other), store_job(other)
        assert other.claim(orphan.id, owner="elsewhere:1234:dead", lease_s=0.2) is not None
    finally:
        other.close()
    assert service.manager.watchdog_tick()["expired"] == []  # the lease still runs
    time.sleep(0.3)
    assert service.manager.watchdog_tick()["expired"] == [orphan.id]
    job = service.store.get(orphan.id)
    assert job.status == "failed" and job.error == LEASE_EXPIRED_ERROR and LEASE_EXPIRED_ERROR in job.log
    assert service.store.get(waiter.id).status == "failed"


def test_live_build_keeps_renewing_its_lease(make_service: Any) -> None:
    """A build that takes several lease lengths is not failed while its thread is alive."""
    service = make_service(lease_s=0.4, watchdog_interval_s=0.05, build_delay_s=1.5)
    job = service.wait(service.submit().id)
    assert job.status == "succeeded", job.error
    assert job.finished_at - job.started_at > 1.2


# --------------------------------------------------------------------------- 3. eviction end to end


def test_evicted_artifact_is_rebuilt_by_an_identical_submission(make_service: Any) -> None:
    service = make_service(artifacts={"cache_max_bytes": 1, "cache_max_age_s": None})
    first = service.wait(service.submit(optimization_level=1).id)
    assert first.status == "succeeded" and service.store.artifact(first.key) is not None  # its own build is kept
    second = service.wait(service.submit(optimization_level=2).id)
    assert second.status == "succeeded"
    assert service.store.artifact(first.key) is None  # least recently used, over the 1-byte budget
    assert not service.artifacts.path_for(first.key, ".onnx").exists()
    assert service.store.artifact(second.key) is not None

    again = service.submit(optimization_level=1)
    assert again.status == "queued" and not again.cache_hit and again.leader_id is None
    rebuilt = service.wait(again.id)
    assert rebuilt.status == "succeeded" and rebuilt.built
    assert service.artifacts.path_for(first.key, ".onnx").is_file()


# --------------------------------------------------------------------------- 4. reference-run inputs


def test_reference_inputs_over_the_budget_are_refused_before_allocating(make_service: Any, model: Path,
                                                                        tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    allocated: list[Any] = []
    real = backends_mod._random_input
    monkeypatch.setattr(backends_mod, "_random_input", lambda *a: allocated.append(a) or real(*a))
    small = OnnxRuntimeBackend(reference_input_budget_bytes=16_000)
    shapes = {"input": {"min": [1, 16, 8, 8], "opt": [4, 16, 8, 8], "max": [4, 16, 8, 8]}}  # 16384 bytes
    with pytest.raises(ReferenceInputTooLarge, match="16384 bytes .* over the budget of 16000 bytes"):
        small.build(model, {"shapes": shapes}, INPUTS, tmp_path, lambda line: None)
    assert allocated == []

    service = make_service(backend=small)  # through the service: a failed job with that message
    job = service.wait(service.submit(shapes=shapes).id)
    assert job.status == "failed" and "over the budget of 16000 bytes" in job.error
    fits = service.wait(service.submit().id)  # batch 1: 4096 bytes
    assert fits.status == "succeeded" and fits.built


def test_reference_inputs_are_drawn_in_the_model_dtype(backend: OnnxRuntimeBackend, model: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    dtypes: list[Any] = []
    real_rng = np.random.default_rng

    class Recorder:
        def __init__(self, seed: Any) -> None:
            self.rng = real_rng(seed)

        def standard_normal(self, size: Any = None, dtype: Any = np.float64, **kwargs: Any) -> Any:
            dtypes.append(np.dtype(dtype))
            return self.rng.standard_normal(size, dtype=dtype, **kwargs)

    monkeypatch.setattr(np.random, "default_rng", Recorder)
    out = backend.build(model, {}, INPUTS, tmp_path, lambda line: None)
    assert out.parity is not None and out.parity["input_shapes"] == {"input": [1, 16, 8, 8]}
    assert dtypes == [np.dtype(np.float32)]  # never a float64 draw for a float32 input

    half = backends_mod._random_input(real_rng(0), (3, 1 << 20 | 5), np.float16)
    assert half.dtype == np.float16 and half.shape == (3, (1 << 20) + 5) and np.isfinite(half).all()
    assert float(np.std(half[:, -5:])) > 0  # the last partial block is filled too
