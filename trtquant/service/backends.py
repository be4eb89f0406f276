"""Build backends of the service: TensorRT when it is usable, ONNX Runtime (CPU) otherwise.

A backend turns a validated Q/DQ ONNX file into one artifact file in a scratch folder and
returns what the report needs. It never publishes anything: :mod:`trtquant.service.jobs`
moves the artifact into the content-addressed store once the build has succeeded.

* :class:`TensorRTBackend` calls :func:`trtquant.engine.build.build_engine` (strongly typed
  Q/DQ builds; weakly typed ``int8+fp16`` on TensorRT 10.x for ``precision='fp16'``/``'best'``)
  and reports per-layer precision from the engine inspector. Chosen when ``tensorrt`` imports
  *and* a ``trt.Builder`` can be created (a usable GPU). Its results are always real
  TensorRT results.
* :class:`OnnxRuntimeBackend` writes ONNX Runtime's optimized graph
  (``SessionOptions.optimized_model_filepath`` with ``ORT_ENABLE_EXTENDED``: Q/DQ fused into
  QLinear kernels, no hardware-specific NCHWc layouts) and checks it against the uploaded
  model on a random input. Precision, workspace and target do not change the ORT graph
  (the Q/DQ nodes decide INT8); they are still part of the cache key.

``TRTQUANT_SERVICE_BACKEND=auto|tensorrt|onnxruntime`` (or ``select_backend(prefer=...)``)
forces one; ``tensorrt`` fails at start-up when TensorRT is not usable.
"""

from __future__ import annotations

import importlib
import logging
import math
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Backend",
    "BackendUnavailable",
    "BuildOutput",
    "OnnxRuntimeBackend",
    "ReferenceInputTooLarge",
    "TensorRTBackend",
    "gpu_name",
    "select_backend",
    "trt_build_kwargs",
]

_LOG = logging.getLogger("trtquant.service")

#: Environment variable that forces a backend (``auto``, ``tensorrt`` or ``onnxruntime``).
BACKEND_ENV = "TRTQUANT_SERVICE_BACKEND"

LogFn = Callable[[str], None]


#: Default byte budget of the random inputs of the ONNX Runtime reference (parity) run.
DEFAULT_REFERENCE_INPUT_BUDGET_BYTES = 1 << 30


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on this machine."""


class ReferenceInputTooLarge(ValueError):
    """The reference run's inputs would exceed the byte budget (refused before allocating)."""


@dataclass
class BuildOutput:
    """What one backend build produced (the artifact is still in the scratch folder)."""

    artifact_path: Path
    layers: dict[str, Any] | None = None  # LayerReport.to_dict() (TensorRT only)
    metadata: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] | None = None  # ORT: optimized vs uploaded model on one random input


class Backend:
    """Interface of a build backend."""

    name: str = "?"
    version: str = "?"
    device: str = "cpu"
    artifact_suffix: str = ".bin"
    media_type: str = "application/octet-stream"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "device": self.device}

    def build(self, onnx_path: Path, options: Mapping[str, Any], inputs: Mapping[str, list[Any]],
              out_dir: Path, log: LogFn) -> BuildOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def benchmark(self, artifact_path: Path, options: Mapping[str, Any], inputs: Mapping[str, list[Any]],
                  duration_s: float) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError


# --------------------------------------------------------------------------- helpers


def gpu_name() -> str | None:
    """Name (and SM) of the CUDA device, via torch; Jetson's device-tree model as a fallback."""
    try:
        from trtquant.engine._trt import cuda_device_info

        info = cuda_device_info()
    except Exception:  # torch missing or broken CUDA: not fatal for the service
        info = None
    if info:
        return f"{info['name']} (sm {info['compute_capability']})"
    model = Path("/proc/device-tree/model")
    try:
        text = model.read_text(errors="replace").strip("\x00 \n")
        if text:
            return text
    except OSError:
        pass
    return None


def _benchmark_shapes(options: Mapping[str, Any], inputs: Mapping[str, list[Any]]) -> tuple[dict[str, list[int]] | None, int]:
    """Per-sample input shapes and the batch for the harness: the profiles' opt, else the ONNX's static dims."""
    shapes = options.get("shapes") or {}
    per_sample: dict[str, list[int]] = {}
    batch = None
    for name, dims in inputs.items():
        if name in shapes:
            opt = [int(d) for d in shapes[name]["opt"]]
        else:
            opt = [d if isinstance(d, int) and d > 0 else 1 for d in dims]
        if not opt:
            continue
        batch = opt[0] if batch is None else batch
        per_sample[name] = opt[1:]
    return (per_sample or None), int(batch or 1)


def _harness_benchmark(backend: str, artifact: Path, options: Mapping[str, Any], inputs: Mapping[str, list[Any]],
                       duration_s: float, **kwargs: Any) -> dict[str, Any]:
    from trtquant.bench.harness import benchmark

    input_shape, batch = _benchmark_shapes(options, inputs)
    result = benchmark(backend, str(artifact), input_shape=input_shape, batch_sizes=(batch,),
                       warmup_s=min(0.2, duration_s), duration_s=duration_s, min_iterations=5, **kwargs)
    out = result.to_dict()
    out["config"].pop("model", None)  # a scratch path: meaningless to clients
    return out


# --------------------------------------------------------------------------- ONNX Runtime


def _random_input(rng: Any, shape: Sequence[int], dtype: Any) -> Any:
    """Standard-normal values drawn directly in ``dtype`` (float16 in float32 blocks of 1 Mi
    values), so no float64 array of the full shape is ever allocated."""
    import numpy as np

    dtype = np.dtype(dtype)
    if dtype in (np.float32, np.float64):
        return rng.standard_normal(tuple(shape), dtype=dtype)
    out = np.empty(tuple(shape), dtype)
    flat = out.reshape(-1)
    for start in range(0, flat.size, 1 << 20):
        block = flat[start:start + (1 << 20)]
        block[...] = rng.standard_normal(block.size, dtype=np.float32)
    return out


def _max_abs_diff(a: Any, b: Any) -> float:
    """max |a - b| in the outputs' own float type (float16 via float32), never a float64 copy."""
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    if not a.size:
        return 0.0
    kind = np.result_type(a, b)
    work = np.float32 if kind == np.float16 or not np.issubdtype(kind, np.floating) else kind
    return float(np.max(np.abs(np.subtract(a, b, dtype=work))))


class OnnxRuntimeBackend(Backend):
    """CPU backend: the artifact is ONNX Runtime's optimized ONNX graph.

    Args:
        reference_input_budget_bytes: most bytes the reference (parity) run may allocate for
            its random inputs; a build whose inputs would need more fails with a clear
            message before anything is allocated (None: no limit).
    """

    name = "onnxruntime"
    artifact_suffix = ".onnx"
    media_type = "application/octet-stream"

    def __init__(self, reference_input_budget_bytes: int | None = DEFAULT_REFERENCE_INPUT_BUDGET_BYTES) -> None:
        import onnxruntime as ort

        if reference_input_budget_bytes is not None and reference_input_budget_bytes < 0:
            raise ValueError(f"reference_input_budget_bytes={reference_input_budget_bytes} must be >= 0 or None")
        self.reference_input_budget_bytes = reference_input_budget_bytes
        self._ort = ort
        self.version = str(ort.__version__)
        self.device = f"cpu ({platform.machine() or 'unknown'})"

    def build(self, onnx_path: Path, options: Mapping[str, Any], inputs: Mapping[str, list[Any]],
              out_dir: Path, log: LogFn) -> BuildOutput:
        ort = self._ort
        out = out_dir / "model.opt.onnx"
        if options.get("precision", "int8") != "int8":
            log(f"note: precision={options['precision']!r} has no effect on the onnxruntime CPU backend; "
                "the Q/DQ nodes decide INT8 and other layers keep the ONNX's float type")
        if options.get("workspace_mib") is not None:
            log("note: workspace_mib applies to TensorRT only")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(out)
        so.log_severity_level = 3
        so.intra_op_num_threads = 1
        started = time.perf_counter()
        ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
        if not out.is_file() or out.stat().st_size == 0:
            raise RuntimeError("onnxruntime wrote no optimized model")
        seconds = time.perf_counter() - started
        log(f"onnxruntime {self.version}: optimized graph (ORT_ENABLE_EXTENDED) written in {seconds:.2f} s, "
            f"{out.stat().st_size} bytes")
        parity = self._parity(onnx_path, out, options, inputs, log)
        return BuildOutput(out, None, {"optimization_level": "ORT_ENABLE_EXTENDED", "build_time_s": round(seconds, 3)}, parity)

    def _parity(self, original: Path, optimized: Path, options: Mapping[str, Any], inputs: Mapping[str, list[Any]],
                log: LogFn) -> dict[str, Any] | None:
        """Run both graphs on one random input (the profiles' opt shape) and compare the outputs."""
        import numpy as np

        ort = self._ort
        shapes = options.get("shapes") or {}
        types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.intra_op_num_threads = 1
        ref = ort.InferenceSession(str(original), sess_options=so, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        planned: dict[str, tuple[list[int], Any]] = {}
        for arg in ref.get_inputs():
            if arg.type not in types:
                log(f"parity check skipped: input '{arg.name}' has type {arg.type}")
                return None
            if arg.name in shapes:
                shape = [int(d) for d in shapes[arg.name]["opt"]]
            else:
                dims = [d if isinstance(d, int) and d > 0 else None for d in arg.shape]
                if dims and dims[0] is None:
                    dims[0] = 1  # dynamic batch: 1
                if any(d is None for d in dims):
                    log(f"parity check skipped: input '{arg.name}' {arg.shape} has dynamic dimensions and no shapes option")
                    return None
                shape = [int(d) for d in dims if d is not None]
            planned[arg.name] = (shape, types[arg.type])
        need = sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in planned.values())
        budget = self.reference_input_budget_bytes
        if budget is not None and need > budget:
            sizes = ", ".join(f"{name} {shape} {np.dtype(dtype).name}" for name, (shape, dtype) in planned.items())
            raise ReferenceInputTooLarge(
                f"the reference run needs {need} bytes of inputs ({sizes}), over the budget of {budget} bytes; "
                "pass smaller 'opt' shapes")
        feed = {name: _random_input(rng, shape, dtype) for name, (shape, dtype) in planned.items()}
        so_opt = ort.SessionOptions()
        so_opt.intra_op_num_threads = 1
        opt = ort.InferenceSession(str(optimized), sess_options=so_opt, providers=["CPUExecutionProvider"])
        a = ref.run(None, feed)
        b = opt.run(None, feed)
        diffs = [_max_abs_diff(x, y) for x, y in zip(a, b)]
        scale = [float(np.max(np.abs(np.asarray(x)))) if np.size(x) else 0.0 for x in a]
        result = {"input_shapes": {k: list(v.shape) for k, v in feed.items()},
                  "max_abs_diff": max(diffs, default=0.0), "max_abs_reference": max(scale, default=0.0),
                  "reference": "uploaded ONNX with ORT_DISABLE_ALL (Q/DQ simulated in float)"}
        log(f"parity vs the uploaded model: max |diff| {result['max_abs_diff']:.4g} (max |ref| {result['max_abs_reference']:.4g})")
        return result

    def benchmark(self, artifact_path: Path, options: Mapping[str, Any], inputs: Mapping[str, list[Any]],
                  duration_s: float) -> dict[str, Any]:
        return _harness_benchmark("onnxruntime", artifact_path, options, inputs, duration_s,
                                  device="cpu", graph_optimization_level="extended")


# --------------------------------------------------------------------------- TensorRT


def trt_build_kwargs(options: Mapping[str, Any], trt_major: int) -> dict[str, Any]:
    """``build_engine`` keyword arguments for the service's options (a pure function).

    * ``precision='int8'``: strongly typed; the Q/DQ nodes place INT8 and every other layer
      runs in the ONNX's float type (FP32 export -> FP32/TF32, FP16 export -> FP16).
    * ``'fp16'``/``'best'`` on TensorRT 10.x: weakly typed with ``BuilderFlag.INT8|FP16``
      (``trtexec --int8 --fp16``; deprecated since 10.12). On 11.x, where weak typing is
      gone, the build is strongly typed: upload an FP16 export to get FP16 layers.
    * ``target='dla'``: DLA core ``dla_core`` with GPU fallback (check the layer report).
    * ``shapes``: one optimization profile (min/opt/max per input).
    """
    precision = options.get("precision", "int8")
    kwargs: dict[str, Any] = {"strongly_typed": True, "precision_flags": ()}
    if precision in ("fp16", "best") and trt_major < 11:
        kwargs = {"strongly_typed": False, "precision_flags": ("int8", "fp16")}
    shapes = options.get("shapes") or {}
    if shapes:
        kwargs["min_shapes"] = {k: tuple(v["min"]) for k, v in shapes.items()}
        kwargs["opt_shapes"] = {k: tuple(v["opt"]) for k, v in shapes.items()}
        kwargs["max_shapes"] = {k: tuple(v["max"]) for k, v in shapes.items()}
    if options.get("workspace_mib") is not None:
        kwargs["workspace_mib"] = int(options["workspace_mib"])
    if options.get("target") == "dla":
        kwargs["dla_core"] = int(options.get("dla_core") or 0)
        kwargs["gpu_fallback"] = True
    kwargs["optimization_level"] = int(options.get("optimization_level", 3))
    return kwargs


class TensorRTBackend(Backend):
    """GPU backend: ``build_engine`` -> serialized engine plus the per-layer precision report."""

    name = "tensorrt"
    artifact_suffix = ".engine"
    media_type = "application/octet-stream"

    def __init__(self, timing_cache_dir: Path | None = None) -> None:
        from trtquant.engine._trt import import_tensorrt, parse_trt_version

        trt = import_tensorrt()  # raises TensorRTNotAvailableError
        logger = trt.Logger(trt.Logger.ERROR)
        builder = trt.Builder(logger)  # fails without a usable GPU
        if builder is None:
            raise BackendUnavailable("tensorrt imports but trt.Builder() failed: no usable GPU")
        del builder
        self._version = parse_trt_version(str(trt.__version__))
        self.version = str(trt.__version__)
        self.device = gpu_name() or "unknown GPU"
        self._timing_cache_dir = timing_cache_dir

    def build(self, onnx_path: Path, options: Mapping[str, Any], inputs: Mapping[str, list[Any]],
              out_dir: Path, log: LogFn) -> BuildOutput:
        import hashlib

        from trtquant.engine.build import build_engine
        from trtquant.engine.inspect import layer_report

        kwargs = trt_build_kwargs(options, self._version.major)
        if options.get("precision") in ("fp16", "best") and self._version.major >= 11:
            log(f"note: TensorRT {self.version} is strongly typed only: precision={options['precision']!r} builds the "
                "ONNX's own types (upload an FP16 export for FP16 layers)")
        timing = None
        if self._timing_cache_dir is not None:
            tag = hashlib.sha256(f"{self.version}|{self.device}".encode()).hexdigest()[:16]
            timing = self._timing_cache_dir / f"timing-{tag}.cache"
        log(f"TensorRT {self.version} on {self.device}: build_engine({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})")
        result = build_engine(onnx_path, out_dir / "model.engine", timing_cache_path=timing,
                              profiling_verbosity="detailed", logger_severity="warning", **kwargs)
        # TensorRT's messages reach the job log through the 'trtquant.engine' logger (BuildManager's handler).
        layers = None
        if result.layer_report_path is not None:
            report = layer_report(result.layer_report_path)
            layers = report.to_dict()
            log(f"layers: {report.precision_counts()}; weighted layers not INT8: {len(report.not_int8_layers)}")
        metadata = dict(result.metadata)
        metadata.pop("onnx", None)  # scratch paths
        metadata.pop("engine", None)
        metadata.get("options", {}).pop("timing_cache_path", None)
        return BuildOutput(result.engine_path, layers, metadata, None)

    def benchmark(self, artifact_path: Path, options: Mapping[str, Any], inputs: Mapping[str, list[Any]],
                  duration_s: float) -> dict[str, Any]:
        return _harness_benchmark("tensorrt", artifact_path, options, inputs, duration_s)


# --------------------------------------------------------------------------- selection


def select_backend(prefer: str | None = None, timing_cache_dir: Path | None = None, *,
                   reference_input_budget_bytes: int | None = DEFAULT_REFERENCE_INPUT_BUDGET_BYTES) -> Backend:
    """The backend to build with: TensorRT when usable, else ONNX Runtime on the CPU.

    Args:
        prefer: ``"auto"`` (default; also from ``$TRTQUANT_SERVICE_BACKEND``), ``"tensorrt"``
            or ``"onnxruntime"``.
        reference_input_budget_bytes: see :class:`OnnxRuntimeBackend`.

    Raises:
        BackendUnavailable: ``prefer='tensorrt'`` and TensorRT is not usable here.
        ValueError: unknown ``prefer``.
    """
    if not prefer:
        from trtquant.settings import get_settings

        prefer = get_settings().service_backend  # $TRTQUANT_SERVICE_BACKEND (BACKEND_ENV)
    prefer = (prefer or "auto").strip().lower()
    if prefer not in ("auto", "tensorrt", "onnxruntime"):
        raise ValueError(f"backend {prefer!r}; known: auto, tensorrt, onnxruntime")
    if prefer in ("auto", "tensorrt"):
        try:
            return TensorRTBackend(timing_cache_dir)
        except Exception as exc:  # TensorRTNotAvailableError, no GPU, broken native libraries
            if prefer == "tensorrt":
                raise BackendUnavailable(f"TensorRT backend requested but not usable: {exc}") from exc
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            _LOG.info("TensorRT not usable (%s); using the ONNX Runtime CPU backend", first)
    importlib.import_module("onnxruntime")
    return OnnxRuntimeBackend(reference_input_budget_bytes)

