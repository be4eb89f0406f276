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
    import trtquant

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
    ort = I.agreement(ref, I.ort_logits(q, ev, tmp_path / "effnet_int8.onnx"))
    print(f"\nfake quant: {I.describe(fake)}\nrounding-noise reference: {I.describe(noise)}\nORT INT8: {I.describe(ort)}")
    assert fake.kl < noise.kl and fake.confident_top1 >= 0.9
    assert ort.kl < noise.kl and abs(ort.confident_top1 - fake.confident_top1) <= 0.1


def test_after_a_qat_step_the_model_copies_and_its_weight_cache_holds_no_graph():
    """Regression: after one grad-enabled step, a no-grad pass cached fake-quantized weights of the last layers
    with a grad_fn (a pooled output buffer handed out again with the graph autograd had attached to it), so
    deepcopy - and export, which copies the model - failed on a QAT'd EfficientNet-Lite0."""
    import trtquant
    from trtquant.qat import prepare_qat
    from trtquant.states import set_state

    fp = I.load_efficientnet_lite0()
    x = I.random_crops(I.photos(), 1, seed=3)[:4]
    q = trtquant.quantize(copy.deepcopy(fp))
    trtquant.calibrate(q, [x], method="max", progress=False)
    prepare_qat(q, learn_amax=True)
    q(x[:2]).sum().backward()
    q.eval()
    set_state(q, "validate")
    with torch.no_grad():
        q(x[:1])
    holding = [n for n, m in q.named_modules()
               if m.__dict__.get("_wq_cache") is not None and m._wq_cache[1].grad_fn is not None]
    assert not holding, holding
    copy.deepcopy(q)


def test_input_noise_references_bracket_the_cost_of_quantizing_the_input():
    """Half an input step of noise is exactly the input's rounding error, a stricter floor than the acceptance
    reference (one step); quantizing only the input costs less than either (rounding lands nearer the pixel grid
    than uniform noise does)."""
    import trtquant

    fp = I.load_efficientnet_lite0()
    ev, cal = I.split(per_image_eval=6, per_image_calib=2)
    ref = I.logits(fp, ev)
    refs = I.references(fp, ev, ref, cal)
    one, half = refs["input_noise_reference"]["kl"], refs["input_rounding_reference"]["kl"]
    q = trtquant.quantize(copy.deepcopy(fp))
    trtquant.calibrate(q, I.batches(cal, 16), method="percentile", percentile=99.99, progress=False)
    alone = I.input_only(q, ev, ref)
    print(f"\none step KL {one:.4f}, half a step KL {half:.4f}, input quantizer alone KL {alone.kl:.4f}")
    assert 0 < alone.kl < half < one
    assert one > 3 * half  # noise grows the KL faster than its variance: far from a rounding-sized floor
