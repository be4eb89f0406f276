"""The engine-build service end to end: the real server (uvicorn) in a subprocess on 127.0.0.1.

Two server set-ups, each with its own temporary work folder and SQLite database:

* ``server`` (auth on, 64 MiB uploads, ONNX Runtime backend): a quantized ResNet-18 round
  trip (artifact run with ONNX Runtime against the uploaded model), the cache, the input
  checks (422/401), 8 concurrent submissions with exactly one build per distinct request.
* the restart test: a server whose builds sleep before publishing
  (``TRTQUANT_SERVICE_TEST_BUILD_DELAY_S``) is SIGKILLed mid-build and restarted on the same
  database and work folder (1 MiB upload limit: the 413 check runs there).

Every request loop is bounded; every server is stopped by its fixture (SIGTERM, then SIGKILL).
The ``trt`` test at the end repeats the round trip on the TensorRT backend where a GPU is present.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _models import qdq_conv_onnx

httpx = pytest.importorskip("httpx", reason="the service tests need the 'service' extra (httpx)")
pytest.importorskip("fastapi", reason="the service tests need the 'service' extra (fastapi)")
pytest.importorskip("uvicorn", reason="the service tests need the 'service' extra (uvicorn)")
ort = pytest.importorskip("onnxruntime")

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DONE = ("succeeded", "failed")


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("service-models")
    return {
        "tiny": qdq_conv_onnx(root / "qdq_conv.onnx"),
        "bad_zero_point": qdq_conv_onnx(root / "qdq_conv_zp3.onnx", zero_point=3),
    }


@pytest.fixture(scope="module")
def resnet18_onnx(tmp_path_factory: pytest.TempPathFactory, server: Service) -> Path:
    """A calibrated, quantized torchvision ResNet-18 (64x64 inputs) as Q/DQ ONNX, exported
    while the ``server`` process starts up."""
    import torchvision

    import trtquant
    from trtquant.export.onnx import export_onnx

    torch.manual_seed(0)
    model = trtquant.quantize(torchvision.models.resnet18().eval())
    trtquant.calibrate(model, [torch.randn(2, 3, 64, 64)], method="max", progress=False)
    path = tmp_path_factory.mktemp("service-resnet") / "resnet18_qdq.onnx"
    export_onnx(model, torch.randn(2, 3, 64, 64), path, exporter="legacy")
    return path


# --------------------------------------------------------------------------- the server process


class Service:
    """``python -m trtquant.service`` in a subprocess; ready once /healthz answers."""

    def __init__(self, workdir: Path, *, db: Path | None = None, token: str | None = None, max_upload_mb: float = 64,
                 build_delay_s: float | None = None, backend: str = "onnxruntime") -> None:
        self.workdir, self.db = workdir, db or workdir / "jobs.db"
        self.token, self.max_upload_mb, self.delay, self.backend = token, max_upload_mb, build_delay_s, backend
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self._log_handle: Any = None

    def start(self) -> Service:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port_file = self.workdir.parent / f"{self.workdir.name}.port"
        self.port_file.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRTQUANT_SERVICE_")}
        if self.token:
            env["TRTQUANT_SERVICE_TOKEN"] = self.token
        if self.delay:
            env["TRTQUANT_SERVICE_TEST_BUILD_DELAY_S"] = str(self.delay)
        self.log_path = self.workdir.parent / f"{self.workdir.name}.{int(time.time() * 1000)}.log"
        self._log_handle = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "trtquant.service", "--host", "127.0.0.1", "--port", "0",
               "--port-file", str(self.port_file), "--workdir", str(self.workdir), "--db", str(self.db),
               "--max-upload-mb", str(self.max_upload_mb), "--backend", self.backend, "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=self._log_handle, stderr=subprocess.STDOUT, env=env)
        self.url = ""
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 90.0) -> Service:
        if self.url:
            return self
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"service exited with {self.proc.returncode}:\n{self.log()}")
            if self.port_file.is_file() and self.port_file.read_text().strip():
                url = f"http://127.0.0.1:{int(self.port_file.read_text())}"
                try:
                    if httpx.get(f"{url}/healthz", timeout=2, trust_env=False).status_code == 200:
                        self.url = url
                        return self
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        pytest.fail(f"service not ready after {timeout} s:\n{self.log()}")

    def client(self, auth: bool = True, timeout: float = 60.0) -> httpx.Client:
        self.wait_ready()
        headers = {"Authorization": f"Bearer {self.token}"} if auth and self.token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout, trust_env=False)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Auth on, 64 MiB uploads, ONNX Runtime backend (started now, waited for on first use)."""
    service = Service(tmp_path_factory.mktemp("service-a") / "work", token=TOKEN, max_upload_mb=64).start()
    try:
        yield service
    finally:
        service.stop()


# --------------------------------------------------------------------------- helpers


def submit(client: httpx.Client, onnx_path: Path | None = None, options: dict[str, Any] | None = None,
           content: bytes | None = None) -> httpx.Response:
    data = content if content is not None else Path(onnx_path).read_bytes()  # type: ignore[arg-type]
    form = {"options": json.dumps(options)} if options is not None else None
    return client.post("/v1/builds", files={"file": ("model.onnx", data, "application/octet-stream")}, data=form)


def wait_done(client: httpx.Client, job_id: str, timeout: float = 120.0, until: tuple[str, ...] = DONE) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get(f"/v1/builds/{job_id}")
        assert response.status_code == 200, response.text
        job = response.json()
        if job["status"] in until:
            return job
        time.sleep(0.1)
    pytest.fail(f"build {job_id} not {until} after {timeout} s: {job}")


def db_rows(db: Path, sql: str = "SELECT id, status FROM jobs ORDER BY id", args: Any = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, tuple(args)).fetchall()
    finally:
        conn.close()


def run_ort(path: Path | bytes, x: np.ndarray) -> np.ndarray:
    model = path if isinstance(path, bytes) else str(path)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# --------------------------------------------------------------------------- tests: server A


def test_resnet18_build_roundtrip_and_cache(server: Service, resnet18_onnx: Path) -> None:
    options = {"shapes": {"input": {"min": [1, 3, 64, 64], "opt": [2, 3, 64, 64], "max": [4, 3, 64, 64]}},
               "benchmark": True, "benchmark_duration_s": 0.2}
    with server.client() as client:
        response = submit(client, resnet18_onnx, options)
        assert response.status_code == 202, response.text
        created = response.json()
        assert created["status"] in ("queued", "running") and created["cache_hit"] is False
        assert response.headers["location"] == f"/v1/builds/{created['id']}"

        job = wait_done(client, created["id"])
        assert job["status"] == "succeeded", job
        assert job["built"] is True and job["cache_hit"] is False and job["error"] is None
        assert job["backend"]["name"] == "onnxruntime" and job["backend"]["version"] == ort.__version__
        assert job["created_at"] <= job["started_at"] <= job["finished_at"]
        assert "published artifact" in job["log"]
        assert job["onnx"]["sha256"] == hashlib.sha256(resnet18_onnx.read_bytes()).hexdigest()

        artifact = client.get(f"/v1/builds/{created['id']}/artifact")
        assert artifact.status_code == 200
        assert hashlib.sha256(artifact.content).hexdigest() == job["artifact"]["sha256"] == artifact.headers["x-artifact-sha256"]
        x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
        expected, got = run_ort(resnet18_onnx, x), run_ort(artifact.content, x)
        assert got.shape == expected.shape == (2, 1000)
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * float(np.abs(expected).max()))

        report = client.get(f"/v1/builds/{created['id']}/report").json()
        assert report["validator"]["ok"] is True and report["validator"]["target"] == "trt10"
        assert report["layers"] is None  # no layer-precision report without TensorRT
        assert report["parity"]["input_shapes"] == {"input": [2, 3, 64, 64]}
        assert report["benchmark"]["results"][0]["batch_size"] == 2
        assert report["benchmark"]["results"][0]["latency_ms"]["n"] >= 5

        builds_before = client.get("/healthz").json()["builds"]
        again = submit(client, resnet18_onnx, options)
        assert again.status_code == 202
        hit = again.json()
        assert hit["status"] == "succeeded" and hit["cache_hit"] is True and hit["key"] == created["key"]
        hit_job = client.get(f"/v1/builds/{hit['id']}").json()
        assert hit_job["built"] is False and hit_job["build_job_id"] == created["id"]
        assert client.get(f"/v1/builds/{hit['id']}/artifact").content == artifact.content
        assert client.get("/healthz").json()["builds"] == builds_before
    assert not files_under(server.workdir / "tmp") and not files_under(server.workdir / "uploads")


def test_rejected_uploads_create_no_job(server: Service, models: dict[str, Path]) -> None:
    with server.client() as client:
        before = db_rows(server.db)
        garbage = submit(client, content=os.urandom(4096))
        assert garbage.status_code == 422 and "not a parseable ONNX" in garbage.json()["detail"]
        text = submit(client, content=b"this is not an onnx model\n" * 10)
        assert text.status_code == 422

        unknown = submit(client, models["tiny"], {"precision": "int8", "turbo": True})
        assert unknown.status_code == 422
        assert [e["type"] for e in unknown.json()["errors"]] == ["extra_forbidden"]
        assert submit(client, models["tiny"], {"benchmark": "yes"}).status_code == 422
        assert submit(client, models["tiny"], {"precision": "int4"}).status_code == 422
        bad_profile = {"shapes": {"input": {"min": [4, 16, 8, 8], "opt": [2, 16, 8, 8], "max": [8, 16, 8, 8]}}}
        assert submit(client, models["tiny"], bad_profile).status_code == 422
        wrong_input = submit(client, models["tiny"], {"shapes": {"images": {"min": [1], "opt": [1], "max": [1]}}})
        assert wrong_input.status_code == 422 and "images" in wrong_input.json()["problems"][0]

        checked = submit(client, models["bad_zero_point"])
        assert checked.status_code == 422, checked.text
        body = checked.json()
        assert "check_onnx" in body["detail"] and body["report"]["ok"] is False
        assert any(f["rule"] == "B8-zero-point" for f in body["findings"])

        no_file = client.post("/v1/builds", files={"options": (None, "{}")})
        assert no_file.status_code == 422
        assert client.post("/v1/builds", json={"file": "x"}).status_code == 415
        extra_field = client.post("/v1/builds", files={"file": ("m.onnx", b"x"), "path": (None, "../../etc/passwd")})
        assert extra_field.status_code == 422

        assert client.get("/v1/builds/not-a-build-id").status_code == 422
        assert client.get("/v1/builds/" + "0" * 32).status_code == 404
        assert client.get("/v1/builds/" + "0" * 32 + "/artifact").status_code == 404
        assert db_rows(server.db) == before
    assert not files_under(server.workdir / "uploads")


def test_bearer_token_auth(server: Service, models: dict[str, Path]) -> None:
    with server.client(auth=False) as anonymous:
        missing = submit(anonymous, models["tiny"])
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        anonymous.headers["Authorization"] = "Bearer wrong-token"
        assert submit(anonymous, models["tiny"]).status_code == 401
        anonymous.headers["Authorization"] = f"Basic {TOKEN}"
        assert submit(anonymous, models["tiny"]).status_code == 401
        del anonymous.headers["Authorization"]
        assert anonymous.get("/v1/builds/" + "0" * 32).status_code == 401
        health = anonymous.get("/healthz")
        assert health.status_code == 200 and health.json()["auth"] is True
        assert anonymous.get("/openapi.json").json()["paths"]["/v1/builds"]["post"]
    with server.client() as client:
        accepted = submit(client, models["tiny"])
        assert accepted.status_code == 202, accepted.text
        job = wait_done(client, accepted.json()["id"])
        assert job["status"] == "succeeded", job
        with server.client(auth=False) as anonymous:
            assert anonymous.get(f"/v1/builds/{accepted.json()['id']}/artifact").status_code == 401


def test_concurrent_submissions_build_once_per_request(server: Service, resnet18_onnx: Path, models: dict[str, Path]) -> None:
    requests = [(resnet18_onnx, {"precision": "best"})] * 5 + [(models["tiny"], {"precision": "fp16"})] * 3 \
        + [(models["tiny"], {"workspace_mib": 64})] * 2
    with server.client() as client:
        builds_before = client.get("/healthz").json()["builds"]

        def one(item: tuple[Path, dict[str, Any]]) -> dict[str, Any]:
            response = submit(client, *item)
            assert response.status_code == 202, response.text
            return response.json()

        with ThreadPoolExecutor(max_workers=len(requests)) as pool:
            created = list(pool.map(one, requests))
        jobs = [wait_done(client, c["id"]) for c in created]
        assert all(job["status"] == "succeeded" for job in jobs), [(j["status"], j["error"]) for j in jobs]

        groups: dict[str, list[dict[str, Any]]] = {}
        for job in jobs:
            groups.setdefault(job["key"], []).append(job)
        assert sorted(len(g) for g in groups.values()) == [2, 3, 5]
        for group in groups.values():
            builders = [job for job in group if job["built"]]
            assert len(builders) == 1, group
            others = [job for job in group if not job["built"]]
            assert all(job["cache_hit"] and job["build_job_id"] == builders[0]["id"] for job in others)
            assert len({job["artifact"]["sha256"] for job in group}) == 1
        assert client.get("/healthz").json()["builds"] == builds_before + 3
        ids = [c["id"] for c in created]
        built = db_rows(server.db, f"SELECT COUNT(*) FROM jobs WHERE built = 1 AND id IN ({','.join('?' * len(ids))})", ids)
        assert built == [(3,)]  # the store agrees (read while the service runs: WAL)


# --------------------------------------------------------------------------- tests: kill and restart


def test_kill_mid_build_then_restart(tmp_path: Path, models: dict[str, Path]) -> None:
    workdir, db = tmp_path / "work", tmp_path / "state" / "jobs.db"
    first = Service(workdir, db=db, max_upload_mb=1, build_delay_s=120).start()
    try:
        with first.client() as client:
            running = submit(client, models["tiny"], {"precision": "int8"}).json()
            waiting = submit(client, models["tiny"], {"precision": "int8"}).json()  # identical: waits for `running`
            queued = submit(client, models["tiny"], {"precision": "best"}).json()  # behind it on the one worker
            assert waiting["cache_hit"] is True and waiting["status"] == "queued"
            wait_done(client, running["id"], timeout=60, until=("running",))
            scratch = workdir / "tmp" / running["id"]
            deadline = time.monotonic() + 30
            while not files_under(scratch) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert files_under(scratch), "the build never wrote its scratch artifact"
            assert client.get(f"/v1/builds/{running['id']}/artifact").status_code == 409
        first.kill()
        assert dict(db_rows(db))[running["id"]] == "running"  # what a crash leaves behind
        assert not files_under(workdir / "cache")
    finally:
        first.stop()

    second = Service(workdir, db=db, max_upload_mb=1).start()
    try:
        with second.client() as client:
            job = client.get(f"/v1/builds/{running['id']}").json()
            assert job["status"] == "failed" and "interrupted by restart" in job["error"], job
            assert job["finished_at"] is not None and job["artifact"] is None
            assert client.get(f"/v1/builds/{running['id']}/artifact").status_code == 409
            report = client.get(f"/v1/builds/{running['id']}/report").json()
            assert report["status"] == "failed" and report["layers"] is None and report["validator"]["ok"]
            follower = client.get(f"/v1/builds/{waiting['id']}").json()
            assert follower["status"] == "failed" and running["id"] in follower["error"]
            assert client.get(f"/v1/builds/{waiting['id']}/artifact").status_code == 409
            assert not files_under(workdir / "tmp")  # the scratch artifact was wiped, never published

            requeued = wait_done(client, queued["id"])  # a queued build keeps its place across restarts
            assert requeued["status"] == "succeeded" and requeued["built"] is True
            assert all(status != "running" for _, status in db_rows(db))
            assert client.get("/healthz").json()["running"] == 0

            rows_before = db_rows(db)
            too_big = submit(client, content=os.urandom(2 * 1024 * 1024))
            assert too_big.status_code == 413, too_big.text
            assert db_rows(db) == rows_before and not files_under(workdir / "uploads")

            again = submit(client, models["tiny"], {"precision": "int8"}).json()
            assert again["cache_hit"] is False  # the interrupted build published nothing
            rebuilt = wait_done(client, again["id"])
            assert rebuilt["status"] == "succeeded" and rebuilt["built"] is True
            engine = client.get(f"/v1/builds/{again['id']}/artifact")
            assert engine.status_code == 200
            x = np.random.default_rng(2).standard_normal((3, 16, 8, 8)).astype(np.float32)
            np.testing.assert_allclose(run_ort(engine.content, x), run_ort(models["tiny"], x), rtol=1e-4, atol=1e-4)
            published = files_under(workdir / "cache")
            assert [p.name for p in published] == sorted(f"{k}.onnx" for k in {queued_key(db, queued["id"]), again["key"]})
    finally:
        second.stop()


def queued_key(db: Path, job_id: str) -> str:
    return db_rows(db, "SELECT key FROM jobs WHERE id = ?", (job_id,))[0][0]


# --------------------------------------------------------------------------- TensorRT backend


def _why_no_tensorrt() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    try:
        from trtquant.engine import _trt

        _trt.import_tensorrt()
    except Exception as exc:
        return f"needs the TensorRT Python package: {str(exc).splitlines()[0]}"
    return None


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.skipif(_why_no_tensorrt() is not None, reason=str(_why_no_tensorrt()))
def test_tensorrt_backend_builds_engine(tmp_path: Path, models: dict[str, Path]) -> None:
    service = Service(tmp_path / "work", backend="tensorrt").start()
    try:
        with service.client(timeout=300) as client:
            assert client.get("/healthz").json()["backend"]["name"] == "tensorrt"
            options = {"shapes": {"input": {"min": [1, 16, 8, 8], "opt": [4, 16, 8, 8], "max": [8, 16, 8, 8]}},
                       "workspace_mib": 256, "benchmark": True, "benchmark_duration_s": 0.2}
            created = submit(client, models["tiny"], options).json()
            job = wait_done(client, created["id"], timeout=300)
            assert job["status"] == "succeeded", job
            engine = client.get(f"/v1/builds/{created['id']}/artifact")
            assert engine.status_code == 200 and engine.headers["content-disposition"].endswith('.engine"')
            report = client.get(f"/v1/builds/{created['id']}/report").json()
            weighted = [layer for layer in report["layers"]["layers"] if layer["weighted"]]
            assert weighted and all(layer["precision"] == "INT8" for layer in weighted), report["layers"]
            assert report["build"]["tensorrt_version"] == job["backend"]["version"]
            assert report["benchmark"]["results"][0]["batch_size"] == 4
    finally:
        service.stop()
