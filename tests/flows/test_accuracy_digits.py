"""Digits ResNet end to end on real data: FP32 -> PTQ (every amax method from one calibration cache)
-> QAT -> ONNX export -> ONNX Runtime CPU INT8. The float model trains on first use (about 30 s on
2 cores) and is cached (``$TRTQUANT_CACHE_DIR`` or ``~/.cache/trtquant``); the rest takes ~25 s.
"""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn", reason="the digits data set comes with scikit-learn (the 'accuracy' extra)")

from trtquant.accuracy.harness import METHODS, markdown_digits, run_digits  # noqa: E402


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    r = run_digits(quick=True, workdir=tmp_path_factory.mktemp("digits"))
    print("\n" + markdown_digits(r))
    return r


def test_every_method_recomputed_from_one_calibration_cache(result):
    assert list(result["ptq"]) == [label for label, _ in METHODS]
    assert result["calibration_cache"].endswith(".safetensors")
    assert result["fp32"] >= 97.0  # the float model is actually trained


def test_best_ptq_within_one_point_of_fp32(result):
    assert result["fp32"] - result["ptq_best"] <= 1.0, result["ptq"]


def test_qat_at_least_ptq(result):
    assert result["qat"] >= result["ptq_best"], (result["qat"], result["ptq_best"], result["qat_losses"])


def test_onnxruntime_int8_matches_fake_quant(result):
    assert abs(result["ptq_ort"] - result["ptq_best"]) <= 0.5
    assert abs(result["qat_ort"] - result["qat"]) <= 0.5
    if result["onnx_target"] == "onnxruntime":  # INT8 kernels really ran, not float Q/DQ emulation
        # All 9 convs: after QAT the stem's ReLU output is still read with one learned amax by conv1 and
        # the residual quantizer (prepare_qat ties them), so the stem writes one INT8 output.
        assert result["ort_int8_kernels"].get("QLinearConv", 0) >= 9
