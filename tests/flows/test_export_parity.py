"""ONNX Runtime (graph optimisations off, Q/DQ executed literally) vs the PyTorch fake-quant model, fp32 graph.

(a) Teacher-forced, layer by layer: every activation QuantizeLinear's float input is taken from ONNX
    Runtime and quantized again in torch with the scale from the ONNX initializer; the int8 codes must
    agree (at most 0.01 % may differ, and only by one). This checks Q numerics on real activations.
(b) End to end on 256 inputs: relative L2 and top-1 agreement, bounded by how much the fake-quant
    model itself moves when its input moves by 1e-6 (relative).

Why (b) needs the noise bound: ONNX Runtime's convolutions accumulate in another order than oneDNN,
so about 1e-5 of the codes after the first convolution differ by one. A random-init quantized network
amplifies every such flip (each flipped code moves ~fan-out values of the next layer, some across a
rounding boundary): measured on this model, the fraction of differing codes grows from 9e-6 after the
first conv to ~20 % at the classifier input, for ONNX Runtime and for 1e-6 input noise alike. So ORT
can only be expected to match fake quant as closely as fake quant matches itself under tiny noise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import _parity as P

pytest.importorskip("torchvision")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


import trtquant  # noqa: E402
from trtquant.export.compare import compare  # noqa: E402
from trtquant.functional import amax_to_scale, fake_quant, quantize  # noqa: E402

MODEL = "resnet18"
NOISE_SEEDS = (0, 1, 2)


def _probe(path, tmp_path):
    """Run ORT once on 8 images, returning every activation Q node with its float input, codes and DQ output."""
    proto = onnx.load(str(path))
    qnodes = P.activation_quantize_nodes(proto)
    extra, consumers = P.qdq_probe_outputs(proto, qnodes)
    x = P.image_batches(1, 8, P.SIZES[MODEL], seed=7)[0]
    values = P.probe_values(proto, extra, tmp_path / "probe.onnx", x)
    return proto, qnodes, consumers, values


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_teacher_forced_int8_codes_match_onnxruntime(exporter, tmp_path):
    path = P.exported(MODEL, exporter)
    model = P.calibrated(MODEL)
    proto, qnodes, consumers, values = _probe(path, tmp_path)
    consts = P.constants(proto)
    model_scales = {float(amax_to_scale(q.amax, 127)) for n, q in trtquant.quantizers(model).items()
                    if q.is_enabled and q._if_quant and q.amax is not None and not q.quant_desc.per_channel}
    assert len(qnodes) >= 20

    total = differ = 0
    worst = []
    for q in qnodes:
        scale = consts[q.input[1]]
        assert scale.shape == () and scale.dtype == np.float32, q.name
        assert float(scale) in model_scales, f"{q.name}: scale {float(scale)!r} is no quantizer's amax/127"
        x = torch.from_numpy(values[q.input[0]])
        ort_codes = torch.from_numpy(values[q.output[0]].astype(np.int32))
        amax = P.amax_for_scale(scale)
        codes, torch_scale = quantize(x, amax)
        assert float(torch_scale) == float(scale)
        d = (codes.to(torch.int32) - ort_codes).abs()
        assert int(d.max()) <= 1, f"{q.name}: codes differ by {int(d.max())}"
        n_diff = int((d > 0).sum())
        total += d.numel()
        differ += n_diff
        worst.append((n_diff / d.numel(), q.name))
        # The dequantized values too, bit for bit, where the codes agree (DQ is codes * scale).
        fq = fake_quant(x, amax)
        for dq in consumers[q.output[0]]:
            same = d == 0
            assert torch.equal(fq[same], torch.from_numpy(values[dq.output[0]])[same]), dq.name
    frac = differ / total
    worst.sort(reverse=True)
    print(f"\n{exporter}: {len(qnodes)} activation Q nodes, {total} codes, {differ} differ ({100 * frac:.5f} %)")
    assert frac <= 1e-4, f"{differ} of {total} codes differ ({100 * frac:.4f} %); worst: {worst[:3]}"


@pytest.mark.slow
def test_end_to_end_onnxruntime_vs_fake_quant_within_noise():
    path = P.exported(MODEL, "dynamo")
    model = P.calibrated(MODEL)
    batches = P.image_batches(4, 64, P.SIZES[MODEL], seed=2)  # 256 inputs, not the calibration data
    result = compare(model, path, batches)
    (out,) = result.outputs
    assert result.num_samples == 256

    with torch.no_grad():
        ref = torch.cat([model(b) for b in batches])
        noise_l2, noise_top1 = [], []
        for seed in NOISE_SEEDS:
            noisy = torch.cat([model(P.with_relative_noise(b, 1e-6, seed=100 * seed + i)) for i, b in enumerate(batches)])
            noise_l2.append(P.relative_l2(noisy, ref))
            noise_top1.append(float((noisy.argmax(1) == ref.argmax(1)).float().mean()))
    classes = int(ref.argmax(1).unique().numel())
    numbers = (f"ORT vs fake quant: rel L2 {out.rel_l2:.4e}, top-1 agreement {100 * out.top1_agreement:.2f} %, "
               f"cosine {out.cosine:.6f}, max abs {out.max_abs_error:.4g}; fake quant vs itself under 1e-6 input "
               f"noise (seeds {NOISE_SEEDS}): rel L2 {[f'{v:.4e}' for v in noise_l2]}, top-1 "
               f"{[f'{100 * v:.2f} %' for v in noise_top1]}; {classes} distinct top-1 classes")
    print("\n" + numbers)

    # Relative L2: no larger than the model's own change under 1e-6 input noise (the largest of three
    # draws: the noise response is itself a random variable, measured spread ~20 %). Measured:
    # ORT 2.77e-2 vs noise 2.80e-2, 3.33e-2, 3.02e-2.
    assert out.rel_l2 <= max(noise_l2), numbers

    # Top-1: the issue asks for >= 99 %, but this random-init 1000-class network does not agree with
    # itself that well under 1e-6 input noise (measured 97.3 %, 97.7 %, 98.1 %: logit margins are
    # tiny, median top-2 gap 0.18 logit std). Require ORT to be within two binomial standard
    # deviations (~1 %) of the least stable noise draw, capped at the 99 %. Measured: ORT
    # 96.1 % (10 of 256 differ) against a threshold of 95.2 %.
    # The issue's >= 99 % itself is asserted on a trained torchvision ResNet-18 in
    # test_parity_trained.py (measured 100 %, rel L2 2.5e-3 vs 3.3e-3..4.4e-3 under noise).
    p_noise = min(noise_top1)
    sigma = float(np.sqrt(max(p_noise * (1 - p_noise), 1 / 256) / 256))
    threshold = min(0.99, p_noise - 2 * sigma)
    assert out.top1_agreement >= threshold, f"top-1 agreement below {100 * threshold:.2f} %: {numbers}"
    assert out.cosine > 0.999, numbers
