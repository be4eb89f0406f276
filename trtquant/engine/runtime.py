"""Run a serialized TensorRT engine with PyTorch CUDA tensors as I/O buffers.

TensorRT 10/11 name-based I/O (no bindings indices, no ``execute_async_v2``)::

    Runtime(logger).deserialize_cuda_engine(plan) -> create_execution_context()
    context.set_input_shape(name, shape); context.set_tensor_address(name, ptr)
    context.get_tensor_shape(output) -> allocate -> set_tensor_address
    context.execute_async_v3(stream.cuda_stream)

Buffers are ``torch`` tensors (no PyCUDA, which TensorRT dropped in 10.14). Work runs on a
dedicated non-default ``torch.cuda.Stream``: TensorRT synchronizes extra on the legacy
default stream. Optional CUDA graphs follow ``trtexec --useCudaGraph``: one eager enqueue
first (TensorRT allocates lazily), then capture on the non-default stream, falling back to
eager enqueue when capture fails. A graph freezes shapes and addresses; binding new ones
drops it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from trtquant.engine._trt import import_tensorrt
from trtquant.engine.build import LOGGER_SEVERITIES, metadata_path_for
from trtquant.errors import TrtQuantError

__all__ = ["IOSpec", "TrtRunner", "torch_dtype_from_trt"]

_LOG = logging.getLogger("trtquant.engine")

#: ``trt.DataType`` member name -> ``torch`` dtype attribute name.
_TRT_TO_TORCH = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "FP8": "float8_e4m3fn",
}

Feed = Union[torch.Tensor, Sequence[torch.Tensor], Mapping[str, torch.Tensor]]


def torch_dtype_from_trt(trt_dtype: Any) -> torch.dtype:
    """The torch dtype for a ``trt.DataType`` (or its member name, e.g. ``"HALF"``).

    Raises:
        TypeError: a TensorRT type torch cannot hold (INT4, FP4, E8M0 as I/O).
    """
    name = trt_dtype if isinstance(trt_dtype, str) else getattr(trt_dtype, "name", str(trt_dtype).split(".")[-1])
    torch_name = _TRT_TO_TORCH.get(name)
    if torch_name is None or not hasattr(torch, torch_name):
        raise TypeError(f"TensorRT I/O type {name} has no torch dtype; known: {', '.join(_TRT_TO_TORCH)}")
    dtype = getattr(torch, torch_name)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"torch.{torch_name} is not a dtype")
    return dtype


@dataclass(frozen=True)
class IOSpec:
    """An engine input or output.

    Attributes:
        shape: engine shape, -1 for dimensions set at run time.
        profile: (min, opt, max) shapes of the active optimization profile (inputs with
            dynamic dimensions only).
    """

    name: str
    is_input: bool
    dtype: torch.dtype
    shape: tuple[int, ...]
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None


def _dims(dims: Any) -> tuple[int, ...]:
    return tuple(int(dims[i]) for i in range(len(dims)))


class TrtRunner:
    """Execute a TensorRT engine on a CUDA device with torch tensors.

    Example::

        runner = TrtRunner("model.engine")
        out = runner.infer(torch.randn(8, 3, 224, 224, device="cuda"))["logits"]

    For benchmarking, bind once and enqueue repeatedly (no per-call allocation)::

        outputs = runner.bind({"input": x})
        runner.capture_cuda_graph()     # optional
        runner.enqueue(); runner.stream.synchronize()

    Args:
        engine_path: serialized engine (plan) file.
        device: CUDA device (default: the current one).
        profile_index: optimization profile to run with.
        allow_host_code: set ``Runtime.engine_host_code_allowed`` (needed for
            version-compatible engines). ``None`` reads ``version_compatible`` from the
            ``<engine>.json`` metadata written by :func:`~trtquant.engine.build.build_engine`.
        logger_severity: lowest TensorRT log severity printed.

    Raises:
        TensorRTNotAvailableError: TensorRT is not installed.
        TrtQuantError: no CUDA device, or the engine does not deserialize here.
    """

    def __init__(
        self,
        engine_path: str | os.PathLike[str],
        *,
        device: str | int | torch.device | None = None,
        profile_index: int = 0,
        allow_host_code: bool | None = None,
        logger_severity: str = "warning",
    ) -> None:
        if logger_severity not in LOGGER_SEVERITIES:
            raise ValueError(f"logger_severity={logger_severity!r}; known: {', '.join(LOGGER_SEVERITIES)}")
        self.engine_path = Path(engine_path)
        if not self.engine_path.is_file():
            raise FileNotFoundError(f"engine {self.engine_path} does not exist")
        import_tensorrt()
        import tensorrt as trt

        if not torch.cuda.is_available():
            raise TrtQuantError("TrtRunner needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
        if isinstance(device, int):
            self.device = torch.device("cuda", device)
        else:
            self.device = torch.device(device if device is not None else "cuda")
        if self.device.type != "cuda":
            raise ValueError(f"device={device!r}: TensorRT engines run on CUDA devices only")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if allow_host_code is None:
            allow_host_code = self._metadata_says_version_compatible()

        self._logger = trt.Logger(getattr(trt.Logger, logger_severity.upper()))
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            self._runtime.engine_host_code_allowed = bool(allow_host_code)
            engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
            if engine is None:
                raise TrtQuantError(
                    f"TensorRT {trt.__version__} could not deserialize {self.engine_path}: engines are "
                    f"specific to the TensorRT version and GPU that built them (see "
                    f"{metadata_path_for(self.engine_path).name}); rebuild it on this machine."
                )
            self.engine = engine
            context = engine.create_execution_context()
            if context is None:
                raise TrtQuantError(f"could not create an execution context for {self.engine_path} (out of GPU memory?)")
            self.context = context
            self.stream = torch.cuda.Stream(device=self.device)
        if not 0 <= profile_index < engine.num_optimization_profiles:
            raise ValueError(f"profile_index={profile_index}; the engine has {engine.num_optimization_profiles} profile(s)")
        self.profile_index = profile_index
        if profile_index != 0:
            self.context.set_optimization_profile_async(profile_index, self.stream.cuda_stream)

        specs = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            shape = _dims(engine.get_tensor_shape(name))
            profile = None
            if is_input and any(d < 0 for d in shape):
                mn, op, mx = (_dims(d) for d in engine.get_tensor_profile_shape(name, profile_index))
                profile = (mn, op, mx)
            specs.append(IOSpec(name, is_input, torch_dtype_from_trt(engine.get_tensor_dtype(name)), shape, profile))
        self.inputs: list[IOSpec] = [s for s in specs if s.is_input]
        self.outputs: list[IOSpec] = [s for s in specs if not s.is_input]
        self._bound_inputs: dict[str, torch.Tensor] = {}
        self._bound_outputs: dict[str, torch.Tensor] = {}
        self._binding_key: tuple[Any, ...] | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_key: tuple[Any, ...] | None = None

    # ------------------------------------------------------------------ helpers

    def _metadata_says_version_compatible(self) -> bool:
        meta = metadata_path_for(self.engine_path)
        try:
            return bool(json.loads(meta.read_text(encoding="utf-8"))["options"]["version_compatible"])
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def _normalize_feed(self, feed: Feed) -> dict[str, torch.Tensor]:
        if isinstance(feed, torch.Tensor):
            feed = [feed]
        if isinstance(feed, Mapping):
            names = {s.name for s in self.inputs}
            unknown = sorted(set(feed) - names)
            missing = sorted(names - set(feed))
            if unknown or missing:
                raise ValueError(f"engine inputs are {sorted(names)}; got unknown {unknown}, missing {missing}")
            return dict(feed)
        tensors = list(feed)
        if len(tensors) != len(self.inputs):
            raise ValueError(
                f"the engine has {len(self.inputs)} input(s) {[s.name for s in self.inputs]}; got {len(tensors)} tensor(s)"
            )
        return {spec.name: t for spec, t in zip(self.inputs, tensors)}

    # ------------------------------------------------------------------ execution

    def bind(self, feed: Feed) -> dict[str, torch.Tensor]:
        """Set input shapes and addresses, (re)allocate outputs, and return the output buffers.

        Inputs on another device or dtype are converted (a copy); the runner keeps them
        alive until the next ``bind``. Output buffers are reused while their shapes stay
        the same: copy them if you keep results across calls.
        """
        with torch.cuda.device(self.device):
            return self._bind(self._normalize_feed(feed))

    def _bind(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        bound: dict[str, torch.Tensor] = {}
        for spec in self.inputs:
            tensor = tensors[spec.name].to(device=self.device, dtype=spec.dtype).contiguous()
            shape = tuple(tensor.shape)
            if len(shape) != len(spec.shape) or any(e >= 0 and e != g for e, g in zip(spec.shape, shape)):
                raise ValueError(f"input '{spec.name}' has shape {shape}; the engine expects {spec.shape} (-1 = any)")
            if spec.profile is not None:
                mn, _, mx = spec.profile
                if not all(a <= g <= b for a, g, b in zip(mn, shape, mx)):
                    raise ValueError(
                        f"input '{spec.name}' shape {shape} is outside the engine's optimization profile "
                        f"min={mn} max={mx}; rebuild with a larger max_shapes."
                    )
            if not self.context.set_input_shape(spec.name, shape):
                raise TrtQuantError(f"TensorRT rejected shape {shape} for input '{spec.name}'")
            self.context.set_tensor_address(spec.name, tensor.data_ptr())
            bound[spec.name] = tensor
        self._bound_inputs = bound
        for spec in self.outputs:
            shape = _dims(self.context.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise TrtQuantError(
                    f"output '{spec.name}' has a data-dependent shape {shape}; TrtRunner does not "
                    "implement IOutputAllocator (engines with NonZero/NMS-style outputs)."
                )
            current = self._bound_outputs.get(spec.name)
            if current is None or tuple(current.shape) != shape:
                with torch.cuda.stream(self.stream):
                    current = torch.empty(shape, dtype=spec.dtype, device=self.device)
                self._bound_outputs[spec.name] = current
            self.context.set_tensor_address(spec.name, current.data_ptr())
        self._binding_key = tuple(
            (name, t.data_ptr(), tuple(t.shape)) for name, t in [*bound.items(), *self._bound_outputs.items()]
        )
        if self._graph is not None and self._graph_key != self._binding_key:
            _LOG.info("bindings changed: dropping the captured CUDA graph (eager enqueue until recaptured)")
            self._graph = None
            self._graph_key = None
        return dict(self._bound_outputs)

    def enqueue(self) -> None:
        """Launch one inference on :attr:`stream` (graph replay when captured); does not wait.

        Work already queued on the caller's current stream (e.g. producing the inputs) is
        waited for on the device. Call it with the engine's device current on multi-GPU hosts.
        """
        if self._binding_key is None:
            raise RuntimeError("call bind() before enqueue()")
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if self._graph is not None:
            with torch.cuda.stream(self.stream):
                self._graph.replay()
            return
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise TrtQuantError(f"execute_async_v3 failed for {self.engine_path}; see the TensorRT log above")

    def capture_cuda_graph(self) -> bool:
        """Capture the bound inference into a CUDA graph; later :meth:`enqueue` calls replay it.

        Returns:
            True when captured; False when capture failed (a warning is logged and eager
            enqueue is used, as trtexec does).
        """
        if self._binding_key is None:
            raise RuntimeError("call bind() before capture_cuda_graph()")
        self._graph = None
        self.enqueue()  # eager first: TensorRT finishes lazy allocations and setup here
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(self.device), torch.cuda.graph(graph, stream=self.stream):
                if not self.context.execute_async_v3(self.stream.cuda_stream):
                    raise TrtQuantError("execute_async_v3 failed during CUDA graph capture")
        except Exception as exc:  # capture is an optimisation: fall back to eager enqueue
            _LOG.warning("CUDA graph capture failed (%s); using eager enqueue", exc)
            return False
        self._graph = graph
        self._graph_key = self._binding_key
        return True

    @property
    def graph_captured(self) -> bool:
        """Whether :meth:`enqueue` replays a captured CUDA graph."""
        return self._graph is not None

    def infer(self, feed: Feed) -> dict[str, torch.Tensor]:
        """Bind, run, wait, and return fresh copies of the outputs (safe to keep)."""
        outputs = self.bind(feed)
        self.enqueue()
        self.stream.synchronize()
        return {name: tensor.clone() for name, tensor in outputs.items()}

    def close(self) -> None:
        """Release the graph, context and engine (GPU memory) now rather than at garbage collection."""
        self._graph = None
        self._bound_inputs.clear()
        self._bound_outputs.clear()
        for attr in ("context", "engine"):
            if hasattr(self, attr):
                delattr(self, attr)

    def __enter__(self) -> TrtRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
