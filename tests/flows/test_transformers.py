"""Transformers end to end (issue: attention quantized for TensorRT's INT8 MHA fusion), on small configurations.

For each attention style - ``nn.MultiheadAttention`` (ViT, ``nn.TransformerEncoder``), torchvision's Swin (attention
inside an fx-wrapped function on the ``qkv``/``proj`` weights), MaxViT (einsum attention), Hugging-Face-style
matmul attention and ``scaled_dot_product_attention`` - every Linear and both attention matmuls of every block are
quantized (counted), calibration and export succeed, ``check_onnx`` has no error and finds every attention block in
the fusable shape (C27), the graph's codes agree with fake quant teacher-forced, and the ONNX Runtime target is
valid and agrees with its flavour (random init: judged against the model's own chaos floor, as in the zoo sweep).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("torchvision")
ort = pytest.importorskip("onnxruntime")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _transformers import small_models  # noqa: E402

import trtquant  # noqa: E402
from trtquant.export import check_onnx, export_onnx  # noqa: E402
from trtquant.export.parity import teacher_forced  # noqa: E402
from trtquant.nn.attention import BMM_QUANTIZERS  # noqa: E402
from trtquant.placement.fx_pass import placement_report  # noqa: E402

MODELS = small_models()


def _run(path: Path, x: torch.Tensor) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("name", list(MODELS))
def test_attention_quantized_end_to_end(name, tmp_path):
    """Legacy (TorchScript) exporter; the dynamo exporter's graph of each model: test_dynamo_export."""
    make, data, blocks = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    with torch.no_grad():  # ViT zero-initializes its head (test_zero_initialized_head): outputs 0 compare nothing
        for m in model.modules():
            if isinstance(m, nn.Linear) and not m.weight.any():
                m.weight.normal_(0, 0.05)
    n_linear = sum(isinstance(m, nn.Linear) and not isinstance(m, nn.MultiheadAttention) for m in model.modules())
    n_mha = sum(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    trtquant.quantize(model)
    rep = placement_report(model)
    on = {e["quantizer"] for e in rep["quantizers"] if e["enabled"]}
    # Every Linear (MHA's out_proj included) has both quantizers on; MHA's in_proj too.
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == n_linear
    for n in linears:
        assert {f"{n}.input_quantizer", f"{n}.weight_quantizer"} <= on, n
    # Both attention matmuls of every block: four quantizers per block.
    bmm = [q for q in on if q.rsplit(".", 1)[-1].split("_1")[0] in BMM_QUANTIZERS]
    assert len(bmm) == 4 * blocks, sorted(bmm)
    assert n_mha == 0 or sum(q.endswith("in_proj") or "self_attn" in q or "self_attention" in q for q in on) > 0

    calib = [data() for _ in range(2)]
    trtquant.calibrate(model, calib, method="percentile", progress=False)
    assert all(model.get_submodule(q).amax is not None for q in bmm)
    x = data()
    path = tmp_path / f"{name}.onnx"
    export_onnx(model, x, path, exporter="legacy")
    report = check_onnx(str(path))
    assert not report.errors, report.format_table()
    fusable = [f for f in report.findings if f.rule == "C27-attention-fusable"]
    assert len(fusable) == blocks, report.format_table()
    assert not [f for f in report.findings if f.rule in ("C27-attention-float", "C27-attention-scale")]

    tf = teacher_forced(model, path, x)
    assert tf.codes > 1000 and tf.off_by_one <= 1e-4 * tf.codes, [n.node for n in tf.flagged()][:5]
    assert sum(n.mismatched - n.off_by_one for n in tf.nodes) == 0

    ort_path = tmp_path / f"{name}_ort.onnx"
    export_onnx(model, x, ort_path, target="onnxruntime", exporter="legacy")
    from trtquant.export.ort_flavor import ort_flavor_

    flavour = ort_flavor_(copy.deepcopy(model))
    with torch.no_grad():
        ref = flavour(x).numpy()
        noisy = flavour(x * (1 + 1e-6 * torch.randn_like(x))).numpy()
    floor = _cos(ref, noisy)
    cos = _cos(ref, _run(ort_path, x))
    print(f"\n{name}: {len(bmm)} attention-matmul quantizers, ORT target cosine {cos:.6f} (chaos floor {floor:.6f})")
    assert cos >= min(0.999, floor)


def test_zero_initialized_head_calibrates_with_a_warning(caplog):
    """torchvision's ViT zero-initializes its head: a valid positive scale and a warning naming it, no crash."""
    make, data, _ = MODELS["vit"]
    torch.manual_seed(0)
    model = make().eval()
    assert not model.heads.head.weight.any()
    trtquant.quantize(model)
    with caplog.at_level("WARNING"):
        trtquant.calibrate(model, [data()], method="percentile", progress=False)
    amax = model.heads.head.weight_quantizer.amax
    assert amax is not None and bool((amax > 0).all())
    assert "heads.head.weight_quantizer" in caplog.text


@pytest.mark.parametrize("name", list(MODELS))
def test_dynamo_export(name, tmp_path):
    """torch.export-based export of the same quantized models: no checker error, every attention fusable."""
    make, data, blocks = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    trtquant.quantize(model)
    trtquant.calibrate(model, [data()], method="max", progress=False)
    path = tmp_path / f"{name}.onnx"
    export_onnx(model, data(), path, exporter="dynamo")
    report = check_onnx(str(path))
    assert not report.errors, report.format_table()
    assert len([f for f in report.findings if f.rule == "C27-attention-fusable"]) == blocks, report.format_table()
