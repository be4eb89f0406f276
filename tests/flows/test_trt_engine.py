"""Real TensorRT: build a tiny Q/DQ ONNX, inspect the engine, run it, compare with ONNX Runtime,
benchmark it. Marked ``trt``; skipped with the reason unless TensorRT imports and CUDA is present.

The Q/DQ model is written with onnx.helper so this test depends only on the engine package:
input (N, 16, 8, 8) -> Q/DQ (per-tensor, scale 1/32) -> Conv 16->16 3x3 with per-channel Q/DQ
weights (axis 0) -> Relu -> output. 16 channels: TensorRT's INT8 convolutions want C % 4/32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trtquant.engine import _trt
from _models import qdq_conv_onnx


def _why_no_tensorrt() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    try:
        _trt.import_tensorrt()
    except Exception as exc:  # TensorRTNotAvailableError, or a broken native install
        return f"needs the TensorRT Python package: {str(exc).splitlines()[0]}"
    return None


_SKIP_REASON = _why_no_tensorrt()
pytestmark = [pytest.mark.trt, pytest.mark.gpu, pytest.mark.skipif(_SKIP_REASON is not None, reason=str(_SKIP_REASON))]

CHANNELS = 16


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    from trtquant.engine import build_engine

    root = tmp_path_factory.mktemp("trt")
    onnx_path = qdq_conv_onnx(root / "qdq_conv.onnx")
    result = build_engine(onnx_path, root / "qdq_conv.engine", max_shapes={"input": 8}, opt_shapes={"input": 4},
                          timing_cache_path=root / "timing.cache", workspace_mib=256)
    return onnx_path, result


def test_build_writes_engine_metadata_layer_info_and_timing_cache(built: tuple[Path, Any]) -> None:
    onnx_path, result = built
    assert result.engine_path.stat().st_size > 0
    meta = json.loads(result.metadata_path.read_text())
    assert meta == result.metadata
    assert meta["tensorrt_version"] == str(_trt.trt_version())
    assert meta["gpu"]["compute_capability"] and meta["options"]["strongly_typed"] is True
    assert meta["profile_shapes"]["input"] == {"min": [1, 16, 8, 8], "opt": [4, 16, 8, 8], "max": [8, 16, 8, 8]}
    from trtquant.engine.build import sha256_file

    assert meta["onnx"]["sha256"] == sha256_file(onnx_path)
    assert (result.engine_path.parent / "timing.cache").stat().st_size > 0
    assert result.layer_report_path is not None and result.layer_report_path.is_file()


def test_inspector_shows_int8_conv(built: tuple[Path, Any]) -> None:
    from trtquant.engine import layer_report

    _, result = built
    report = layer_report(result.engine_path)
    assert report.detailed
    weighted = [layer for layer in report.layers if layer.weighted]
    assert weighted, report.format_table()
    assert all(layer.precision == "INT8" for layer in weighted), report.format_table()
    assert any("/conv/Conv" in layer.onnx_nodes for layer in weighted), report.format_table()
    assert layer_report(result.layer_report_path).to_dict() == report.to_dict()


def test_runner_matches_onnxruntime(built: tuple[Path, Any]) -> None:
    import onnxruntime as ort

    from trtquant.engine import TrtRunner

    onnx_path, result = built
    x = torch.randn(3, CHANNELS, 8, 8)
    with TrtRunner(result.engine_path) as runner:
        assert [s.name for s in runner.inputs] == ["input"] and runner.inputs[0].profile is not None
        got = runner.infer(x.cuda())["output"].cpu().numpy()
        assert runner.capture_cuda_graph() in (True, False)
        with pytest.raises(ValueError, match="optimization profile"):
            runner.bind(torch.randn(16, CHANNELS, 8, 8, device="cuda"))
    want = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    # Same integer math; differences come from float accumulation order / output rounding.
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=1e-2)


def test_parser_rejects_asymmetric_qdq_naming_the_node(tmp_path: Path) -> None:
    from trtquant.engine import build_engine
    from trtquant.errors import EngineBuildError

    onnx_path = qdq_conv_onnx(tmp_path / "asym.onnx", zero_point=3)
    with pytest.raises(EngineBuildError) as info:
        build_engine(onnx_path, tmp_path / "asym.engine", max_shapes={"input": 2})
    assert "/conv/input_quantizer" in str(info.value)
    assert getattr(info.value, "parser_errors")
    assert not (tmp_path / "asym.engine").exists()


def test_benchmark_tensorrt_backend(built: tuple[Path, Any]) -> None:
    from trtquant.bench import benchmark

    _, result = built
    bench = benchmark("tensorrt", result.engine_path, batch_sizes=(1, 8), cuda_graph=True, include_transfers=True,
                      warmup_s=0.05, duration_s=0.2, min_iterations=10, cv_threshold_pct=1e9)
    assert bench.config["engine_metadata"]["tensorrt_version"] == str(_trt.trt_version())
    for r in bench.results:
        stats = r.latency_ms.to_dict()
        assert r.timing == "cuda_events" and r.iterations >= 10 and r.walltime_s >= 0.2
        assert stats["min"] <= stats["median"] <= stats["p90"] <= stats["p95"] <= stats["p99"] <= stats["max"]
        assert r.h2d_ms is not None and r.d2h_ms is not None
    with pytest.raises(ValueError, match="outside the engine's optimization profile"):
        benchmark("tensorrt", result.engine_path, batch_sizes=(16,), warmup_s=0, duration_s=0, min_iterations=1)
