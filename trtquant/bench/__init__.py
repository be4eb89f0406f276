"""Latency/throughput benchmarks of TensorRT engines, ONNX Runtime and PyTorch with trtexec statistics."""

from trtquant.bench.harness import (
    BACKENDS,
    BatchResult,
    BenchResult,
    LatencyStats,
    UnstableLatencyWarning,
    benchmark,
    compute_stats,
    percentile_index,
    stability_warnings,
)
from trtquant.bench.machine import collect_machine_info
from trtquant.bench.report import load_json, plot, to_markdown, write_json, write_markdown, write_report

__all__ = [
    "BACKENDS",
    "BatchResult",
    "BenchResult",
    "LatencyStats",
    "UnstableLatencyWarning",
    "benchmark",
    "collect_machine_info",
    "compute_stats",
    "load_json",
    "percentile_index",
    "plot",
    "stability_warnings",
    "to_markdown",
    "write_json",
    "write_markdown",
    "write_report",
]
