"""FP8 E4M3 and INT4 weight-only on real models (issue: FP8/INT4 Q/DQ for TensorRT).

ResNet-18 (torchvision, random init: structure and exactness) and the pretrained MiniLM-L6 encoder
(skipped with the reason when its package is missing): the TensorRT graph passes the checker, and
ONNX Runtime reproduces the fake-quant model exactly - every FP8 activation code teacher-forced,
every INT4 weight element by element - while the cosine to FP32 is reported and bounded.
"""

from __future__ import annotations

import pytest

from trtquant.accuracy.minilm import why_unavailable

pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_resnet18_fp8_graph_is_clean_and_exact(tmp_path, dtype):
    pytest.importorskip("torchvision")
    from trtquant.accuracy.formats import resnet18_fp8

    r = resnet18_fp8(tmp_path, size=64, dtype=dtype)
    print(r)
    assert r["fp8_quantizers"] == 42  # 20 convs + fc, input and weight each: no residual/pool/observer Q/DQ
    assert r["checker_errors"] == []
    assert set(r["checker_warnings"]) <= {"C23-small-channel-conv", "A6-fp8-fp32-graph", "A5-fp32-graph"}
    assert ("A6-fp8-fp32-graph" in r["checker_warnings"]) == (dtype == "fp32")
    tf = r["teacher_forced"]
    assert tf["nodes"] >= 17 and tf["codes"] > 100_000 and tf["mismatched"] == 0 and not tf["flagged"]


_WHY = why_unavailable()
minilm = pytest.mark.skipif(_WHY is not None, reason=str(_WHY))


@minilm
def test_minilm_fp8_close_to_fp32_and_exact_in_onnx_runtime(tmp_path):
    from trtquant.accuracy.formats import minilm_format

    r = minilm_format("fp8", tmp_path, quick=True)
    print(r)
    assert r["weight_formats"] == {"e4m3": 36}
    assert r["fake_quant"]["mean_cosine"] >= 0.995  # measured 0.9975 (INT8 per tensor: 0.9886)
    assert r["teacher_forced"]["mismatched"] == 0 and r["teacher_forced"]["codes"] > 1_000_000
    assert abs(r["ort"]["mean_cosine"] - r["fake_quant"]["mean_cosine"]) < 1e-3
    assert r["checker_errors"] == []


@minilm
def test_minilm_int4_weight_only_exact_weights_and_matmulnbits(tmp_path):
    from trtquant.accuracy.formats import minilm_format

    r = minilm_format("int4", tmp_path, quick=True, block_size=128)
    print(r)
    assert r["weight_formats"] == {"int4": 36}
    assert r["weight_parity"] == {"layers": 36, "mismatched": 0}
    assert r["ort_kernels"].get("MatMulNBits") == 36  # ONNX Runtime's 4-bit kernel on every INT4 Linear
    assert r["fake_quant"]["mean_cosine"] >= 0.94  # measured 0.955 with the clip search (0.934 with max)
    assert abs(r["ort"]["mean_cosine"] - r["fake_quant"]["mean_cosine"]) < 5e-3  # MatMulNBits: int8 activations
    assert r["checker_errors"] == []
