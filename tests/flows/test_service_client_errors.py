"""The build service's submission layer against client mistakes, hostile models and storage faults,
in embedded mode: the FastAPI app runs in this process (its lifespan included) behind
``httpx.ASGITransport``, so a test can stall an upload or make the upload sink's disk fail.

Covered: options that JSON cannot echo back (non-UTF-8, NaN, Infinity, 1e400, not an object) are
a 422 naming the field; a full or read-only store is a 507/503 without server paths and no partial
file; a stalled upload is a 408; models whose declared tensors would need gigabytes are a 413
before anything is allocated; a float model without Q/DQ needs ``allow_float``; ``serve --help``
names the real database file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _models import qdq_conv_onnx

httpx = pytest.importorskip("httpx", reason="the service tests need the 'service' extra (httpx)")
pytest.importorskip("fastapi", reason="the service tests need the 'service' extra (fastapi)")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from trtquant.service import app as service_app  # noqa: E402
from trtquant.service.app import ServiceConfig, create_app  # noqa: E402
from trtquant.service.backends import OnnxRuntimeBackend  # noqa: E402

SCENARIO_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------- embedded service


class Embedded:
    """One app instance with its work folder, driven through an async httpx client."""

    def __init__(self, workdir: Path, client: Any) -> None:
        self.workdir, self.client = workdir, client

    async def submit(self, model: bytes, options: bytes | dict[str, Any] | None = None) -> Any:
        files: dict[str, Any] = {"file": ("model.onnx", model, "application/octet-stream")}
        if options is not None:
            files["options"] = (None, options if isinstance(options, bytes) else json.dumps(options).encode())
        return await self.client.post("/v1/builds", files=files)

    async def wait_done(self, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = (await self.client.get(f"/v1/builds/{job_id}")).json()
            if job["status"] in ("succeeded", "failed"):
                return job
            await asyncio.sleep(0.05)
        pytest.fail(f"build {job_id} not done after {timeout} s")

    def jobs(self) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(f"file:{self.workdir / 'jobs.db'}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute("SELECT id, status FROM jobs").fetchall()
        finally:
            conn.close()

    def uploads(self) -> list[Path]:
        folder = self.workdir / "uploads"
        return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@contextlib.asynccontextmanager
async def embedded(tmp_path: Path, **config: Any) -> AsyncIterator[Embedded]:
    workdir = tmp_path / "work"
    app = create_app(ServiceConfig(workdir=workdir, **config), backend=OnnxRuntimeBackend())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service", timeout=30) as client:
            yield Embedded(workdir, client)


def run(tmp_path: Path, scenario: Callable[[Embedded], Awaitable[None]], **config: Any) -> None:
    """Run ``scenario`` against a fresh embedded service, bounded in time."""

    async def main() -> None:
        async with embedded(tmp_path, **config) as service:
            await asyncio.wait_for(scenario(service), SCENARIO_TIMEOUT_S)

    asyncio.run(main())


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def qdq_model(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return qdq_conv_onnx(tmp_path_factory.mktemp("client-errors") / "qdq_conv.onnx").read_bytes()


def _model(nodes: list[Any], inputs: list[Any], outputs: list[Any], initializers: list[Any] = ()) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=9)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def float_conv_model() -> bytes:
    """A float Conv (no Q/DQ at all): what a client sends when it forgot to quantize."""
    weight = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.1, (4, 4, 3, 3)).astype(np.float32), "w")
    return _model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 8])], [weight])


def big_input_bomb() -> bytes:
    """~200 bytes declaring a 1x3x6000x6000 float input (432 MB per copy once a build feeds it)."""
    return _model([helper.make_node("Relu", ["x"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6000, 6000])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 6000, 6000])])


def constant_of_shape_bomb(shape_as: str = "constant") -> bytes:
    """~300 bytes whose ConstantOfShape fills a 16384x16384 float tensor (1 GiB)."""
    shape = np.array([16384, 16384], np.int64)
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"],
                              value=numpy_helper.from_array(np.array([1.0], np.float32))),
             helper.make_node("Add", ["big", "x"], ["y"])]
    initializers = []
    if shape_as == "constant":
        nodes.insert(0, helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(shape)))
    else:
        initializers.append(numpy_helper.from_array(shape, "shape"))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", "cols"])], initializers)


def generator_bomb(op: str) -> bytes:
    """A tiny Expand/Tile/Range whose constant size inputs make a 2**30-element output."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", "cols"])
    if op == "Expand":
        return _model([helper.make_node("Expand", ["x", "shape"], ["y"])], [x], [y],
                      [numpy_helper.from_array(np.array([1 << 15, 1 << 15], np.int64), "shape")])
    if op == "Tile":
        return _model([helper.make_node("Tile", ["x", "repeats"], ["y"])], [x], [y],
                      [numpy_helper.from_array(np.array([1 << 15, 1 << 15], np.int64), "repeats")])
    assert op == "Range"
    scalars = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("start", 0), ("limit", 1 << 30), ("delta", 1))]
    return _model([helper.make_node("Range", ["start", "limit", "delta"], ["r"]), helper.make_node("Mul", ["r", "x"], ["y"])],
                  [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n"])], scalars)


# --------------------------------------------------------------------------- 1. options JSON cannot echo


@pytest.mark.parametrize(("raw", "field"), [
    pytest.param(b'{"precision": "int8\xff\xfe"}', "options", id="non-utf8-in-string"),
    pytest.param(b'\xff{"precision": "int8"}', "options", id="non-utf8-leading"),
    pytest.param(b'{"benchmark_duration_s": NaN}', "benchmark_duration_s", id="nan"),
    pytest.param(b'{"benchmark_duration_s": Infinity}', "benchmark_duration_s", id="infinity"),
    pytest.param(b'{"benchmark_duration_s": -Infinity}', "benchmark_duration_s", id="minus-infinity"),
    pytest.param(b'{"benchmark_duration_s": 1e400}', "benchmark_duration_s", id="1e400"),
    pytest.param(b'{"workspace_mib": 1e400}', "workspace_mib", id="1e400-for-int"),
    pytest.param(b'{"shapes": {"input": {"min": [1, 16, 8, 8], "opt": [NaN, 16, 8, 8], "max": [4, 16, 8, 8]}}}',
                 "shapes.input.opt.0", id="nan-in-shape"),
    pytest.param(b'[1, 2]', "options", id="array"),
    pytest.param(b'"int8"', "options", id="string"),
    pytest.param(b'null', "options", id="null"),
])
def test_options_json_cannot_echo_is_clean_422(tmp_path: Path, qdq_model: bytes, raw: bytes, field: str) -> None:
    async def scenario(service: Embedded) -> None:
        response = await service.submit(qdq_model, raw)
        assert response.status_code == 422, response.text
        body = response.json()  # the body itself is valid JSON (no NaN, no bytes)
        assert field in body["detail"], body
        if field == "options":
            assert "'options'" in body["detail"] or "options: " in body["detail"], body
        else:
            assert [e["field"] for e in body["errors"]] == [field], body
        assert all(set(e) == {"type", "loc", "field", "msg"} for e in body.get("errors", []))  # no raw input echoed
        assert service.jobs() == [] and service.uploads() == []

    run(tmp_path, scenario)


def test_options_messages_say_what_is_wrong(tmp_path: Path, qdq_model: bytes) -> None:
    async def scenario(service: Embedded) -> None:
        not_utf8 = (await service.submit(qdq_model, b'{"precision": "\xff"}')).json()["detail"]
        assert "not UTF-8" in not_utf8 and "0xff" in not_utf8
        array = (await service.submit(qdq_model, b"[1]")).json()["detail"]
        assert "must be a JSON object, got list" in array
        nan = (await service.submit(qdq_model, b'{"benchmark_duration_s": NaN}')).json()["detail"]
        assert "benchmark_duration_s" in nan and "finite" in nan
        unknown = (await service.submit(qdq_model, {"turbo": True})).json()
        assert [e["type"] for e in unknown["errors"]] == ["extra_forbidden"] and "turbo" in unknown["detail"]

    run(tmp_path, scenario)


# --------------------------------------------------------------------------- 2. storage faults on submit


class _FailingFile:
    """A real upload file whose write or close fails like a full or broken disk, after writing."""

    def __init__(self, path: Path, fail_on: str, error: OSError) -> None:
        self._file = open(path, "xb")
        self.fail_on, self.error = fail_on, error

    def write(self, data: bytes) -> int:
        self._file.write(data)
        self._file.flush()  # the partial file is really on disk
        if self.fail_on == "write":
            raise self.error
        return len(data)

    def close(self) -> None:
        self._file.close()
        if self.fail_on == "close":
            raise self.error


def _assert_no_server_path(response: Any, workdir: Path) -> None:
    text = response.text
    for path in {workdir, workdir.resolve(), workdir.parent}:
        assert str(path) not in text, text
    assert ".upload-" not in text and ".part" not in text, text


@pytest.mark.parametrize("fail_on", ["write", "close"])
def test_disk_full_while_streaming_is_507_without_path_or_partial_file(tmp_path: Path, qdq_model: bytes,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       fail_on: str) -> None:
    seen: list[Path] = []

    def open_failing(sink: Any) -> _FailingFile:
        seen.append(sink.file_path)
        return _FailingFile(sink.file_path, fail_on, OSError(errno.ENOSPC, "No space left on device", str(sink.file_path)))

    monkeypatch.setattr(service_app._MultipartSink, "_open_file", open_failing)

    async def scenario(service: Embedded) -> None:
        response = await service.submit(qdq_model, {"precision": "int8"})
        assert response.status_code == 507, response.text
        assert "storage is full" in response.json()["detail"]
        _assert_no_server_path(response, service.workdir)
        assert seen and not seen[0].exists() and service.uploads() == []
        assert service.jobs() == []

    run(tmp_path, scenario)


def test_unwritable_store_is_503_not_malformed_multipart(tmp_path: Path, qdq_model: bytes,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def open_read_only(sink: Any) -> Any:
        raise PermissionError(errno.EROFS, "Read-only file system", str(sink.file_path))

    monkeypatch.setattr(service_app._MultipartSink, "_open_file", open_read_only)

    async def scenario(service: Embedded) -> None:
        response = await service.submit(qdq_model)
        assert response.status_code == 503, response.text
        detail = response.json()["detail"]
        assert "not writable" in detail and "malformed" not in detail
        _assert_no_server_path(response, service.workdir)
        assert service.uploads() == [] and service.jobs() == []

    run(tmp_path, scenario)


def test_full_store_when_recording_the_build_is_507(tmp_path: Path, qdq_model: bytes,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from trtquant.service.jobs import BuildManager

    def submit_on_full_disk(self: Any, upload: Path, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device", str(upload))

    monkeypatch.setattr(BuildManager, "submit", submit_on_full_disk)

    async def scenario(service: Embedded) -> None:
        response = await service.submit(qdq_model)
        assert response.status_code == 507, response.text
        _assert_no_server_path(response, service.workdir)
        assert service.uploads() == []

    run(tmp_path, scenario)


# --------------------------------------------------------------------------- 3. stalled uploads


def test_stalled_upload_is_408_and_partial_file_removed(tmp_path: Path, qdq_model: bytes) -> None:
    """ASGI level: the request body is an async generator that stops sending mid-file."""
    boundary = "stall-boundary-0123456789"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"m.onnx\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + qdq_model[:200]
    rest = qdq_model[200:] + f"\r\n--{boundary}--\r\n".encode()
    partial_seen: list[list[Path]] = []

    async def scenario(service: Embedded) -> None:
        async def stalling_body() -> AsyncIterator[bytes]:
            yield head
            partial_seen.append(service.uploads())  # the server has consumed `head` by now
            await asyncio.sleep(60)
            yield rest

        started = time.monotonic()
        response = await service.client.post(
            "/v1/builds", content=stalling_body(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert response.status_code == 408, response.text
        assert time.monotonic() - started < 10
        assert "stalled" in response.json()["detail"]
        assert partial_seen and len(partial_seen[0]) == 1, partial_seen  # there was a partial file ...
        assert service.uploads() == [] and service.jobs() == []  # ... and it is gone

    run(tmp_path, scenario, upload_read_timeout_s=0.3)


def test_stalled_body_of_a_rejected_request_does_not_hold_the_answer(tmp_path: Path) -> None:
    """The 401 path reads (drains) the body before answering: a stall there ends at the timeout too."""
    async def scenario(service: Embedded) -> None:
        async def stalling_body() -> AsyncIterator[bytes]:
            yield b"--b\r\n"
            await asyncio.sleep(60)
            yield b"--b--\r\n"

        started = time.monotonic()
        response = await service.client.post("/v1/builds", content=stalling_body(),
                                              headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert response.status_code == 401 and time.monotonic() - started < 10

    run(tmp_path, scenario, upload_read_timeout_s=0.3, token="secret-token")


def test_upload_read_timeout_is_configurable() -> None:
    assert ServiceConfig(workdir=Path("w")).upload_read_timeout_s == 60.0
    assert ServiceConfig(workdir=Path("w"), upload_read_timeout_s=5).upload_read_timeout_s == 5


# --------------------------------------------------------------------------- 4. resource bombs


def test_large_declared_input_is_413_naming_the_tensor(tmp_path: Path) -> None:
    bomb = big_input_bomb()
    assert len(bomb) < 300

    async def scenario(service: Embedded) -> None:
        response = await service.submit(bomb, {"allow_float": True})
        assert response.status_code == 413, response.text
        body = response.json()
        assert body["tensor"] == "x" and body["kind"] == "input" and body["shape"] == [1, 3, 6000, 6000]
        assert body["elements"] == 108_000_000 and "'x'" in body["detail"] and "108,000,000" in body["detail"]
        assert service.jobs() == [] and service.uploads() == []

    run(tmp_path, scenario)


@pytest.mark.parametrize("shape_as", ["constant", "initializer"])
def test_constant_of_shape_bomb_is_413(tmp_path: Path, shape_as: str) -> None:
    bomb = constant_of_shape_bomb(shape_as)
    assert len(bomb) < 400

    async def scenario(service: Embedded) -> None:
        response = await service.submit(bomb, {"allow_float": True})
        assert response.status_code == 413, response.text
        body = response.json()
        assert body["tensor"] == "big" and body["kind"] == "ConstantOfShape output"
        assert body["shape"] == [16384, 16384] and body["bytes"] == 1 << 30 and "1.00 GiB" in body["detail"]
        assert service.jobs() == [] and service.uploads() == []

    run(tmp_path, scenario)


@pytest.mark.parametrize("op", ["Expand", "Tile", "Range"])
def test_generator_bombs_are_413(tmp_path: Path, op: str) -> None:
    async def scenario(service: Embedded) -> None:
        response = await service.submit(generator_bomb(op), {"allow_float": True})
        assert response.status_code == 413, response.text
        body = response.json()
        assert body["kind"] == f"{op} output" and body["elements"] == 1 << 30, body

    run(tmp_path, scenario)


def test_profile_max_shape_counts_against_the_budget(tmp_path: Path, qdq_model: bytes) -> None:
    async def scenario(service: Embedded) -> None:
        huge = {"shapes": {"input": {"min": [1, 16, 8, 8], "opt": [1, 16, 8, 8], "max": [1 << 20, 16, 8, 8]}}}
        response = await service.submit(qdq_model, huge)
        assert response.status_code == 413, response.text
        assert response.json()["tensor"] == "input" and response.json()["shape"] == [1 << 20, 16, 8, 8]
        # the same model with a modest profile passes: the budget is per profile, not cached per model
        modest = {"shapes": {"input": {"min": [1, 16, 8, 8], "opt": [2, 16, 8, 8], "max": [4, 16, 8, 8]}}}
        accepted = await service.submit(qdq_model, modest)
        assert accepted.status_code == 202, accepted.text
        assert (await service.wait_done(accepted.json()["id"]))["status"] == "succeeded"

    run(tmp_path, scenario)


def test_total_bytes_budget_is_configurable(tmp_path: Path, qdq_model: bytes) -> None:
    async def scenario(service: Embedded) -> None:
        profile = {"shapes": {"input": {"min": [1, 16, 8, 8], "opt": [1, 16, 8, 8], "max": [1024, 16, 8, 8]}}}
        response = await service.submit(qdq_model, profile)  # input 4 MiB + weights, per tensor well under
        assert response.status_code == 413, response.text
        body = response.json()
        assert body["limit_bytes"] == 1 << 20 and body["bytes"] > 1 << 20 and body["largest"][0]["tensor"] == "input"
        assert "'input'" in body["detail"]
        assert (await service.submit(qdq_model)).status_code == 202  # batch 1: fits

    run(tmp_path, scenario, max_graph_bytes=1 << 20)


def test_budget_of_normal_models_is_small(qdq_model: bytes) -> None:
    from trtquant.service.jobs import BuildOptions

    tensors = service_app._budget_tensors(onnx.load_from_string(qdq_model), BuildOptions())
    by_name = {t.name: t for t in tensors}
    assert by_name["input"].shape == (1, 16, 8, 8) and by_name["conv.weight"].bytes == 16 * 16 * 9 * 4
    assert sum(t.bytes for t in tensors) < 1 << 20


# --------------------------------------------------------------------------- 5. float models


def test_float_model_needs_allow_float(tmp_path: Path) -> None:
    model = float_conv_model()

    async def scenario(service: Embedded) -> None:
        rejected = await service.submit(model)
        assert rejected.status_code == 422, rejected.text
        assert rejected.json()["detail"] == ("no QuantizeLinear/DequantizeLinear: quantize and export with trtquant "
                                             "first, or set allow_float=true")
        assert service.jobs() == [] and service.uploads() == []
        accepted = await service.submit(model, {"allow_float": True})
        assert accepted.status_code == 202, accepted.text
        job = await service.wait_done(accepted.json()["id"])
        assert job["status"] == "succeeded", job
        assert "allow_float" not in job["options"]  # not part of the cache key: it does not change the artifact

    run(tmp_path, scenario)


def test_quantized_model_needs_no_allow_float(tmp_path: Path, qdq_model: bytes) -> None:
    async def scenario(service: Embedded) -> None:
        accepted = await service.submit(qdq_model)
        assert accepted.status_code == 202, accepted.text
        assert (await service.wait_done(accepted.json()["id"]))["status"] == "succeeded"

    run(tmp_path, scenario)


# --------------------------------------------------------------------------- 6. serve --help


def test_serve_help_names_jobs_db(capsys: pytest.CaptureFixture[str]) -> None:
    from trtquant.cli.main import build_parser
    from trtquant.service.__main__ import main as service_main

    for show_help in (lambda: build_parser().parse_args(["serve", "--help"]), lambda: service_main(["--help"])):
        with pytest.raises(SystemExit):
            show_help()
        out = capsys.readouterr().out
        assert "jobs.db" in out and "jobs.sqlite" not in out


# --------------------------------------------------------------------------- artifact downloads and the cache


def test_download_streams_the_artifact_and_counts_as_a_use(tmp_path: Path, qdq_model: bytes) -> None:
    import hashlib

    async def scenario(service: Embedded) -> None:
        accepted = await service.submit(qdq_model)
        job = await service.wait_done(accepted.json()["id"])
        assert job["status"] == "succeeded", job
        conn = sqlite3.connect(f"file:{service.workdir / 'jobs.db'}?mode=ro", uri=True, timeout=10)
        try:
            before = conn.execute("SELECT last_used_at FROM artifacts").fetchone()[0]
            await asyncio.sleep(0.05)
            got = await service.client.get(f"/v1/builds/{job['id']}/artifact")
            after = conn.execute("SELECT last_used_at FROM artifacts").fetchone()[0]
        finally:
            conn.close()
        assert got.status_code == 200
        assert got.headers["x-artifact-sha256"] == hashlib.sha256(got.content).hexdigest()
        assert int(got.headers["content-length"]) == len(got.content) > 0
        assert "attachment" in got.headers["content-disposition"]
        assert after > before  # the download counts for least-recently-used eviction

    run(tmp_path, scenario)


def test_config_reaches_the_cache_and_the_watchdog(tmp_path: Path) -> None:
    async def scenario(service: Embedded) -> None:
        assert (await service.client.get("/healthz")).status_code == 200

    config = dict(lease_s=7.0, cache_max_bytes=1234, cache_max_age_s=56.0)
    built = {}
    real_manager, real_artifacts = service_app.BuildManager, service_app.ArtifactStore

    def manager(*args: Any, **kwargs: Any) -> Any:
        built["manager"] = kwargs
        return real_manager(*args, **kwargs)

    def artifacts(*args: Any, **kwargs: Any) -> Any:
        built["artifacts"] = kwargs
        return real_artifacts(*args, **kwargs)

    import unittest.mock

    with unittest.mock.patch.object(service_app, "BuildManager", manager), \
            unittest.mock.patch.object(service_app, "ArtifactStore", artifacts):
        run(tmp_path, scenario, **config)
    assert built["manager"]["lease_s"] == 7.0
    assert built["artifacts"] == {"cache_max_bytes": 1234, "cache_max_age_s": 56.0}


def test_serve_flags_reach_the_service_config() -> None:
    from trtquant.cli.main import build_parser, main
    from trtquant.service.__main__ import limits_from_args

    args = build_parser().parse_args(["serve", "--max-tensor-elements", "1000", "--max-graph-gb", "0.5",
                                      "--cache-max-gb", "0", "--cache-max-age-days", "2", "--lease-s", "9",
                                      "--upload-timeout-s", "3"])
    limits = limits_from_args(args)
    assert limits == {"upload_read_timeout_s": 3.0, "max_tensor_elements": 1000, "max_graph_bytes": 1 << 29,
                      "cache_max_bytes": None, "cache_max_age_s": 2 * 86400.0, "lease_s": 9.0}
    ServiceConfig(workdir=Path("unused"), **limits)  # every key is a config field
    defaults = limits_from_args(build_parser().parse_args(["serve"]))
    config = ServiceConfig(workdir=Path("unused"))
    assert all(getattr(config, k) == v for k, v in defaults.items()), (defaults, config)
    assert main(["serve", "--lease-s", "0"]) == 2  # a bad limit is a usage error, before anything starts
