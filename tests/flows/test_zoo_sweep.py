"""The zoo sweep (bench/zoo.py) on one small model, end to end, with the issue's acceptance bars.

MobileNetV3-Small carries the patterns that broke the ONNX Runtime target (squeeze-excitation with
Hardsigmoid, HardSwish, depthwise convs) and residual blocks; the full sweep over torchvision's zoo is
a benchmark (``python bench/zoo.py``), this keeps its code path and its figures honest in CI.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torchvision")
pytest.importorskip("onnxruntime")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import zoo  # noqa: E402


def test_sweep_row_meets_the_acceptance_bars(tmp_path):
    row = zoo.one_model("mobilenet_v3_small", "classification", size=64, workdir=tmp_path, speed=False,
                        per_tensor=True)
    print("\n" + zoo._fmt(row))
    assert "failed_at" not in row, row.get("traceback")
    assert row["placement"] == "traced" and row["quantizers"] > 100
    assert row["checker_errors"] == 0
    assert not any(k.endswith("C20-residual-add") for k in row["checker_by_rule"]), row["checker_by_rule"]
    for key in ("teacher_forced", "ort_teacher_forced"):  # <= 0.01 % of codes off by one, none by more
        tf = row[key]
        assert tf["codes"] > 100_000 and tf["off_by_one"] <= 1e-4 * tf["codes"] and tf["off_by_more"] == 0, (key, tf)
    assert row["ort_valid"]
    # Against its flavour, the ONNX Runtime graph is within the model's own chaos floor (or >= 0.999).
    assert min(row["ort_cosine"], row["ort_cosine_optimized"]) >= min(0.999, row["ort_chaos_floor"])
    for key in ("int8_convs", "int8_convs_per_tensor"):
        n_int8, n_conv = row[key]
        assert n_conv == 52 and n_int8 / n_conv >= 0.9, (key, row[key])
    assert row["e2e"]["cosine"] >= min(0.999, row["chaos_floor"]["cosine"])
