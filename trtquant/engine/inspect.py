"""Per-layer precision of a built engine, from TensorRT's engine inspector.

``engine.create_engine_inspector().get_engine_information(LayerInformationFormat.JSON)``
returns ``{"Layers": [...], ...}``. With ``ProfilingVerbosity.DETAILED`` each layer is an
object whose tensors carry the type; otherwise layers are bare names. Two schemas:

* TensorRT 10.x (and 8.x): ``"Bindings": [names]``; each layer tensor has one
  ``"Format/Datatype"`` string, e.g. ``"Thirty-two wide channel vectorized row major Int8
  format"``, ``"Row major linear FP32"`` or, from TREx, ``"Int8 NC/32HW32"``.
* TensorRT 11.x: ``"I/O Tensors": [objects]`` replaces ``Bindings`` and layer tensors carry
  separate ``"Format"`` and ``"DataType"`` fields.

``"Metadata"`` holds the ONNX nodes a layer came from as ``[ONNX Layer: <node>]`` entries
(several for fused layers, separated by ``\\x1e``). :func:`parse_engine_information` is a
pure function of that JSON text, so both schemas are unit-tested without a GPU;
:func:`layer_report` adds the TensorRT calls.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trtquant.engine._trt import import_tensorrt

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = [
    "LayerInfo",
    "LayerReport",
    "TensorInfo",
    "engine_information_json",
    "layer_report",
    "normalize_precision",
    "onnx_nodes_from_metadata",
    "parse_engine_information",
]

# Order matters: longer / more specific names first ("BFloat16" before "Float", "UInt8" before "Int8").
_PRECISION_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"bfloat16|\bbf16\b", "BF16"),
    (r"\bfp8\b|float8|e4m3", "FP8"),
    (r"\bfp4\b|e2m1", "FP4"),
    (r"\buint8\b", "UINT8"),
    (r"\bint8\b", "INT8"),
    (r"\bint4\b", "INT4"),
    (r"\bint32\b", "INT32"),
    (r"\bint64\b", "INT64"),
    (r"\bfp16\b|\bhalf\b|float16", "FP16"),
    (r"\bfp32\b|\bfloat\b|float32", "FP32"),
    (r"\bbool\b", "BOOL"),
)
_ONNX_LAYER_RE = re.compile(r"\[ONNX Layer:\s*([^\]\x1e]+?)\s*\]")

#: Engine layer / parameter types that run a weighted (Conv/Deconv/Gemm/MatMul) kernel.
_WEIGHTED_KINDS = ("convolution", "gemm", "matrixmultiply", "fullyconnected")
#: ONNX op names (as the last path component of exported node names) that are weighted ops.
_WEIGHTED_ONNX_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: Layer types that are bookkeeping, never "not INT8" findings.
_BOOKKEEPING_TYPES = ("reformat", "noop", "constant", "shuffle", "identity", "quantize", "dequantize")


def normalize_precision(text: str | None) -> str:
    """Map an inspector type/format string to ``INT8``, ``FP16``, ``FP32``, ``BF16``, ``FP8``...

    Returns ``"unknown"`` for missing text and for ``"N/A due to dynamic shapes"``.
    """
    if not text:
        return "unknown"
    lowered = str(text).lower()
    for pattern, name in _PRECISION_PATTERNS:
        if re.search(pattern, lowered):
            return name
    return "unknown"


def onnx_nodes_from_metadata(metadata: str | Sequence[str] | None) -> tuple[str, ...]:
    """ONNX node names from a layer's ``Metadata`` (``[ONNX Layer: a]\\x1e[ONNX Layer: b]``)."""
    if not metadata:
        return ()
    text = metadata if isinstance(metadata, str) else "\x1e".join(str(item) for item in metadata)
    return tuple(dict.fromkeys(match.strip() for match in _ONNX_LAYER_RE.findall(text)))


@dataclass(frozen=True)
class TensorInfo:
    """One input or output of an engine layer."""

    name: str
    precision: str
    format: str | None
    dimensions: tuple[int, ...] | None


@dataclass(frozen=True)
class LayerInfo:
    """One engine layer (possibly several fused ONNX nodes).

    Attributes:
        precision: the type the layer computes in: its first input's type (a Conv that
            reads INT8 runs an INT8 kernel even when it writes FP32), or the first
            output's when it has no inputs; ``"unknown"`` without DETAILED verbosity.
        weighted: a Conv/Deconv/Gemm/MatMul kernel, i.e. a layer users quantize.
        not_int8: ``weighted`` but not INT8: a layer the user probably meant to be INT8
            that TensorRT ran in higher precision (missing or misplaced Q/DQ).
    """

    index: int
    name: str
    layer_type: str
    precision: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    onnx_nodes: tuple[str, ...]
    tactic: str | None
    weighted: bool
    not_int8: bool


@dataclass
class LayerReport:
    """All layers of an engine with their precision; see :func:`parse_engine_information`."""

    schema: str  # "10.x", "11.x" or "names-only"
    layers: list[LayerInfo]
    io_tensors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def detailed(self) -> bool:
        """False when the engine was built without ``ProfilingVerbosity.DETAILED``."""
        return self.schema != "names-only"

    @property
    def not_int8_layers(self) -> list[LayerInfo]:
        """Weighted layers (Conv/Gemm/MatMul) that TensorRT did not run in INT8."""
        return [layer for layer in self.layers if layer.not_int8]

    def precision_counts(self) -> dict[str, int]:
        """Layers per precision, e.g. ``{"INT8": 52, "FP32": 3}``."""
        return dict(Counter(layer.precision for layer in self.layers))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: schema, counts, the not-INT8 layer names and every layer."""
        return {
            "schema": self.schema,
            "detailed": self.detailed,
            "precision_counts": self.precision_counts(),
            "not_int8_layers": [layer.name for layer in self.not_int8_layers],
            "layers": [_lists(asdict(layer)) for layer in self.layers],
            "io_tensors": self.io_tensors,
        }

    def format_table(self, *, only_weighted: bool = False, max_name: int = 60) -> str:
        """A fixed-width text table; not-INT8 weighted layers are marked ``<- not INT8``."""
        if not self.detailed:
            return (
                f"{len(self.layers)} layers; no per-layer types: rebuild with "
                "profiling_verbosity='detailed' (ProfilingVerbosity.DETAILED)."
            )
        rows = [layer for layer in self.layers if layer.weighted or not only_weighted]

        def clip(text: str) -> str:
            return text if len(text) <= max_name else text[: max_name - 3] + "..."

        header = ("#", "layer", "type", "precision", "in -> out", "ONNX nodes")
        body = []
        for layer in rows:
            io = f"{'/'.join(t.precision for t in layer.inputs) or '-'} -> {'/'.join(t.precision for t in layer.outputs) or '-'}"
            mark = "  <- not INT8" if layer.not_int8 else ""
            body.append(
                (str(layer.index), clip(layer.name), layer.layer_type, layer.precision + mark, io, clip(", ".join(layer.onnx_nodes)))
            )
        widths = [max(len(row[col]) for row in [header, *body]) for col in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *body]]
        lines.insert(1, "  ".join("-" * width for width in widths))
        counts = ", ".join(f"{name} {count}" for name, count in sorted(self.precision_counts().items()))
        summary = f"{len(self.layers)} layers ({counts}); {len(self.not_int8_layers)} weighted layer(s) not INT8"
        return "\n".join([*lines, summary])


def _lists(value: Any) -> Any:
    """Tuples to lists, recursively, so ``to_dict()`` equals its JSON round trip."""
    if isinstance(value, dict):
        return {key: _lists(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(item) for item in value]
    return value


def _tensor(raw: Mapping[str, Any] | str) -> TensorInfo:
    if isinstance(raw, str):  # very old inspectors listed tensor names only
        return TensorInfo(name=raw, precision="unknown", format=None, dimensions=None)
    dims = raw.get("Dimensions")
    fmt: str | None
    if "Format/Datatype" in raw:  # 10.x: one descriptive string carries both
        fmt = str(raw["Format/Datatype"])
        precision = normalize_precision(fmt)
    else:  # 11.x: separate fields (accept both capitalisations of DataType)
        fmt = None if raw.get("Format") is None else str(raw["Format"])
        dtype = raw.get("DataType", raw.get("Datatype"))
        precision = normalize_precision(dtype) if dtype is not None else normalize_precision(fmt)
    return TensorInfo(
        name=str(raw.get("Name", "")),
        precision=precision,
        format=fmt,
        dimensions=tuple(int(d) for d in dims) if isinstance(dims, list) else None,
    )


def _is_weighted(layer_type: str, parameter_type: str, onnx_nodes: Sequence[str]) -> bool:
    kinds = f"{layer_type} {parameter_type}".lower()
    if any(word in kinds for word in _BOOKKEEPING_TYPES):
        return False
    if any(word in kinds for word in _WEIGHTED_KINDS):
        return True
    # kgen/myelin layers (11.x) hide the kernel kind: fall back to the ONNX op in node names
    # ("/layer1/conv1/Conv" from torch.onnx, "Conv_12" from older exporters).
    return any(node.rsplit("/", 1)[-1].split("_")[0] in _WEIGHTED_ONNX_OPS for node in onnx_nodes)


def _layer(index: int, raw: Mapping[str, Any]) -> LayerInfo:
    name = str(raw.get("Name", f"layer{index}"))
    layer_type = str(raw.get("LayerType", ""))
    parameter_type = str(raw.get("ParameterType", ""))
    inputs = tuple(_tensor(t) for t in raw.get("Inputs", []) or [])
    outputs = tuple(_tensor(t) for t in raw.get("Outputs", []) or [])
    onnx_nodes = onnx_nodes_from_metadata(raw.get("Metadata")) or onnx_nodes_from_metadata(name)
    source = inputs or outputs
    precision = source[0].precision if source else "unknown"
    weighted = _is_weighted(layer_type, parameter_type, onnx_nodes)
    tactic = raw.get("TacticName") or raw.get("TacticValue")
    return LayerInfo(
        index=index,
        name=name,
        layer_type=parameter_type or layer_type or "unknown",
        precision=precision,
        inputs=inputs,
        outputs=outputs,
        onnx_nodes=onnx_nodes,
        tactic=None if tactic is None else str(tactic),
        weighted=weighted,
        not_int8=weighted and precision != "INT8",
    )


def parse_engine_information(text: str) -> LayerReport:
    """Parse ``get_engine_information(LayerInformationFormat.JSON)`` output (10.x or 11.x schema).

    Raises:
        ValueError: the text is not JSON or has no ``"Layers"`` list.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"engine information is not JSON ({exc}); pass LayerInformationFormat.JSON output") from exc
    if isinstance(data, list):  # a bare list of layer objects
        data = {"Layers": data}
    if not isinstance(data, dict) or not isinstance(data.get("Layers"), list):
        raise ValueError("engine information has no 'Layers' list: not TensorRT engine-inspector JSON")
    raw_layers = data["Layers"]
    if all(isinstance(layer, str) for layer in raw_layers):
        layers = [
            LayerInfo(i, name, "unknown", "unknown", (), (), onnx_nodes_from_metadata(name), None, False, False)
            for i, name in enumerate(raw_layers)
        ]
        return LayerReport(schema="names-only", layers=layers)
    layers = [_layer(i, raw if isinstance(raw, dict) else {"Name": str(raw)}) for i, raw in enumerate(raw_layers)]
    tensors = [t for raw in raw_layers if isinstance(raw, dict) for t in [*(raw.get("Inputs") or []), *(raw.get("Outputs") or [])]]
    per_layer_11 = any(isinstance(t, dict) and ("DataType" in t or "Datatype" in t) for t in tensors)
    if "I/O Tensors" in data or per_layer_11:
        schema = "11.x"
        io_tensors = [dict(t) for t in data.get("I/O Tensors", []) if isinstance(t, dict)]
    else:
        schema = "10.x"
        io_tensors = [{"Name": name} for name in data.get("Bindings", [])]
    return LayerReport(schema=schema, layers=layers, io_tensors=io_tensors)


def engine_information_json(engine: trt.ICudaEngine) -> str:
    """``get_engine_information(LayerInformationFormat.JSON)`` of a deserialized ``ICudaEngine``.

    For engines with dynamic input shapes an execution context is attached with every
    input at its profile-0 ``opt`` shape, so tensors report concrete formats and types
    instead of placeholders.
    """
    import tensorrt as trt

    inspector = engine.create_engine_inspector()
    inputs = [
        engine.get_tensor_name(i)
        for i in range(engine.num_io_tensors)
        if engine.get_tensor_mode(engine.get_tensor_name(i)) == trt.TensorIOMode.INPUT
    ]
    dynamic = []
    for name in inputs:
        shape = engine.get_tensor_shape(name)
        if any(shape[axis] < 0 for axis in range(len(shape))):
            dynamic.append(name)
    context = None
    if dynamic:
        context = engine.create_execution_context()
        if context is not None:
            for name in dynamic:
                context.set_input_shape(name, engine.get_tensor_profile_shape(name, 0)[1])
            inspector.execution_context = context
    info = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    del inspector, context
    return info


def layer_report(engine: bytes | bytearray | memoryview | str | os.PathLike[str]) -> LayerReport:
    """Deserialize an engine (bytes or a plan file path) and parse its inspector JSON.

    Needs TensorRT and a GPU of the kind the engine was built for. A path ending in
    ``.json`` is read as saved inspector JSON (``<engine>.layers.json`` from
    :func:`trtquant.engine.build.build_engine`, or ``trtexec --exportLayerInfo``) and needs
    neither.

    Raises:
        TensorRTNotAvailableError: TensorRT is not installed (and the input is an engine).
        ValueError: the engine cannot be deserialized with this TensorRT/GPU.
    """
    if isinstance(engine, (str, os.PathLike)):
        path = Path(engine)
        if path.suffix == ".json":
            return parse_engine_information(path.read_text(encoding="utf-8"))
        plan: bytes | bytearray | memoryview = path.read_bytes()
    else:
        plan = engine
    import_tensorrt()
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    cuda_engine = runtime.deserialize_cuda_engine(plan)
    if cuda_engine is None:
        raise ValueError(
            f"TensorRT {trt.__version__} could not deserialize the engine: it was built by another "
            "TensorRT version or for another GPU (engines are specific to both); rebuild it here."
        )
    return parse_engine_information(engine_information_json(cuda_engine))
