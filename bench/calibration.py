"""Calibration cost on ResNet-50 (batch 16, 224x224, 4 batches, 2 threads):
(a) calibration forward (histogram inputs, max weights) per batch vs a float forward, same run;
(b) wall time of computing amax for all quantizers, per method, from the collected histograms.
Reference, same machine, pytorch-quantization 2.1: (a) 1.69x; (b) entropy 103 s, mse 13 s,
percentile 0.01 s.

    python bench/calibration.py [--device cuda] [--batches 4]
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import trtquant  # noqa: E402
from trtquant.calibrate import calibration_mode  # noqa: E402


def main() -> None:
    args = _common.resnet50_parser(__doc__, "results/calibration.json", batches=4).parse_args()
    dev, sync = _common.setup(args)

    fp = torchvision.models.resnet50().to(dev).eval()
    q = trtquant.quantize(copy.deepcopy(fp))
    data = [torch.randn(args.batch, 3, args.size, args.size, device=dev) for _ in range(args.batches)]

    t_float, t_calib = [], []
    with torch.no_grad():
        fp(data[0])
        with calibration_mode(q):
            q(data[0])  # warm-up
        with calibration_mode(q) as qs:
            for x in data:  # interleaved per batch: the same load hits both
                sync(); t = time.perf_counter(); fp(x); sync(); t_float.append(time.perf_counter() - t)
                sync(); t = time.perf_counter(); q(x); sync(); t_calib.append(time.perf_counter() - t)
            n_quant = len(qs)
    # calibration_mode reset the calibrators on entry; the stats of the timed pass remain.
    methods = {}
    for method, kw in [("max", {}), ("percentile", {"percentile": 99.99}), ("mse", {}), ("entropy", {})]:
        sync(); t = time.perf_counter()
        trtquant.compute_amax(q, method, **kw)
        sync(); methods[method] = time.perf_counter() - t
    res = {
        "machine": _common.machine(), "model": "resnet50", "batch": args.batch, "batches": args.batches,
        "device": args.device, "quantizers": n_quant,
        "float_forward_ms": 1000 * statistics.median(t_float), "calib_forward_ms": 1000 * statistics.median(t_calib),
        "calib_forward_ratio": statistics.median(t_calib) / statistics.median(t_float),
        "amax_seconds": methods,
        "reference_pytorch_quantization": {"calib_forward_ratio": 1.69, "entropy_s": 103, "mse_s": 13, "percentile_s": 0.01},
    }
    _common.dump(args.out, res)
    print(f"| ResNet-50 b{args.batch}, {args.batches} batches, {args.device} | trtquant | pytorch-quantization |")
    print("|---|---|---|")
    print(f"| calibration forward / float forward | {res['calib_forward_ratio']:.3f}x | 1.69x |")
    for m, ref in [("entropy", "103 s"), ("mse", "13 s"), ("percentile", "0.01 s"), ("max", "-")]:
        print(f"| amax, all {n_quant} quantizers: {m} | {methods[m]:.3f} s | {ref} |")


if __name__ == "__main__":
    main()
