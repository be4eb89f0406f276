"""A real ImageNet-pretrained CNN (EfficientNet-Lite0) on random crops of real photographs, loaded by trtquant's
loading code from installed packages: per-channel INT8 stays within INT8's own rounding noise of FP32, in fake
quant and in ONNX Runtime INT8. The full-size figures are `python bench/imagenet_accuracy.py` (README)."""

from __future__ import annotations

import copy

import pytest
import torch

from trtquant.accuracy import imagenet as I

_WHY = I.why_unavailable()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=str(_WHY))


def test_per_channel_int8_within_rounding_noise(tmp_path):
    import sys
    from pathlib import Path

    import trtquant

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from imagenet_accuracy import ort_logits

    torch.manual_seed(0)
    fp = I.load_efficientnet_lite0()
    ev, cal = I.split(per_image_eval=8, per_image_calib=2)
    assert len(ev) == 8 * len(I.photos()) and ev.shape[1:] == (3, 224, 224)
    ref = I.logits(fp, ev)
    assert ref.argmax(-1)[(ref.softmax(-1).max(-1).values >= 0.5)].numel() >= 8  # real predictions, not noise
    q = trtquant.quantize(copy.deepcopy(fp))
    trtquant.calibrate(q, I.batches(cal, 16), method="percentile", percentile=99.99, progress=False)
    fake = I.agreement(ref, I.logits(q, ev))
    noise = I.rounding_noise_reference(q, ev, ref)
    ort = I.agreement(ref, ort_logits(q, ev, tmp_path / "effnet_int8.onnx"))
    print(f"\nfake quant: {I.describe(fake)}\nrounding-noise reference: {I.describe(noise)}\nORT INT8: {I.describe(ort)}")
    assert fake.kl < noise.kl and fake.confident_top1 >= 0.9
    assert ort.kl < noise.kl and abs(ort.confident_top1 - fake.confident_top1) <= 0.1
