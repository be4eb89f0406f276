"""One latency/throughput harness for TensorRT engines, ONNX Runtime and PyTorch.

Protocol (trtexec's, ``samples/common/sampleOptions.h`` and ``sampleReporting.cpp``):

* warm up for ``warmup_s`` (at least one run), excluded from the statistics;
* then run until *both* ``duration_s`` has elapsed *and* ``min_iterations`` were done;
* statistics: min / max / mean / median (even n: mean of the two middle values) and
  percentiles by nearest rank, index ``n - 1 - floor((1 - P/100) * n)`` of the sorted list;
* throughput = iterations x batch / host walltime of the timed loop;
* coefficient of variation (population stddev / mean) above 2.5 % -> "latency is unstable".

On a GPU the primary latency is the GPU compute time from CUDA events recorded on the
inference stream; with ``include_transfers=True`` each query also copies its inputs from
pinned host memory and its outputs back, timed separately (H2D, D2H) and added to the
latency (trtexec: Latency = H2D + GPU Compute + D2H). One query is in flight at a time.
On the CPU (and for ONNX Runtime, whose ``run`` blocks) the host clock times each run.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from trtquant.bench import report as _report
from trtquant.bench.machine import collect_machine_info
from trtquant.engine.build import metadata_path_for
from trtquant.outputs import output_tensors

__all__ = [
    "BACKENDS",
    "CV_WARNING_PCT",
    "BatchResult",
    "BenchResult",
    "LatencyStats",
    "UnstableLatencyWarning",
    "benchmark",
    "compute_stats",
    "percentile_index",
    "stability_warnings",
]

_LOG = logging.getLogger("trtquant.bench")

BACKENDS = ("tensorrt", "onnxruntime", "torch")
DEFAULT_PERCENTILES = (90.0, 95.0, 99.0)
CV_WARNING_PCT = 2.5
UNSTABLE_MESSAGE = "latency is unstable: lock clocks / stop other load"
ORT_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}

InputShape = Union[Sequence[int], Mapping[str, Sequence[int]]]


class UnstableLatencyWarning(RuntimeWarning):
    """The latency's coefficient of variation exceeded the threshold."""


# --------------------------------------------------------------------------- statistics


def percentile_index(n: int, percentile: float) -> int:
    """trtexec's nearest-rank index into an ascending list of ``n`` samples.

    ``max(n - 1 - floor((1 - P/100) * n), 0)``, computed exactly (trtexec evaluates it in
    float32, which for a few (P, n) pairs such as P=99, n=100 lands one rank higher).
    """
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile {percentile} is not in [0, 100]")
    if n <= 0:
        raise ValueError("no samples")
    exclude = math.floor((1 - Fraction(str(percentile)) / 100) * n)
    return max(n - 1 - exclude, 0)


def _pct_key(percentile: float) -> str:
    return f"p{percentile:g}"


@dataclass(frozen=True)
class LatencyStats:
    """Summary of per-query times in milliseconds (trtexec's PerformanceResult plus stddev/CV)."""

    n: int
    min: float
    max: float
    mean: float
    median: float
    percentiles: dict[str, float]
    stddev: float
    cv_pct: float

    def __getitem__(self, key: str) -> float:
        """``stats["p99"]``, ``stats["median"]``..."""
        if key in self.percentiles:
            return self.percentiles[key]
        value = getattr(self, key)
        return float(value)

    def to_dict(self) -> dict[str, float]:
        return {
            "n": self.n,
            "min": self.min,
            "max": self.max,
            "mean": self.mean,
            "median": self.median,
            **self.percentiles,
            "stddev": self.stddev,
            "cv_pct": self.cv_pct,
        }


def compute_stats(samples_ms: Sequence[float], percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> LatencyStats:
    """trtexec statistics of a list of times (any order).

    Raises:
        ValueError: empty ``samples_ms`` or a percentile outside [0, 100].
    """
    values = sorted(float(v) for v in samples_ms)
    n = len(values)
    if n == 0:
        raise ValueError("compute_stats needs at least one sample")
    mid = n // 2
    median = values[mid] if n % 2 else (values[mid - 1] + values[mid]) / 2
    mean = sum(values) / n
    stddev = math.sqrt(sum((v - mean) ** 2 for v in values) / n)  # population, as trtexec
    cv = stddev / mean * 100 if mean != 0 else math.inf
    return LatencyStats(
        n=n,
        min=values[0],
        max=values[-1],
        mean=mean,
        median=median,
        percentiles={_pct_key(p): values[percentile_index(n, p)] for p in percentiles},
        stddev=stddev,
        cv_pct=cv,
    )


def stability_warnings(
    latency: LatencyStats,
    *,
    compute: LatencyStats | None = None,
    enqueue: LatencyStats | None = None,
    h2d: LatencyStats | None = None,
    d2h: LatencyStats | None = None,
    cv_threshold_pct: float = CV_WARNING_PCT,
) -> list[str]:
    """trtexec's end-of-run warnings for one measurement.

    CV of the GPU compute time (or the latency when there is none) above
    ``cv_threshold_pct``; enqueue time above 0.8 x compute (host-bound: try CUDA graphs);
    transfers at least as long as compute (transfer-bound).
    """
    out = []
    basis = compute or latency
    if basis.cv_pct > cv_threshold_pct:
        out.append(
            f"{UNSTABLE_MESSAGE} (coefficient of variation {basis.cv_pct:.1f}% > {cv_threshold_pct:g}%; "
            "on a GPU: nvidia-smi -lgc <clock>, on Jetson: nvpmodel -m 0 && jetson_clocks)"
        )
    if compute is not None and enqueue is not None and enqueue.median > 0.8 * compute.median:
        out.append("throughput may be bound by enqueue (host) time rather than GPU compute; try cuda_graph=True")
    if compute is not None and h2d is not None and h2d.median >= compute.median:
        out.append("throughput may be bound by host-to-device input copies rather than GPU compute")
    if compute is not None and d2h is not None and d2h.median >= compute.median:
        out.append("throughput may be bound by device-to-host output copies rather than GPU compute")
    return out


# --------------------------------------------------------------------------- results


@dataclass
class BatchResult:
    """Measurements at one batch size.

    Attributes:
        latency_ms: per-query latency: GPU compute (+ H2D + D2H with transfers) on a GPU,
            host time per run otherwise.
        compute_ms, h2d_ms, d2h_ms, enqueue_ms: GPU breakdown (CUDA events; enqueue is
            host time to launch); ``None`` when not measured.
        throughput: samples per second = iterations x batch / walltime_s.
        timing: ``"cuda_events"`` or ``"host_clock"``.
    """

    batch_size: int
    iterations: int
    walltime_s: float
    throughput: float
    latency_ms: LatencyStats
    timing: str
    warmup_iterations: int
    warmup_s: float
    compute_ms: LatencyStats | None = None
    h2d_ms: LatencyStats | None = None
    d2h_ms: LatencyStats | None = None
    enqueue_ms: LatencyStats | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "iterations": self.iterations,
            "walltime_s": self.walltime_s,
            "throughput": self.throughput,
            "timing": self.timing,
            "warmup_iterations": self.warmup_iterations,
            "warmup_s": self.warmup_s,
            "latency_ms": self.latency_ms.to_dict(),
            "compute_ms": None if self.compute_ms is None else self.compute_ms.to_dict(),
            "h2d_ms": None if self.h2d_ms is None else self.h2d_ms.to_dict(),
            "d2h_ms": None if self.d2h_ms is None else self.d2h_ms.to_dict(),
            "enqueue_ms": None if self.enqueue_ms is None else self.enqueue_ms.to_dict(),
            "warnings": list(self.warnings),
        }


@dataclass
class BenchResult:
    """A benchmark: config, machine and one :class:`BatchResult` per batch size."""

    backend: str
    config: dict[str, Any]
    machine: dict[str, Any]
    results: list[BatchResult]
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat())

    @property
    def warnings(self) -> list[str]:
        return [f"batch {r.batch_size}: {w}" for r in self.results for w in r.warnings]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": _report.SCHEMA_VERSION,
            "created": self.created,
            "backend": self.backend,
            "machine": self.machine,
            "config": self.config,
            "results": [r.to_dict() for r in self.results],
            "warnings": self.warnings,
        }

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        return _report.write_json(self.to_dict(), path)

    def to_markdown(self) -> str:
        return _report.to_markdown(self.to_dict())

    def plot(self, path: str | os.PathLike[str]) -> Path:
        return _report.plot(self.to_dict(), path)


# --------------------------------------------------------------------------- workloads


@dataclass
class _Workload:
    """How to run one query: ``compute`` (enqueue on ``stream``, or a blocking run when
    ``stream`` is None), plus optional transfer steps on the same stream."""

    compute: Callable[[], Any]
    stream: torch.cuda.Stream | None = None
    h2d: Callable[[], Any] | None = None
    d2h: Callable[[], Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    close: Callable[[], None] = lambda: None


def _shape_for(
    name: str, model_dims: Sequence[int | None], batch: int, input_shape: InputShape | None,
    fallback: Sequence[int] | None = None,
) -> tuple[int, ...]:
    """The shape to feed one input at ``batch``.

    ``model_dims`` is the model's shape with ``None`` for dynamic dimensions; dimension 0 is
    the batch. Other dynamic dimensions come from ``input_shape`` (per-sample shape, or
    ``{name: shape}``), else from ``fallback`` (a full shape, e.g. an engine profile's opt).
    """
    dims = list(model_dims)
    if not dims:
        raise ValueError(f"input '{name}' is a scalar; the harness needs a batch dimension")
    if dims[0] is not None and dims[0] != batch:
        raise ValueError(
            f"input '{name}' has a static batch of {dims[0]}; it cannot run batch {batch}: "
            "export/build with a dynamic batch dimension (and max_shapes) to sweep batch sizes."
        )
    rest = dims[1:]
    per_sample = input_shape.get(name) if isinstance(input_shape, Mapping) else input_shape
    if per_sample is not None:
        per_sample = [int(d) for d in per_sample]
        if len(per_sample) != len(rest) or any(m is not None and m != g for m, g in zip(rest, per_sample)):
            raise ValueError(
                f"input_shape for '{name}' is {tuple(per_sample)} but the model input is "
                f"{tuple('?' if d is None else d for d in dims)} (per-sample shape excludes the batch)"
            )
        rest = list(per_sample)
    elif fallback is not None:
        rest = [d if d is not None else int(f) for d, f in zip(rest, list(fallback)[1:])]
    if any(d is None or d <= 0 for d in rest):
        raise ValueError(
            f"input '{name}' {tuple('?' if d is None else d for d in dims)} has dynamic non-batch "
            f"dimensions; pass input_shape={{'{name}': (...)}} with the per-sample shape."
        )
    return (batch, *[int(d) for d in rest if d is not None])


def _random_tensor(shape: Sequence[int], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(tuple(shape), generator=generator).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, tuple(shape), generator=generator).bool()
    return torch.randint(0, 8, tuple(shape), generator=generator).to(dtype)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch.cuda.is_available() is False on this machine")
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def _gpu_transfers(
    stream: torch.cuda.Stream, device_inputs: Sequence[torch.Tensor], device_outputs: Callable[[], Sequence[torch.Tensor]]
) -> tuple[Callable[[], None], Callable[[], None]]:
    """H2D from pinned host copies of the inputs, D2H into pinned host buffers, both on ``stream``."""
    host_inputs = [t.cpu().pin_memory() for t in device_inputs]
    host_outputs: list[torch.Tensor] = []

    def h2d() -> None:
        with torch.cuda.stream(stream):
            for dst, src in zip(device_inputs, host_inputs):
                dst.copy_(src, non_blocking=True)

    def d2h() -> None:
        outs = list(device_outputs())
        if len(host_outputs) != len(outs) or any(h.shape != o.shape for h, o in zip(host_outputs, outs)):
            host_outputs[:] = [torch.empty(o.shape, dtype=o.dtype, pin_memory=True) for o in outs]
        with torch.cuda.stream(stream):
            for dst, src in zip(host_outputs, outs):
                dst.copy_(src, non_blocking=True)

    return h2d, d2h


def _tensorrt_workload(
    runner: Any, batch: int, *, input_shape: InputShape | None, device: torch.device, cuda_graph: bool,
    include_transfers: bool, generator: torch.Generator,
) -> _Workload:
    feed = {}
    for spec in runner.inputs:
        dims = [d if d >= 0 else None for d in spec.shape]
        fallback = None if spec.profile is None else spec.profile[1]
        shape = _shape_for(spec.name, dims, batch, input_shape, fallback)
        feed[spec.name] = _random_tensor(shape, spec.dtype, generator).to(device)
    outputs = runner.bind(feed)
    captured = runner.capture_cuda_graph() if cuda_graph else False
    h2d = d2h = None
    if include_transfers:
        h2d, d2h = _gpu_transfers(runner.stream, list(feed.values()), lambda: list(outputs.values()))
    return _Workload(
        compute=runner.enqueue, stream=runner.stream, h2d=h2d, d2h=d2h,
        info={"cuda_graph_captured": captured, "input_shapes": {k: list(v.shape) for k, v in feed.items()}},
    )


def _ort_workload(
    session: Any, batch: int, *, input_shape: InputShape | None, generator: torch.Generator
) -> _Workload:
    type_map = {
        "tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
        "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(int8)": torch.int8,
        "tensor(uint8)": torch.uint8, "tensor(bool)": torch.bool,
    }
    feed: dict[str, np.ndarray] = {}
    for arg in session.get_inputs():
        if arg.type not in type_map:
            raise TypeError(f"ONNX input '{arg.name}' has type {arg.type}; the harness feeds {', '.join(type_map)}")
        dims = [d if isinstance(d, int) and d > 0 else None for d in arg.shape]
        shape = _shape_for(arg.name, dims, batch, input_shape)
        feed[arg.name] = _random_tensor(shape, type_map[arg.type], generator).numpy()
    output_names = [o.name for o in session.get_outputs()]
    return _Workload(
        compute=lambda: session.run(output_names, feed),
        info={"input_shapes": {k: list(v.shape) for k, v in feed.items()}},
    )


def _torch_workload(
    model: torch.nn.Module, batch: int, *, input_shape: InputShape | None, dtype: torch.dtype, device: torch.device,
    cuda_graph: bool, include_transfers: bool, generator: torch.Generator,
) -> _Workload:
    if input_shape is None:
        raise ValueError("the torch backend needs input_shape: the per-sample shape, e.g. (3, 224, 224)")
    names = list(input_shape) if isinstance(input_shape, Mapping) else ["input"]
    inputs = {}
    for name in names:
        per_sample = input_shape[name] if isinstance(input_shape, Mapping) else input_shape
        shape = _shape_for(name, [None, *[int(d) for d in per_sample]], batch, input_shape)
        inputs[name] = _random_tensor(shape, dtype, generator).to(device)

    def forward() -> Any:
        if isinstance(input_shape, Mapping):
            return model(**inputs)
        return model(inputs["input"])

    if device.type != "cuda":
        return _Workload(compute=forward, info={"input_shapes": {k: list(v.shape) for k, v in inputs.items()}})

    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    state: dict[str, Any] = {}
    with torch.cuda.stream(stream):
        for _ in range(3):  # side-stream warm-up before capture, as torch.cuda.graphs requires
            state["out"] = forward()
    stream.synchronize()
    captured = False
    graph: torch.cuda.CUDAGraph | None = None
    if cuda_graph:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=stream):
                state["out"] = forward()
            captured = True
        except Exception as exc:  # capture is an optimisation; fall back to eager
            _LOG.warning("CUDA graph capture of the torch model failed (%s); timing eager launches", exc)
            graph = None

    def compute() -> None:
        with torch.cuda.stream(stream):
            if graph is not None:
                graph.replay()
            else:
                state["out"] = forward()

    def outputs() -> list[torch.Tensor]:
        # Any structure (segmentation dicts, detector lists of dicts, namedtuples): every tensor leaf.
        return output_tensors(state["out"])

    h2d = d2h = None
    if include_transfers:
        h2d, d2h = _gpu_transfers(stream, list(inputs.values()), outputs)
    return _Workload(
        compute=compute, stream=stream, h2d=h2d, d2h=d2h,
        info={"cuda_graph_captured": captured, "input_shapes": {k: list(v.shape) for k, v in inputs.items()}},
    )


# --------------------------------------------------------------------------- timing loop


@dataclass
class _Trace:
    latency: list[float]
    compute: list[float] | None
    h2d: list[float] | None
    d2h: list[float] | None
    enqueue: list[float] | None
    walltime_s: float
    warmup_iterations: int
    warmup_s: float


def _measure(work: _Workload, warmup_s: float, duration_s: float, min_iterations: int) -> _Trace:
    stream = work.stream
    # Warm-up by time (at least one run: lazy initialisation, torch.compile, ORT arena growth).
    warm_n, t0 = 0, time.perf_counter()
    while warm_n == 0 or time.perf_counter() - t0 < warmup_s:
        if work.h2d is not None:
            work.h2d()
        work.compute()
        if work.d2h is not None:
            work.d2h()
        if stream is not None:
            stream.synchronize()
        warm_n += 1
    warm_elapsed = time.perf_counter() - t0

    latency: list[float] = []
    if stream is None:
        start = time.perf_counter()
        while True:
            a = time.perf_counter()
            work.compute()
            latency.append((time.perf_counter() - a) * 1e3)
            if len(latency) >= min_iterations and time.perf_counter() - start >= duration_s:
                break
        return _Trace(latency, None, None, None, None, time.perf_counter() - start, warm_n, warm_elapsed)

    events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    compute: list[float] = []
    h2d: list[float] = []
    d2h: list[float] = []
    enqueue: list[float] = []
    start = time.perf_counter()
    while True:
        events[0].record(stream)
        if work.h2d is not None:
            work.h2d()
        events[1].record(stream)
        a = time.perf_counter()
        work.compute()
        enqueue.append((time.perf_counter() - a) * 1e3)
        events[2].record(stream)
        if work.d2h is not None:
            work.d2h()
        events[3].record(stream)
        events[3].synchronize()
        h, c, d = events[0].elapsed_time(events[1]), events[1].elapsed_time(events[2]), events[2].elapsed_time(events[3])
        h2d.append(h)
        compute.append(c)
        d2h.append(d)
        latency.append(h + c + d if work.h2d is not None else c)
        if len(latency) >= min_iterations and time.perf_counter() - start >= duration_s:
            break
    walltime = time.perf_counter() - start
    with_copies = work.h2d is not None
    return _Trace(
        latency, compute, h2d if with_copies else None, d2h if with_copies else None, enqueue, walltime, warm_n, warm_elapsed
    )


# --------------------------------------------------------------------------- entry point


def benchmark(
    backend: str,
    model: str | os.PathLike[str] | torch.nn.Module,
    *,
    input_shape: InputShape | None = None,
    batch_sizes: Sequence[int] = (1,),
    warmup_s: float = 0.2,
    duration_s: float = 3.0,
    min_iterations: int = 10,
    cuda_graph: bool = False,
    include_transfers: bool = False,
    device: str | torch.device | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    cv_threshold_pct: float = CV_WARNING_PCT,
    intra_op_threads: int | None = None,
    graph_optimization_level: str = "all",
    torch_compile: bool | str = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    machine_info: bool = True,
) -> BenchResult:
    """Measure latency and throughput of one model on one backend at several batch sizes.

    Args:
        backend: ``"tensorrt"`` (``model`` = engine path; needs TensorRT and a GPU),
            ``"onnxruntime"`` (``model`` = ONNX path; CPU, or CUDA where the CUDA
            execution provider is installed), or ``"torch"`` (``model`` = ``nn.Module``,
            moved to ``device`` and cast to a floating ``dtype`` in place; eager or
            ``torch.compile``).
        input_shape: per-sample input shape without the batch dimension, e.g.
            ``(3, 224, 224)``, or ``{input name: shape}`` for several inputs. Required
            for torch; for engines/ONNX only when non-batch dimensions are dynamic.
        batch_sizes: batch sizes to sweep (dimension 0 of every input).
        warmup_s: warm-up time per batch size (at least one run).
        duration_s, min_iterations: the timed loop runs until both are reached.
        cuda_graph: capture one query into a CUDA graph and replay it (tensorrt, torch on GPU).
        include_transfers: per query, copy inputs host->device and outputs device->host
            (pinned memory) and include them in the latency (trtexec 10.x default; 11.x
            and this harness default to compute only).
        device: ``"cuda"``, ``"cuda:1"`` or ``"cpu"``; default CUDA when available. For
            onnxruntime, ``"cpu"`` forces the CPU provider.
        percentiles: percentiles to report (trtexec default 90, 95, 99).
        cv_threshold_pct: coefficient of variation that triggers the unstable warning.
        intra_op_threads: ONNX Runtime ``intra_op_num_threads``; for torch on the CPU,
            ``torch.set_num_threads`` during the run (restored after).
        graph_optimization_level: ONNX Runtime: ``"disable"``, ``"basic"``, ``"extended"``, ``"all"``.
        torch_compile: ``True`` or a mode string (``"max-autotune"``...) to ``torch.compile``.
        dtype: floating input dtype for the torch backend (engines/ONNX use their own types).
        seed: seed of the random inputs.
        machine_info: collect CPU/GPU/package info into the result.

    Returns:
        A :class:`BenchResult`; ``.to_json()``, ``.to_markdown()`` and ``.plot()`` report it.

    Warns:
        UnstableLatencyWarning: a batch's latency CV exceeded ``cv_threshold_pct``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if not batch_sizes or any(int(b) <= 0 for b in batch_sizes):
        raise ValueError(f"batch_sizes={tuple(batch_sizes)} must be positive integers")
    if warmup_s < 0 or duration_s < 0 or min_iterations < 1:
        raise ValueError("warmup_s and duration_s must be >= 0 and min_iterations >= 1")
    for p in percentiles:
        percentile_index(1, p)  # validates the range
    if graph_optimization_level not in ORT_OPT_LEVELS:
        raise ValueError(f"graph_optimization_level={graph_optimization_level!r}; known: {', '.join(ORT_OPT_LEVELS)}")

    generator = torch.Generator().manual_seed(seed)
    config: dict[str, Any] = {
        "backend": backend,
        "batch_sizes": [int(b) for b in batch_sizes],
        "input_shape": _jsonable_shape(input_shape),
        "warmup_s": warmup_s,
        "duration_s": duration_s,
        "min_iterations": min_iterations,
        "cuda_graph": cuda_graph,
        "include_transfers": include_transfers,
        "percentiles": list(percentiles),
        "cv_threshold_pct": cv_threshold_pct,
        "seed": seed,
    }
    make_work: Callable[[int], _Workload]
    cleanup: Callable[[], None] = lambda: None
    machine_device: str | int | None = None

    if backend == "tensorrt":
        from trtquant.engine.runtime import TrtRunner

        if not isinstance(model, (str, os.PathLike)):
            raise TypeError("the tensorrt backend takes an engine path")
        engine_path = Path(model)
        dev = _resolve_device(device if device is not None else "cuda")
        runner = TrtRunner(engine_path, device=dev)
        machine_device = dev.index
        config.update(model=str(engine_path), device=str(dev), engine_metadata=_read_json(metadata_path_for(engine_path)))
        make_work = lambda b: _tensorrt_workload(  # noqa: E731
            runner, b, input_shape=input_shape, device=dev, cuda_graph=cuda_graph,
            include_transfers=include_transfers, generator=generator,
        )
        cleanup = runner.close
    elif backend == "onnxruntime":
        import onnxruntime as ort

        if not isinstance(model, (str, os.PathLike)):
            raise TypeError("the onnxruntime backend takes an ONNX file path")
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_OPT_LEVELS[graph_optimization_level])
        if intra_op_threads is not None:
            options.intra_op_num_threads = int(intra_op_threads)
        available = ort.get_available_providers()
        want_cuda = device is None or str(device).startswith("cuda")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda and "CUDAExecutionProvider" in available else ["CPUExecutionProvider"]
        if device is not None and str(device).startswith("cuda") and providers[0] != "CUDAExecutionProvider":
            raise ValueError(f"device={device!r} but onnxruntime has no CUDAExecutionProvider (available: {available}); pip install onnxruntime-gpu")
        session = ort.InferenceSession(str(model), sess_options=options, providers=providers)
        config.update(
            model=str(model), device="cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu",
            providers=session.get_providers(), intra_op_threads=intra_op_threads,
            graph_optimization_level=graph_optimization_level,
        )
        machine_device = "cpu" if config["device"] == "cpu" else None
        make_work = lambda b: _ort_workload(session, b, input_shape=input_shape, generator=generator)  # noqa: E731
    else:
        if not isinstance(model, torch.nn.Module):
            raise TypeError("the torch backend takes an nn.Module")
        dev = _resolve_device(device)
        module: Any = model.eval().to(dev)
        if dtype.is_floating_point and dtype != torch.float32:
            module = module.to(dtype)
        if torch_compile:
            module = torch.compile(module, mode=torch_compile if isinstance(torch_compile, str) else None)
        previous_threads = torch.get_num_threads()
        if intra_op_threads is not None and dev.type == "cpu":
            torch.set_num_threads(int(intra_op_threads))
            cleanup = lambda: torch.set_num_threads(previous_threads)  # noqa: E731
        machine_device = dev.index if dev.type == "cuda" else "cpu"
        config.update(
            model=type(model).__name__, device=str(dev), dtype=str(dtype).replace("torch.", ""),
            torch_compile=torch_compile, intra_op_threads=intra_op_threads if dev.type == "cpu" else None,
        )
        make_work = lambda b: _torch_workload(  # noqa: E731
            module, b, input_shape=input_shape, dtype=dtype, device=dev, cuda_graph=cuda_graph,
            include_transfers=include_transfers, generator=generator,
        )

    results = []
    try:
        with torch.inference_mode():
            for batch in [int(b) for b in batch_sizes]:
                work = make_work(batch)
                try:
                    trace = _measure(work, warmup_s, duration_s, min_iterations)
                finally:
                    work.close()
                results.append(_batch_result(batch, trace, work, percentiles, cv_threshold_pct))
                if work.info:
                    config.setdefault("per_batch", {})[str(batch)] = work.info
    finally:
        cleanup()
    for r in results:
        for message in r.warnings:
            if message.startswith(UNSTABLE_MESSAGE):
                warnings.warn(f"batch {r.batch_size}: {message}", UnstableLatencyWarning, stacklevel=2)
    machine = collect_machine_info(machine_device) if machine_info else {}
    return BenchResult(backend=backend, config=config, machine=machine, results=results)


def _batch_result(batch: int, trace: _Trace, work: _Workload, percentiles: Sequence[float], cv: float) -> BatchResult:
    latency = compute_stats(trace.latency, percentiles)
    compute = None if trace.compute is None else compute_stats(trace.compute, percentiles)
    h2d = None if trace.h2d is None else compute_stats(trace.h2d, percentiles)
    d2h = None if trace.d2h is None else compute_stats(trace.d2h, percentiles)
    enqueue = None if trace.enqueue is None else compute_stats(trace.enqueue, percentiles)
    graph_used = bool(work.info.get("cuda_graph_captured"))
    return BatchResult(
        batch_size=batch,
        iterations=len(trace.latency),
        walltime_s=trace.walltime_s,
        throughput=len(trace.latency) * batch / trace.walltime_s if trace.walltime_s > 0 else math.inf,
        latency_ms=latency,
        timing="cuda_events" if work.stream is not None else "host_clock",
        warmup_iterations=trace.warmup_iterations,
        warmup_s=trace.warmup_s,
        compute_ms=compute,
        h2d_ms=h2d,
        d2h_ms=d2h,
        enqueue_ms=enqueue,
        warnings=stability_warnings(
            latency, compute=compute, enqueue=None if graph_used else enqueue, h2d=h2d, d2h=d2h, cv_threshold_pct=cv
        ),
    )


def _jsonable_shape(shape: InputShape | None) -> Any:
    if shape is None:
        return None
    if isinstance(shape, Mapping):
        return {k: [int(d) for d in v] for k, v in shape.items()}
    return [int(d) for d in shape]


def _read_json(path: Path) -> Any:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
