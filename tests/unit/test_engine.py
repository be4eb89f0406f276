"""trtquant.engine without TensorRT: inspector JSON parsing (10.x and 11.x schemas), the
missing-TensorRT error, build decisions (flags, profiles, parser errors), metadata and
atomic writes. Real builds are in tests/flows/test_trt_engine.py (marked trt)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import sys
import types
from pathlib import Path

import pytest
import torch

from trtquant.engine import _trt
from trtquant.engine.build import (
    ParserErrorInfo,
    atomic_write_bytes,
    atomic_write_text,
    build_engine,
    build_metadata,
    collect_parser_errors,
    engine_cache_key,
    format_parser_errors,
    layer_info_path_for,
    metadata_path_for,
    network_creation_flags,
    precision_builder_flags,
    resolve_profile_shapes,
    sha256_file,
)
from trtquant.engine.inspect import layer_report, normalize_precision, onnx_nodes_from_metadata, parse_engine_information
from trtquant.engine.runtime import TrtRunner, torch_dtype_from_trt
from trtquant.errors import TensorRTNotAvailableError

# --------------------------------------------------------------------------- inspector JSON samples

# TensorRT 10.x DETAILED engine information: "Bindings" names, one "Format/Datatype" string per
# tensor (long descriptive strings as TensorRT prints them, and the short TREx form), ONNX nodes
# in "Metadata" separated by \x1e.
ENGINE_INFO_10X = {
    "Layers": [
        {
            "Name": "Reformatting CopyNode for Input Tensor 0 to /conv1/Conv",
            "LayerType": "Reformat",
            "Inputs": [{"Name": "input", "Location": "Device", "Dimensions": [1, 16, 8, 8],
                        "Format/Datatype": "Row major linear FP32"}],
            "Outputs": [{"Name": "Reformatted Input Tensor 0 to /conv1/Conv", "Location": "Device",
                         "Dimensions": [1, 16, 8, 8], "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
            "ParameterType": "Reformat",
            "Origin": "REFORMAT",
            "TacticValue": "0x0000000000000000",
        },
        {
            "Name": "/conv1/input_quantizer/DequantizeLinear + /conv1/Conv + /relu/Relu",
            "LayerType": "CaskConvolution",
            "Inputs": [{"Name": "Reformatted Input Tensor 0 to /conv1/Conv", "Location": "Device",
                        "Dimensions": [1, 16, 8, 8], "Format/Datatype": "Int8 NC/32HW32"}],
            "Outputs": [{"Name": "/relu/Relu_output_0", "Location": "Device", "Dimensions": [1, 16, 8, 8],
                         "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
            "ParameterType": "Convolution",
            "Kernel": [3, 3],
            "Metadata": "[ONNX Layer: /conv1/input_quantizer/DequantizeLinear]\x1e[ONNX Layer: /conv1/Conv]\x1e[ONNX Layer: /relu/Relu]",
            "TacticName": "sm80_xmma_fprop_implicit_gemm_interleaved_i8i8_i8i32_f32_nchw_vect_c_32",
            "TacticValue": "0x1234",
        },
        {
            "Name": "/fc/Gemm",
            "LayerType": "CaskGemmConvolution",
            "Inputs": [{"Name": "/flatten/Flatten_output_0", "Location": "Device", "Dimensions": [1, 1024],
                        "Format/Datatype": "Row major linear FP32"}],
            "Outputs": [{"Name": "logits", "Location": "Device", "Dimensions": [1, 10],
                         "Format/Datatype": "Row major linear FP32"}],
            "ParameterType": "Convolution",
            "Metadata": "[ONNX Layer: /fc/Gemm]",
            "TacticValue": "0x9",
        },
    ],
    "Bindings": ["input", "logits"],
}

# TensorRT 11.x: "I/O Tensors" objects instead of "Bindings", and separate "Format" / "DataType"
# per layer tensor (field names from the 10.x -> 11.x IEngineInspector migration guide).
ENGINE_INFO_11X = {
    "Layers": [
        {
            "Name": "/conv1/Conv + /relu/Relu",
            "LayerType": "CaskConvolution",
            "Inputs": [{"Name": "input_q", "Location": "Device", "Dimensions": [1, 16, 8, 8],
                        "Format": "Thirty-two wide channel vectorized row major format (kCHW32)", "DataType": "Int8"}],
            "Outputs": [{"Name": "/relu/Relu_output_0", "Location": "Device", "Dimensions": [1, 16, 8, 8],
                         "Format": "Row major linear format (kLINEAR)", "DataType": "Float"}],
            "ParameterType": "Convolution",
            "Metadata": "[ONNX Layer: /conv1/Conv]\x1e[ONNX Layer: /relu/Relu]",
        },
        {
            "Name": "/conv2/Conv",
            "LayerType": "CaskConvolution",
            "Inputs": [{"Name": "/relu/Relu_output_0", "Dimensions": [1, 16, 8, 8],
                        "Format": "Channel major format where channel % 8 == 0 (kHWC8)", "DataType": "Half"}],
            "Outputs": [{"Name": "/conv2/Conv_output_0", "Dimensions": [1, 16, 8, 8],
                         "Format": "Channel major format where channel % 8 == 0 (kHWC8)", "DataType": "Half"}],
            "ParameterType": "Convolution",
            "Metadata": "[ONNX Layer: /conv2/Conv]",
        },
        {
            "Name": "__myl_FcGemm_0",
            "LayerType": "kgen",
            "Inputs": [{"Name": "/flatten/Flatten_output_0", "Dimensions": [1, 1024], "Format": "kLINEAR", "DataType": "Float"}],
            "Outputs": [{"Name": "logits", "Dimensions": [1, 10], "Format": "kLINEAR", "DataType": "Float"}],
            "Metadata": "[ONNX Layer: /fc/Gemm]",
        },
    ],
    "I/O Tensors": [
        {"Name": "input", "IOMode": "Input", "DataType": "Float", "Dimensions": [1, 16, 8, 8], "Location": "Device",
         "IsShapeInferenceIO": False, "ProfileInfo": [{"MinShape": [1, 16, 8, 8], "OptShape": [1, 16, 8, 8],
                                                       "MaxShape": [1, 16, 8, 8], "Format": "Row major linear FP32 format (kLINEAR)"}]},
        {"Name": "logits", "IOMode": "Output", "DataType": "Float", "Dimensions": [1, 10], "Location": "Device",
         "IsShapeInferenceIO": False},
    ],
}


def test_inspector_10x_schema() -> None:
    report = parse_engine_information(json.dumps(ENGINE_INFO_10X))
    assert report.schema == "10.x" and report.detailed
    reformat, conv, fc = report.layers
    assert not reformat.weighted and not reformat.not_int8
    assert reformat.precision == "FP32" and reformat.outputs[0].precision == "INT8"
    assert conv.precision == "INT8" and conv.weighted and not conv.not_int8
    assert conv.onnx_nodes == ("/conv1/input_quantizer/DequantizeLinear", "/conv1/Conv", "/relu/Relu")
    assert conv.tactic is not None and conv.tactic.startswith("sm80_xmma")
    assert fc.precision == "FP32" and fc.weighted and fc.not_int8
    assert [layer.name for layer in report.not_int8_layers] == ["/fc/Gemm"]
    assert report.io_tensors == [{"Name": "input"}, {"Name": "logits"}]
    assert report.precision_counts() == {"FP32": 2, "INT8": 1}


def test_inspector_11x_schema() -> None:
    report = parse_engine_information(json.dumps(ENGINE_INFO_11X))
    assert report.schema == "11.x"
    conv1, conv2, fc = report.layers
    assert conv1.precision == "INT8" and conv1.outputs[0].precision == "FP32" and not conv1.not_int8
    assert conv1.inputs[0].format == "Thirty-two wide channel vectorized row major format (kCHW32)"
    assert conv2.precision == "FP16" and conv2.not_int8
    # kgen layers hide the kernel kind; the ONNX op in Metadata marks it as a Gemm
    assert fc.layer_type == "kgen" and fc.weighted and fc.not_int8 and fc.onnx_nodes == ("/fc/Gemm",)
    assert [t["Name"] for t in report.io_tensors] == ["input", "logits"]
    assert {layer.name for layer in report.not_int8_layers} == {"/conv2/Conv", "__myl_FcGemm_0"}


def test_inspector_11x_detected_from_layer_fields_alone() -> None:
    info = {"Layers": ENGINE_INFO_11X["Layers"][:1]}
    assert parse_engine_information(json.dumps(info)).schema == "11.x"


def test_inspector_report_outputs() -> None:
    report = parse_engine_information(json.dumps(ENGINE_INFO_10X))
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data  # JSON-ready
    assert data["not_int8_layers"] == ["/fc/Gemm"] and len(data["layers"]) == 3
    table = report.format_table()
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["#", "layer", "type", "precision"]
    assert "<- not INT8" in next(line for line in lines if "/fc/Gemm" in line)
    assert "1 weighted layer(s) not INT8" in lines[-1]
    assert "Reformat" not in report.format_table(only_weighted=True)


def test_inspector_names_only_and_bad_input() -> None:
    report = parse_engine_information(json.dumps({"Layers": ["/conv1/Conv", "/fc/Gemm"], "Bindings": ["x", "y"]}))
    assert report.schema == "names-only" and not report.detailed and report.not_int8_layers == []
    assert "profiling_verbosity='detailed'" in report.format_table()
    with pytest.raises(ValueError, match="not JSON"):
        parse_engine_information("Layer names only")
    with pytest.raises(ValueError, match="no 'Layers' list"):
        parse_engine_information('{"Bindings": []}')


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Thirty-two wide channel vectorized row major Int8 format.", "INT8"),
        ("Int8 NC/32HW32", "INT8"),
        ("Row major linear FP32", "FP32"),
        ("Float", "FP32"),
        ("Row major linear FP16 format", "FP16"),
        ("Half", "FP16"),
        ("Row major linear BFloat16 format", "BF16"),
        ("Row major linear FP8 format", "FP8"),
        ("Row major linear UInt8 format", "UINT8"),
        ("Row major linear Int32", "INT32"),
        ("Row major linear BOOL", "BOOL"),
        ("N/A due to dynamic shapes", "unknown"),
        (None, "unknown"),
    ],
)
def test_normalize_precision(text: str | None, expected: str) -> None:
    assert normalize_precision(text) == expected


def test_onnx_nodes_from_metadata() -> None:
    assert onnx_nodes_from_metadata("[ONNX Layer: a/Conv]\x1e[ONNX Layer: b/Relu]\x1e[ONNX Layer: a/Conv]") == ("a/Conv", "b/Relu")
    assert onnx_nodes_from_metadata(["[ONNX Layer: x]", "[ONNX Layer: y]"]) == ("x", "y")
    assert onnx_nodes_from_metadata(None) == () and onnx_nodes_from_metadata("no nodes") == ()


def test_layer_report_reads_saved_json_without_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    saved = tmp_path / "model.engine.layers.json"
    saved.write_text(json.dumps(ENGINE_INFO_10X))
    assert layer_report(saved).schema == "10.x"
    with pytest.raises(TensorRTNotAvailableError):
        layer_report(b"not an engine")


# --------------------------------------------------------------------------- TensorRT availability


def _assert_install_help(message: str) -> None:
    for route in ("pip install tensorrt-cu12", "pip install tensorrt-cu13", "nvcr.io/nvidia/tensorrt:<YY.MM>-py3",
                  "JetPack", "python3-libnvinfer", "l4t-jetpack"):
        assert route in message, route


def test_missing_tensorrt_raises_with_install_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` -> ImportError
    with pytest.raises(TensorRTNotAvailableError) as info:
        _trt.import_tensorrt()
    _assert_install_help(str(info.value))
    assert not _trt.tensorrt_available()
    with pytest.raises(TensorRTNotAvailableError):
        _trt.trt_version()


def test_stub_only_tensorrt_is_not_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    # tensorrt-stubs installs tensorrt/__init__.pyi only: Python imports an empty namespace package.
    stub = types.ModuleType("tensorrt")
    stub.__path__ = ["/site-packages/tensorrt"]
    monkeypatch.setitem(sys.modules, "tensorrt", stub)
    with pytest.raises(TensorRTNotAvailableError, match="only type stubs") as info:
        _trt.import_tensorrt()
    _assert_install_help(str(info.value))


def test_real_looking_tensorrt_is_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("tensorrt")
    setattr(fake, "Builder", object)
    setattr(fake, "__version__", "10.13.0.35")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    assert _trt.import_tensorrt() is fake
    assert _trt.trt_version()[:3] == (10, 13, 0)


@pytest.mark.parametrize(
    "text, expected", [("10.13.0.35", (10, 13, 0)), ("8.6.1", (8, 6, 1)), ("11.0", (11, 0, 0)), (" 9.3.0.post12", (9, 3, 0))]
)
def test_parse_trt_version(text: str, expected: tuple[int, int, int]) -> None:
    version = _trt.parse_trt_version(text)
    assert version[:3] == expected and str(version) == text.strip()


def test_parse_trt_version_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="cannot parse"):
        _trt.parse_trt_version("latest")


def test_build_engine_without_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"\x08\x07")
    with pytest.raises(TensorRTNotAvailableError, match="tensorrt-cu12"):
        build_engine(onnx_path, tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()
    with pytest.raises(FileNotFoundError):
        build_engine(tmp_path / "missing.onnx", tmp_path / "m.engine")
    with pytest.raises(ValueError, match="optimization_level"):
        build_engine(onnx_path, tmp_path / "m.engine", optimization_level=7)
    with pytest.raises(ValueError, match="gpu_fallback"):
        build_engine(onnx_path, tmp_path / "m.engine", gpu_fallback=True)


def test_trt_runner_without_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    plan = tmp_path / "m.engine"
    plan.write_bytes(b"plan")
    with pytest.raises(TensorRTNotAvailableError):
        TrtRunner(plan)


def test_torch_dtype_from_trt() -> None:
    assert torch_dtype_from_trt("FLOAT") is torch.float32
    assert torch_dtype_from_trt("HALF") is torch.float16
    assert torch_dtype_from_trt(types.SimpleNamespace(name="INT8")) is torch.int8
    with pytest.raises(TypeError, match="INT4"):
        torch_dtype_from_trt("INT4")


# --------------------------------------------------------------------------- build decisions

V86, V103, V1012, V110 = (_trt.parse_trt_version(v) for v in ("8.6.1", "10.3.0", "10.12.0", "11.0.0"))
NDCF_10 = {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}
NDCF_86 = {"EXPLICIT_BATCH": 0}
BUILDER_FLAGS_10 = ["FP16", "INT8", "BF16", "FP8", "INT4", "TF32"]


def test_network_creation_flags_per_version() -> None:
    assert network_creation_flags(V110, True, {"STRONGLY_TYPED": 1}) == 0  # 11.x: implied; never EXPLICIT_BATCH
    assert network_creation_flags(V103, True, NDCF_10) == 1 << 1
    assert network_creation_flags(V103, False, NDCF_10) == 0  # EXPLICIT_BATCH is ignored on 10.x
    assert network_creation_flags(V86, False, NDCF_86) == 1 << 0
    with pytest.raises(ValueError, match="only strongly typed"):
        network_creation_flags(V110, False, {})
    with pytest.raises(ValueError, match="no strongly typed networks"):
        network_creation_flags(V86, True, NDCF_86)


def test_precision_flags_rules(caplog: pytest.LogCaptureFixture) -> None:
    assert precision_builder_flags(V103, True, (), BUILDER_FLAGS_10) == []
    assert precision_builder_flags(V103, False, ("int8", "fp16", "int8"), BUILDER_FLAGS_10) == ["INT8", "FP16"]
    with pytest.raises(ValueError, match="not compatible with a strongly typed network"):
        precision_builder_flags(V103, True, ("fp16",), BUILDER_FLAGS_10)
    with pytest.raises(ValueError, match=r"TensorRT 11\.0\.0 removed"):
        precision_builder_flags(V110, True, ("int8",), [])
    with pytest.raises(ValueError, match="unknown precision flag"):
        precision_builder_flags(V103, False, ("int7",), BUILDER_FLAGS_10)
    with pytest.raises(ValueError, match="has no BuilderFlag.FP8"):
        precision_builder_flags(V86, False, ("fp8",), ["INT8", "FP16"])
    with caplog.at_level(logging.WARNING, logger="trtquant.engine"):
        precision_builder_flags(V1012, False, ("int8",), BUILDER_FLAGS_10)
    assert "deprecated since TensorRT 10.12" in caplog.text


def test_profile_shapes_dynamic_batch_defaults() -> None:
    inputs = {"x": (-1, 3, 32, 32), "mask": (1, 4)}
    shapes = resolve_profile_shapes(inputs, max_shapes={"x": 16}, opt_shapes={"x": (8, 3, 32, 32)})
    assert shapes == {"x": ((1, 3, 32, 32), (8, 3, 32, 32), (16, 3, 32, 32))}  # static 'mask' needs no profile
    assert resolve_profile_shapes(inputs, max_shapes={"x": 4})["x"] == ((1, 3, 32, 32), (4, 3, 32, 32), (4, 3, 32, 32))
    fixed = resolve_profile_shapes(inputs, min_shapes={"x": 2}, opt_shapes={"x": 2}, max_shapes={"x": 2})
    assert fixed["x"] == ((2, 3, 32, 32),) * 3
    assert resolve_profile_shapes({"x": (1, 3, 8, 8)}) == {}


def test_profile_shapes_dynamic_spatial_dims() -> None:
    inputs = {"x": (-1, 3, -1, -1)}
    shapes = resolve_profile_shapes(inputs, opt_shapes={"x": (4, 3, 224, 224)}, max_shapes={"x": (8, 3, 320, 320)})
    assert shapes["x"] == ((1, 3, 224, 224), (4, 3, 224, 224), (8, 3, 320, 320))
    with pytest.raises(ValueError, match="other dynamic dimensions"):
        resolve_profile_shapes(inputs, max_shapes={"x": 8})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, r"input 'x' has dynamic shape .*max_shapes=\{'x': 32\}"),
        ({"max_shapes": {"y": 4}}, r"unknown input\(s\) \['y'\]"),
        ({"max_shapes": {"x": (4, 1, 32, 32)}}, "dimension 1 is static"),
        ({"max_shapes": {"x": (4, 3, 32)}}, "rank 3"),
        ({"min_shapes": {"x": 8}, "max_shapes": {"x": 4}}, "min <= opt <= max"),
        ({"max_shapes": {"x": (0, 3, 32, 32)}}, "must be > 0"),
    ],
)
def test_profile_shapes_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resolve_profile_shapes({"x": (-1, 3, 32, 32)}, **kwargs)


class _FakeParserError8x:
    """TensorRT 8.x parser errors: code(), desc(), node(); no node_name()/node_operator()."""

    def __init__(self, code: str, desc: str, node: int) -> None:
        self._code, self._desc, self._node = code, desc, node

    def code(self) -> types.SimpleNamespace:
        return types.SimpleNamespace(name=self._code)

    def desc(self) -> str:
        return self._desc

    def node(self) -> int:
        return self._node


class _FakeParserError(_FakeParserError8x):
    def __init__(self, code: str, desc: str, node: int, node_name: str, op: str) -> None:
        super().__init__(code, desc, node)
        self._name, self._op = node_name, op

    def node_name(self) -> str:
        return self._name

    def node_operator(self) -> str:
        return self._op


class _FakeParser:
    def __init__(self, errors: list[_FakeParserError8x]) -> None:
        self._errors = errors
        self.num_errors = len(errors)

    def get_error(self, index: int) -> _FakeParserError8x:
        return self._errors[index]


def test_collect_and_format_every_parser_error() -> None:
    parser = _FakeParser(
        [
            _FakeParserError("UNSUPPORTED_NODE", "TensorRT only supports symmetric quantization", 3, "/conv1/input_quantizer/QuantizeLinear", "QuantizeLinear"),
            _FakeParserError("INVALID_NODE", "number of scales is not equal to the number of output channels", 7, "/conv2/weight_quantizer/DequantizeLinear", "DequantizeLinear"),
            _FakeParserError8x("MODEL_DESERIALIZE_FAILED", "Failed to parse the ONNX model", -1),
        ]
    )
    errors = collect_parser_errors(parser)
    assert [e.node_index for e in errors] == [3, 7, None]
    assert errors[0] == ParserErrorInfo(0, "UNSUPPORTED_NODE", "TensorRT only supports symmetric quantization", 3,
                                        "/conv1/input_quantizer/QuantizeLinear", "QuantizeLinear")
    assert errors[2].node_name is None
    message = format_parser_errors("model.onnx", errors, "10.13.0.35")
    assert "rejected model.onnx with 3 error(s)" in message
    for text in ("/conv1/input_quantizer/QuantizeLinear", "/conv2/weight_quantizer/DequantizeLinear",
                 "symmetric quantization", "[MODEL_DESERIALIZE_FAILED]", "node 7"):
        assert text in message
    assert "Nodes to fix: /conv1/input_quantizer/QuantizeLinear, /conv2/weight_quantizer/DequantizeLinear." in message


# --------------------------------------------------------------------------- metadata and files


def test_sha256_and_paths(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 17)  # spans several read chunks
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(path, chunk_size=1000) == hashlib.sha256(data).hexdigest()
    assert metadata_path_for(tmp_path / "m.engine") == tmp_path / "m.engine.json"
    assert layer_info_path_for("out/m.plan") == Path("out/m.plan.layers.json")


def test_build_metadata_is_json_and_keyed() -> None:
    options = {"strongly_typed": True, "optimization_level": 3}
    shapes = {"x": ((1, 3, 8, 8), (4, 3, 8, 8), (8, 3, 8, 8))}
    gpu = {"name": "NVIDIA H100", "compute_capability": "9.0"}
    meta = build_metadata(onnx_path="m.onnx", onnx_sha256="ab" * 32, engine_path="m.engine", engine_sha256="cd" * 32,
                          engine_bytes=123, trt_version="10.13.0.35", options=options, profile_shapes=shapes,
                          gpu=gpu, build_time_s=1.23456)
    assert json.loads(json.dumps(meta)) == meta
    assert meta["tensorrt_version"] == "10.13.0.35" and meta["gpu"]["compute_capability"] == "9.0"
    assert meta["onnx"]["sha256"] == "ab" * 32 and meta["options"] == options and meta["build_time_s"] == 1.235
    assert meta["profile_shapes"]["x"] == {"min": [1, 3, 8, 8], "opt": [4, 3, 8, 8], "max": [8, 3, 8, 8]}
    assert meta["cache_key"] == engine_cache_key("ab" * 32, "10.13.0.35", gpu, {**options, "profile_shapes": shapes})
    assert engine_cache_key("ab" * 32, "10.13.0.35", gpu, {"optimization_level": 5}) != meta["cache_key"]
    assert engine_cache_key("ab" * 32, "11.0.0", gpu, options) != engine_cache_key("ab" * 32, "10.13.0.35", gpu, options)


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    cache = tmp_path / "caches" / "timing.cache"
    atomic_write_bytes(cache, b"old cache")
    atomic_write_bytes(cache, memoryview(b"new cache"))  # IHostMemory-like buffers are accepted
    assert cache.read_bytes() == b"new cache"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o644
    assert atomic_write_text(tmp_path / "m.json", "{}\n").read_text() == "{}\n"
    assert sorted(p.name for p in cache.parent.iterdir()) == ["timing.cache"]  # no temp files left


def test_atomic_write_failure_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"good")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(cache, b"half-written")
    assert cache.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["timing.cache"]
