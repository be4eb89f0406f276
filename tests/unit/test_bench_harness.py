"""trtquant.bench: trtexec statistics, the timing protocol on real ONNX Runtime and torch runs,
reports (JSON schema, markdown, PNG) and machine info. GPU-only cases are marked gpu."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from trtquant.bench import (
    BenchResult,
    UnstableLatencyWarning,
    benchmark,
    compute_stats,
    load_json,
    percentile_index,
    stability_warnings,
    to_markdown,
    write_report,
)
from trtquant.bench.harness import UNSTABLE_MESSAGE
from trtquant.bench.machine import collect_machine_info, parse_cpuinfo

FAST = {"warmup_s": 0.02, "duration_s": 0.05, "min_iterations": 5, "machine_info": False}


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Tiny().eval(), (torch.randn(1, 3, 8, 8),), str(path), input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False,
        )
    return path


@pytest.fixture(scope="module")
def static_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "static.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Tiny().eval(), (torch.randn(1, 3, 8, 8),), str(path), input_names=["x"], opset_version=17, dynamo=False)
    return path


def _ordered(stats: dict) -> bool:
    keys = ["min", "median", "p90", "p95", "p99", "max"]
    return all(stats[a] <= stats[b] for a, b in zip(keys, keys[1:])) and stats["min"] <= stats["mean"] <= stats["max"]


# --------------------------------------------------------------------------- statistics


def test_percentile_index_nearest_rank() -> None:
    # n - 1 - floor((1 - P/100) * n)
    assert percentile_index(10, 90) == 8  # floor(1.0) = 1 -> index 8 (9th value)
    assert percentile_index(10, 95) == 9  # floor(0.5) = 0
    assert percentile_index(100, 99) == 98  # exact arithmetic (trtexec's float32 gives 99)
    assert percentile_index(7, 50) == 3 and percentile_index(1, 99) == 0 and percentile_index(5, 0) == 0
    with pytest.raises(ValueError):
        percentile_index(10, 101)


def test_stats_hand_computed_even_n() -> None:
    stats = compute_stats([10, 1, 9, 2, 8, 3, 7, 4, 6, 5])  # 1..10, unsorted on purpose
    assert (stats.n, stats.min, stats.max, stats.mean) == (10, 1, 10, 5.5)
    assert stats.median == 5.5  # mean of the middle two (5, 6)
    assert stats.percentiles == {"p90": 9, "p95": 10, "p99": 10}
    assert stats.stddev == pytest.approx(2.8722813232690143)  # population stddev
    assert stats.cv_pct == pytest.approx(2.8722813232690143 / 5.5 * 100)
    assert stats["p90"] == 9 and stats["median"] == 5.5


def test_stats_hand_computed_odd_and_100() -> None:
    odd = compute_stats([3.0, 1.0, 2.0])
    assert odd.median == 2.0 and odd.percentiles == {"p90": 3.0, "p95": 3.0, "p99": 3.0}
    hundred = compute_stats(list(range(1, 101)))
    assert hundred.median == 50.5
    assert hundred.percentiles == {"p90": 90, "p95": 95, "p99": 99}
    custom = compute_stats(list(range(1, 21)), percentiles=(50, 75))
    assert custom.percentiles == {"p50": 10, "p75": 15}
    with pytest.raises(ValueError):
        compute_stats([])


def test_cv_warning_on_synthetic_samples() -> None:
    unstable = compute_stats([1.0, 1.0, 1.0, 1.5] * 5)  # CV ~20 %
    stable = compute_stats([1.00, 1.01, 0.99, 1.00] * 5)  # CV ~0.7 %
    messages = stability_warnings(unstable)
    assert len(messages) == 1 and messages[0].startswith(UNSTABLE_MESSAGE)
    assert "lock clocks / stop other load" in messages[0]
    assert stability_warnings(stable) == []
    assert stability_warnings(stable, cv_threshold_pct=0.5)  # threshold is configurable
    # GPU case: the CV of compute time decides; enqueue-bound and transfer-bound hints
    compute = compute_stats([1.0] * 10)
    hints = stability_warnings(compute, compute=compute, enqueue=compute_stats([0.9] * 10), h2d=compute_stats([2.0] * 10))
    assert any("enqueue" in h for h in hints) and any("host-to-device" in h for h in hints)


# --------------------------------------------------------------------------- real runs


def test_onnxruntime_run_protocol(tiny_onnx: Path) -> None:
    result = benchmark("onnxruntime", tiny_onnx, batch_sizes=(1, 4), device="cpu", intra_op_threads=1,
                       graph_optimization_level="basic", warmup_s=0.05, duration_s=0.2, min_iterations=5,
                       machine_info=False, cv_threshold_pct=1e9)
    assert isinstance(result, BenchResult) and result.config["providers"] == ["CPUExecutionProvider"]
    assert [r.batch_size for r in result.results] == [1, 4]
    for r in result.results:
        assert r.timing == "host_clock" and r.compute_ms is None
        assert r.walltime_s >= 0.2 and r.iterations >= 5  # duration honoured
        assert r.warmup_iterations >= 1 and r.warmup_s >= 0.05
        assert r.throughput == pytest.approx(r.iterations * r.batch_size / r.walltime_s)
        assert _ordered(r.latency_ms.to_dict())
    assert result.config["per_batch"]["4"]["input_shapes"] == {"x": [4, 3, 8, 8]}


def test_iteration_minimum_dominates_short_duration(tiny_onnx: Path) -> None:
    result = benchmark("onnxruntime", tiny_onnx, device="cpu", warmup_s=0.0, duration_s=0.0, min_iterations=25,
                       machine_info=False, cv_threshold_pct=1e9)
    assert result.results[0].iterations == 25  # both are minimums: stops as soon as both are met


def test_torch_backend_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    threads = torch.get_num_threads()
    result = benchmark("torch", _Tiny(), input_shape=(3, 8, 8), batch_sizes=(2,), device="cpu", intra_op_threads=1,
                       warmup_s=0.02, duration_s=0.1, min_iterations=5, machine_info=False, cv_threshold_pct=1e9)
    r = result.results[0]
    assert r.iterations >= 5 and r.walltime_s >= 0.1 and _ordered(r.latency_ms.to_dict())
    assert result.config["device"] == "cpu" and result.config["per_batch"]["2"]["input_shapes"] == {"input": [2, 3, 8, 8]}
    assert torch.get_num_threads() == threads  # restored


def test_unstable_run_warns(tiny_onnx: Path) -> None:
    with pytest.warns(UnstableLatencyWarning, match="latency is unstable: lock clocks / stop other load"):
        result = benchmark("onnxruntime", tiny_onnx, device="cpu", cv_threshold_pct=0.0, **FAST)
    assert result.warnings and result.warnings[0].startswith("batch 1: " + UNSTABLE_MESSAGE)


def test_bad_arguments(tiny_onnx: Path, static_onnx: Path) -> None:
    with pytest.raises(ValueError, match="unknown backend"):
        benchmark("tflite", tiny_onnx)
    with pytest.raises(ValueError, match="static batch of 1"):
        benchmark("onnxruntime", static_onnx, batch_sizes=(4,), device="cpu", **FAST)
    with pytest.raises(ValueError, match="needs input_shape"):
        benchmark("torch", _Tiny(), device="cpu", **FAST)
    with pytest.raises(ValueError, match="graph_optimization_level"):
        benchmark("onnxruntime", tiny_onnx, graph_optimization_level="max")
    with pytest.raises(TypeError, match="ONNX file path"):
        benchmark("onnxruntime", _Tiny())


# --------------------------------------------------------------------------- reports


@pytest.fixture(scope="module")
def small_result(tiny_onnx: Path) -> BenchResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnstableLatencyWarning)
        return benchmark("onnxruntime", tiny_onnx, batch_sizes=(1, 2, 8), device="cpu",
                         **{**FAST, "machine_info": True})


def test_json_schema(small_result: BenchResult, tmp_path: Path) -> None:
    path = small_result.to_json(tmp_path / "r.json")
    data = load_json(path)
    assert set(data) == {"schema_version", "created", "backend", "machine", "config", "results", "warnings"}
    assert data["schema_version"] == 1 and data["backend"] == "onnxruntime"
    for key in ("backend", "model", "device", "batch_sizes", "warmup_s", "duration_s", "min_iterations",
                "cuda_graph", "include_transfers", "percentiles"):
        assert key in data["config"], key
    assert {"cpu", "packages", "gpu", "jetson"} <= set(data["machine"])
    row = data["results"][0]
    assert {"batch_size", "iterations", "walltime_s", "throughput", "timing", "latency_ms", "compute_ms",
            "h2d_ms", "d2h_ms", "enqueue_ms", "warnings"} <= set(row)
    assert set(row["latency_ms"]) == {"n", "min", "max", "mean", "median", "p90", "p95", "p99", "stddev", "cv_pct"}
    assert row["latency_ms"]["n"] == row["iterations"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(ValueError, match="schema_version 99"):
        load_json(bad)


def test_markdown_table(small_result: BenchResult) -> None:
    text = to_markdown(small_result)
    assert text == small_result.to_markdown()
    table = [line for line in text.splitlines() if line.startswith("|")]
    header, separator, *rows = table
    assert header.count("|") == separator.count("|") == rows[0].count("|")
    assert "median ms" in header and "p99 ms" in header and "throughput" in header
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2", "8"]


def test_report_files_and_png(small_result: BenchResult, tmp_path: Path) -> None:
    paths = write_report(small_result, tmp_path / "out", stem="tiny")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["png"].stat().st_size > 5000
    assert load_json(paths["json"])["results"][2]["batch_size"] == 8
    assert paths["markdown"].read_text().count("\n| ") == 4  # separator + 3 batch rows
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tiny.json", "tiny.md", "tiny.png"]


# --------------------------------------------------------------------------- machine info


def test_parse_cpuinfo_x86_and_arm() -> None:
    x86 = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nphysical id\t: 0\ncore id\t: 0\n\n" \
          "processor\t: 1\nmodel name\t: AMD EPYC 7B13\nphysical id\t: 0\ncore id\t: 1\n"
    assert parse_cpuinfo(x86) == {"model": "AMD EPYC 7B13", "physical_cores": 2}
    arm = "processor\t: 0\nBogoMIPS\t: 62.50\nCPU part\t: 0xd42\n\nModel\t: NVIDIA Jetson AGX Orin\n"
    assert parse_cpuinfo(arm) == {"model": "NVIDIA Jetson AGX Orin", "physical_cores": None}


def test_collect_machine_info() -> None:
    info = collect_machine_info("cpu")
    assert info["cpu"]["logical_cores"] >= 1 and info["gpu"] is None
    assert info["packages"]["torch"] and info["packages"]["python"]
    assert "onnxruntime" in info["packages"] and "tensorrt" in info["packages"]
    json.dumps(info)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_torch_backend_gpu_events_graph_and_transfers() -> None:
    result = benchmark("torch", _Tiny(), input_shape=(3, 8, 8), batch_sizes=(1, 4), device="cuda", cuda_graph=True,
                       include_transfers=True, warmup_s=0.05, duration_s=0.2, min_iterations=10, cv_threshold_pct=1e9)
    for r in result.results:
        assert r.timing == "cuda_events"
        assert r.compute_ms is not None and r.h2d_ms is not None and r.d2h_ms is not None and r.enqueue_ms is not None
        assert r.latency_ms.mean == pytest.approx(r.h2d_ms.mean + r.compute_ms.mean + r.d2h_ms.mean, rel=1e-6)
        assert _ordered(r.latency_ms.to_dict()) and r.walltime_s >= 0.2
    assert result.config["per_batch"]["4"]["cuda_graph_captured"] is True
    assert result.machine["gpu"]["name"]
    eager = benchmark("torch", _Tiny(), input_shape=(3, 8, 8), device="cuda", warmup_s=0.02, duration_s=0.05,
                      min_iterations=5, machine_info=False, cv_threshold_pct=1e9)
    assert eager.results[0].h2d_ms is None and eager.results[0].latency_ms.n == eager.results[0].compute_ms.n
