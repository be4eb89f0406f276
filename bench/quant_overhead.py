"""Fake-quant overhead on ResNet-50 (batch 16, 224x224): inference forward and one QAT step, each as
a ratio to the float model timed in the same process (interleaved), at the default allocator.
pytorch-quantization is timed in the same run when it is importable (its documented
quant_modules / TensorQuantizer calibration API); otherwise its reference on the same machine is
printed: 1.74x (inference) and 1.42x (train step).

    python bench/quant_overhead.py [--device cuda] [--batch 16] [--size 224] [--repeats 5]
"""

from __future__ import annotations

import copy
import statistics
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import trtquant  # noqa: E402


def pytorch_quantization_resnet50(fp: torch.nn.Module, x: torch.Tensor):
    """pytorch-quantization's ResNet-50 with ``fp``'s weights, max-calibrated on ``x[:4]``; None if not importable."""
    try:
        from pytorch_quantization import nn as quant_nn
        from pytorch_quantization import quant_modules
    except ImportError:
        return None
    quant_modules.initialize()
    try:
        model = torchvision.models.resnet50()
    finally:
        quant_modules.deactivate()
    model.load_state_dict(fp.state_dict())
    model = model.to(x.device).eval()
    quantizers = [m for m in model.modules() if isinstance(m, quant_nn.TensorQuantizer)]
    for m in quantizers:
        m.disable_quant()
        m.enable_calib()
    with torch.no_grad():
        model(x[:4])
    for m in quantizers:
        m.load_calib_amax()
        m.disable_calib()
        m.enable_quant()
    return model


def main() -> None:
    args = _common.resnet50_parser(__doc__, "results/quant_overhead.json", repeats=5).parse_args()
    dev, sync = _common.setup(args)

    fp = torchvision.models.resnet50().to(dev).eval()
    q = trtquant.quantize(copy.deepcopy(fp))
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    trtquant.calibrate(q, [x[:4]], method="max", progress=False)

    def infer(m):
        def run():
            with torch.no_grad():
                m(x)
        return run

    pq = pytorch_quantization_resnet50(fp, x)
    models = {"float": fp, "fakequant": q, **({"pytorch_quantization": pq} if pq is not None else {})}
    inf = _common.interleaved({k: infer(m) for k, m in models.items()}, args.repeats, sync)

    target = torch.randint(0, 1000, (args.batch,), device=dev)
    trained = {k: copy.deepcopy(m).train() for k, m in models.items()}
    opts = {id(m): torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for m in trained.values()}

    def step(m):
        opt = opts[id(m)]

        def run():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x), target).backward()
            opt.step()
        return run

    train = _common.interleaved({k: step(m) for k, m in trained.items()}, args.repeats, sync)
    res = {
        "machine": _common.machine(), "model": "resnet50", "batch": args.batch, "size": args.size,
        "device": args.device, "repeats": args.repeats,
        "inference_ms": {k: 1000 * statistics.median(v) for k, v in inf.items()},
        "train_step_ms": {k: 1000 * statistics.median(v) for k, v in train.items()},
        "inference_ratio": _common.ratio(inf, "fakequant", "float"),
        "train_step_ratio": _common.ratio(train, "fakequant", "float"),
        "reference_pytorch_quantization": {"inference_ratio": 1.74, "train_step_ratio": 1.42},
        "allocator": "default (no GLIBC_TUNABLES, no LD_PRELOAD)" if not _common.allocator_tuned() else "tuned",
    }
    if pq is not None:
        res["pytorch_quantization"] = {"inference_ratio": _common.ratio(inf, "pytorch_quantization", "float"),
                                       "train_step_ratio": _common.ratio(train, "pytorch_quantization", "float")}
    ref_inf = f"{res['pytorch_quantization']['inference_ratio']:.3f}x (this run)" if pq is not None else "1.74x"
    ref_train = f"{res['pytorch_quantization']['train_step_ratio']:.3f}x (this run)" if pq is not None else "1.42x"
    _common.dump(args.out, res)
    print(f"| ResNet-50 b{args.batch} {args.size}x{args.size} {args.device} | float ms | fake-quant ms | ratio | pytorch-quantization |")
    print("|---|---|---|---|---|")
    print(f"| inference forward | {res['inference_ms']['float']:.0f} | {res['inference_ms']['fakequant']:.0f} | "
          f"{res['inference_ratio']:.3f}x | {ref_inf} |")
    print(f"| QAT step (fwd+bwd+SGD) | {res['train_step_ms']['float']:.0f} | {res['train_step_ms']['fakequant']:.0f} | "
          f"{res['train_step_ratio']:.3f}x | {ref_train} |")


if __name__ == "__main__":
    main()
