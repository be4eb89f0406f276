"""Fake-quant overhead on ResNet-50 (batch 16, 224x224): inference forward and one QAT step, each as
a ratio to the float model timed in the same process (interleaved). Reference, same machine:
pytorch-quantization 2.1 measured 1.74x (inference) and 1.42x (train step).

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

    inf = _common.interleaved({"float": infer(fp), "fakequant": infer(q)}, args.repeats, sync)

    target = torch.randint(0, 1000, (args.batch,), device=dev)
    fp_t, q_t = copy.deepcopy(fp).train(), copy.deepcopy(q).train()
    opts = {id(fp_t): torch.optim.SGD(fp_t.parameters(), lr=1e-4, momentum=0.9),
            id(q_t): torch.optim.SGD(q_t.parameters(), lr=1e-4, momentum=0.9)}

    def step(m):
        opt = opts[id(m)]

        def run():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x), target).backward()
            opt.step()
        return run

    train = _common.interleaved({"float": step(fp_t), "fakequant": step(q_t)}, args.repeats, sync)
    res = {
        "machine": _common.machine(), "model": "resnet50", "batch": args.batch, "size": args.size,
        "device": args.device, "repeats": args.repeats,
        "inference_ms": {k: 1000 * statistics.median(v) for k, v in inf.items()},
        "train_step_ms": {k: 1000 * statistics.median(v) for k, v in train.items()},
        "inference_ratio": _common.ratio(inf, "fakequant", "float"),
        "train_step_ratio": _common.ratio(train, "fakequant", "float"),
        "reference_pytorch_quantization": {"inference_ratio": 1.74, "train_step_ratio": 1.42},
    }
    _common.dump(args.out, res)
    print(f"| ResNet-50 b{args.batch} {args.size}x{args.size} {args.device} | float ms | fake-quant ms | ratio | pytorch-quantization |")
    print("|---|---|---|---|---|")
    print(f"| inference forward | {res['inference_ms']['float']:.0f} | {res['inference_ms']['fakequant']:.0f} | "
          f"{res['inference_ratio']:.3f}x | 1.74x |")
    print(f"| QAT step (fwd+bwd+SGD) | {res['train_step_ms']['float']:.0f} | {res['train_step_ms']['fakequant']:.0f} | "
          f"{res['train_step_ratio']:.3f}x | 1.42x |")


if __name__ == "__main__":
    main()
