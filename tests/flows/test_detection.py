"""torchvision detectors: quantize and calibrate whole (batches of image lists), export the core.

The core (backbone + FPN + heads, no anchors/decoding/NMS/RoI pooling) must compute exactly what the
detector's own forward feeds its post-processing, export to Q/DQ ONNX that check_onnx passes with 0
errors, and ONNX Runtime must agree with the fake-quant core (cosine >= 0.99 per output).
Random-init MobileNetV3 backbones (SSDlite, Faster R-CNN mobilenet) output ~1e-8..1e-15 - degenerate
numerics - so the quantized flow runs on RetinaNet (ResNet-50 FPN) at 128x128; the others are
checked in float for the core's contract.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import trtquant

torchvision = pytest.importorskip("torchvision")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from torchvision.models import detection as D  # noqa: E402

from trtquant.calibrate import run_batch  # noqa: E402
from trtquant.export import check_onnx, compare, detection_core, detection_roi_head, export_onnx, prepare_images  # noqa: E402

SIZE = 128
SMALL = dict(weights=None, weights_backbone=None, num_classes=3, min_size=SIZE, max_size=SIZE)


def _images(n: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(n)]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))


def _captured(model: torch.nn.Module, module: torch.nn.Module, images: list):
    """What ``module`` returns while the whole detector runs on ``images`` (eval, float)."""
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
    return seen[0]


def test_retinanet_quantize_calibrate_export_core_ort_parity(tmp_path, capsys):
    torch.set_num_threads(1)
    model = D.retinanet_resnet50_fpn(**SMALL).eval()
    trtquant.quantize(model)
    trtquant.calibrate(model, [_images(2, seed) for seed in range(2)], method="max", progress=False)
    qs = trtquant.quantizers(model)
    assert all(q.amax is not None for q in qs.values() if q.is_enabled)
    assert any(n.startswith("head.classification_head") and q.is_enabled for n, q in qs.items())

    core = detection_core(model)
    assert core.output_names == ["cls_logits", "bbox_regression"]
    x = prepare_images(model, _images(2, 7))
    assert tuple(x.shape) == (2, 3, SIZE, SIZE)
    result = export_onnx(core, x, tmp_path / "retinanet_core.onnx", exporter="legacy", output_names=core.output_names)
    report = check_onnx(result.path)
    assert not report.errors, report
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = dict(zip(result.output_names, sess.run(None, {result.input_names[0]: x.numpy()})))
    with torch.no_grad():
        ref = core.named_outputs(x)
    anchors = sum(f * f for f in (16, 8, 4, 2, 1)) * 9  # P3-P7 of a 128x128 image, 9 anchors each
    assert ref["cls_logits"].shape == (2, anchors, 3) and ref["bbox_regression"].shape == (2, anchors, 4)
    with capsys.disabled():
        rules = sorted({f.rule for f in report.findings if f.severity == "warning"})
        print(f"\nretinanet core: {result.num_qdq} Q/DQ, check_onnx warnings by rule: {rules}")
        for name, value in ref.items():
            cos = _cosine(got[name], value.numpy())
            print(f"  {name} {tuple(value.shape)}: ORT vs fake quant cosine {cos:.6f}")
            assert got[name].shape == tuple(value.shape)
            assert cos >= 0.99, name

    # ONNX Runtime target: the head's final convs (a model output, called per level from untraced Python)
    # get their output Q from run-time observers, so every conv runs as an INT8 kernel, exactly.
    ort_path = tmp_path / "retinanet_core_ort.onnx"
    export_onnx(core, x, ort_path, exporter="legacy", target="onnxruntime", output_names=core.output_names)
    cmp = compare(core, ort_path, x, teacher_forced=True, input_noise=None)
    with capsys.disabled():
        print(f"retinanet core, ONNX Runtime target: INT8 convs {cmp.int8_conv_fraction:.3f}, "
              f"teacher-forced {cmp.teacher_forced.mismatched} of {cmp.teacher_forced.codes} codes differ")
    assert cmp.int8_conv_fraction == 1.0, cmp.notes
    assert cmp.teacher_forced.codes > 0 and cmp.teacher_forced.mismatched == 0
    assert all(o.cosine >= 0.99 for o in cmp.outputs), cmp.outputs


@pytest.mark.parametrize("arch", ["retinanet", "fcos", "ssdlite", "fasterrcnn"])
def test_core_outputs_are_what_the_detector_post_processes(arch):
    """Float: the core on prepare_images(...) equals what the full forward hands its post-processing."""
    torch.set_num_threads(1)
    if arch == "retinanet":
        model = D.retinanet_resnet50_fpn(**SMALL)
    elif arch == "fcos":
        model = D.fcos_resnet50_fpn(**SMALL)
    elif arch == "ssdlite":
        model = D.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)
    else:
        model = D.fasterrcnn_mobilenet_v3_large_fpn(**SMALL)
    model.eval()
    images = _images(1, 3)
    core = detection_core(model)
    with torch.no_grad():
        out = core.named_outputs(prepare_images(model, images))
    if arch == "fasterrcnn":
        objectness, deltas = _captured(model, model.rpn.head, images)
        levels = len(objectness)
        assert core.output_names[levels:] == [f"rpn_objectness_{i}" for i in range(levels)] + \
            [f"rpn_bbox_deltas_{i}" for i in range(levels)]
        for i in range(levels):
            assert torch.equal(out[f"rpn_objectness_{i}"], objectness[i])
            assert torch.equal(out[f"rpn_bbox_deltas_{i}"], deltas[i])
        pooled = torch.randn(5, model.backbone.out_channels, 7, 7)
        head = detection_roi_head(model)
        logits, boxes = head(pooled)
        with torch.no_grad():
            expected = model.roi_heads.box_predictor(model.roi_heads.box_head(pooled))
        assert head.output_names == ["class_logits", "box_regression"]
        assert torch.equal(logits, expected[0]) and boxes.shape == (5, 4 * 3)
        return
    head_out = _captured(model, model.head, images)
    assert set(out) == set(head_out)
    for name, value in head_out.items():
        assert torch.equal(out[name], value), name
    if arch in ("retinanet", "fcos"):
        per_level = detection_core(model, per_level=True)
        with torch.no_grad():
            levels = per_level.named_outputs(prepare_images(model, images))
        for name in out:
            parts = [v for k, v in levels.items() if k.rsplit("_", 1)[0] == name]
            assert len(parts) == 5 and torch.equal(torch.cat(parts, dim=1), out[name]), name


def test_image_list_batches_are_fed_whole_and_errors_name_the_model():
    model = D.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3).eval()
    images = _images(2, 0)
    with torch.no_grad():
        direct = model(images)
        fed = run_batch(model, images)  # a list of [C, H, W] images is one batch, not (inputs, labels)
        pair = run_batch(model, (images, [{}] * 2))  # (images, targets): the images
    for a, b, c in zip(direct, fed, pair):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["boxes"], c["boxes"])
    # A classifier keeps the (inputs, labels) convention.
    linear = torch.nn.Linear(4, 2)
    assert run_batch(linear, [torch.randn(3, 4), torch.tensor([0, 1, 0])]).shape == (3, 2)
    with pytest.raises(TypeError, match=r"detection_core supports .* got Linear"):
        detection_core(linear)
    with pytest.raises(ValueError, match=r"per_level=True is for RetinaNet and FCOS; SSD"):
        detection_core(model, per_level=True)
    with pytest.raises(TypeError, match=r"needs a GeneralizedRCNN.*got SSD"):
        detection_roi_head(model)
