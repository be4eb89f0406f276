"""End-to-end parity on trained, confident models (the digits CNN, and torchvision's ResNet-18
trained on digits): top-1 agreement >= 99 %, relative L2 within the fake-quant model's own change
under 1e-6 input noise, for the TensorRT graph and the ONNX Runtime INT8 graph.

Random-init networks are too chaotic for a top-1 criterion (they disagree with themselves under
1e-6 input noise on a few percent of inputs; see test_export_parity.py); a trained model is not.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

pytest.importorskip("sklearn")

import trtquant  # noqa: E402
from trtquant.export import compare, export_onnx  # noqa: E402


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_digits_onnxruntime_vs_fake_quant_top1(exporter: str, tmp_path) -> None:
    from trtquant.accuracy.digits import get_digits_model, load_digits_data

    data = load_digits_data()
    model = trtquant.quantize(copy.deepcopy(get_digits_model(data=data)))
    trtquant.calibrate(model, data.calib_batches(), method="percentile", percentile=99.99, progress=False)
    path = tmp_path / "digits.onnx"
    export_onnx(model, data.x_test[:1], path, exporter=exporter)
    res = compare(model, path, [data.x_test[i:i + 256] for i in range(0, 512, 256)]).outputs[0]
    assert res.top1_agreement >= 0.99, f"top-1 agreement {res.top1_agreement:.4f}, rel L2 {res.rel_l2:.3e}"
    assert res.cosine > 0.9999


@functools.lru_cache(maxsize=1)
def _digits32():
    from trtquant.accuracy.digits import load_digits_data

    return load_digits_data(32)


@functools.lru_cache(maxsize=1)
def _calibrated_trained_resnet18() -> torch.nn.Module:
    """Quantized and max-calibrated (shared by the tests below: they must not modify it)."""
    data = _digits32()
    model = trtquant.quantize(_trained_resnet18(data))
    trtquant.calibrate(model, data.calib_batches(), method="max", progress=False)
    return model.eval()


def _noisy_test_images() -> torch.Tensor:
    """256 digits test images with 5 % Gaussian pixel noise (see the first test for why)."""
    data = _digits32()
    g = torch.Generator().manual_seed(5)
    return data.x_test[:256] + 0.05 * torch.randn(data.x_test[:256].shape, generator=g)


def _noise_rel_l2(model: torch.nn.Module, x: torch.Tensor) -> list:
    import _parity as P

    with torch.no_grad():
        ref = model(x)
        return [P.relative_l2(model(P.with_relative_noise(x, 1e-6, seed=s)), ref) for s in (1, 2, 3)]


def _trained_resnet18(data) -> torch.nn.Module:
    """torchvision's ResNet-18 (1-channel stem, 10 classes) trained 3 epochs on digits at 32x32 (~8 s)."""
    import torchvision

    from trtquant.accuracy.digits import train_epochs

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    epochs = 3
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, pct_start=0.25,
                                                total_steps=epochs * ((len(data.y_train) + 63) // 64))
    model.train()
    train_epochs(model, data, epochs, opt, 64, shift=2, seed=0, scheduler=sched)
    return model.eval()


@pytest.mark.slow
def test_trained_torchvision_resnet18_onnxruntime_vs_fake_quant(tmp_path) -> None:
    """The issue's end-to-end parity criterion on a trained torchvision ResNet-18 (fp32 Q/DQ graph,
    dynamo exporter, ONNX Runtime without graph optimisations): top-1 agreement >= 99 % on 256
    inputs, and relative L2 no larger than the fake-quant model's own change under 1e-6 input noise.

    The inputs are digits test images with 5 % Gaussian pixel noise: the raw images take values on a
    small lattice (8x8 sources in 1/16 steps, upsampled) that never sits near a rounding boundary, so
    1e-6 input noise would flip no code at all and the control would read 0; continuous-valued inputs
    behave like camera images. Measured: top-1 100 %, ORT rel L2 2.46e-3 vs noise 3.3e-3 to 4.4e-3.
    """
    from trtquant.accuracy.digits import accuracy

    data = _digits32()
    model = _calibrated_trained_resnet18()
    assert accuracy(model, data.x_test, data.y_test) > 95.0  # a confident, trained classifier
    x = _noisy_test_images()
    path = tmp_path / "r18.onnx"
    export_onnx(model, x[:1], path, exporter="dynamo")
    res = compare(model, path, [x[:128], x[128:]], optimize=False).outputs[0]
    noise = _noise_rel_l2(model, x)
    numbers = (f"top-1 agreement {100 * res.top1_agreement:.2f} %, rel L2 {res.rel_l2:.3e}, cosine "
               f"{res.cosine:.6f}; fake quant under 1e-6 input noise: rel L2 {[f'{v:.3e}' for v in noise]}")
    print("\n" + numbers)
    assert res.top1_agreement >= 0.99, numbers
    assert 0 < res.rel_l2 <= max(noise), numbers


@pytest.mark.slow
def test_trained_resnet18_onnxruntime_int8_graph(tmp_path) -> None:
    """The ONNX Runtime target graph of the same model: every Conv an INT8 kernel, and its outputs -
    executed literally and with ONNX Runtime's fused INT8 kernels - within the noise-controlled bound
    of the fake-quant model it implements (the ONNX Runtime flavour: unsigned post-ReLU activations).
    Measured: literal rel L2 2.48e-3, fused 2.34e-3, noise 1.96e-3 to 2.73e-3; top-1 100 %; 20/20."""
    model = _calibrated_trained_resnet18()
    x = _noisy_test_images()
    path = tmp_path / "r18_ort.onnx"
    export_onnx(model, x[:1], path, target="onnxruntime", exporter="legacy")
    from trtquant.export.ort_flavor import ort_flavor_

    noise = _noise_rel_l2(ort_flavor_(copy.deepcopy(model)), x)
    for optimize in (False, True):
        res = compare(model, path, [x[:128], x[128:]], optimize=optimize)
        out = res.outputs[0]
        numbers = (f"optimize={optimize}: top-1 {100 * out.top1_agreement:.2f} %, rel L2 {out.rel_l2:.3e}; "
                   f"noise {[f'{v:.3e}' for v in noise]}; {res.notes}")
        print("\n" + numbers)
        assert res.int8_conv_fraction == 1.0, numbers
        # Literal Q/DQ execution computes the flavour's arithmetic: within the noise floor. The fused
        # kernels requantize each conv output with a float multiply by s_in*s_w/s_out (MLAS) instead of
        # the true division, which moves a few codes by one step - the same size of change as 1e-6
        # input noise, so the bound is that floor with 1.5x headroom (measured 1.06x on an AVX2 CPU
        # with uint8 weights; the u8s8 saturation this test caught on that CPU gave 97 % top-1).
        bound = max(noise) * (1.5 if optimize else 1.0)
        assert out.top1_agreement >= 0.99 and 0 < out.rel_l2 <= bound, numbers
