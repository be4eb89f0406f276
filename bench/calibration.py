"""Calibration cost on ResNet-50 (batch 16, 224x224, 4 batches, 2 threads):
(a) calibration forward (histogram inputs, max weights) per batch vs a float forward, same run;
(b) wall time of computing amax for all quantizers, per method, from the collected histograms: the
    batched computation ``compute_amax`` runs, and the per-quantizer one (each histogram's search on
    its own, what it was before), idle and while 1 and 2 competing processes keep cores busy (each a
    bounded busy loop the bench starts and stops) - the situation of a user whose DataLoader workers
    or second job share the cores. Median and worst of ``--repeats``.
Reference, same machine, pytorch-quantization 2.1: (a) 1.69x; (b) entropy 103 s, mse 13 s,
percentile 0.01 s.

    python bench/calibration.py [--device cuda] [--batches 4] [--loads 0,1,2] [--repeats 5]
"""

from __future__ import annotations

import copy
import multiprocessing
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import trtquant  # noqa: E402
from trtquant.calib.histogram import HistogramCalibrator  # noqa: E402
from trtquant.calib.methods import get_method  # noqa: E402
from trtquant.calibrate import calibration_mode  # noqa: E402

METHODS = [("max", {}), ("percentile", {"percentile": 99.99}), ("mse", {}), ("entropy", {})]


def _spin(seconds: float) -> None:
    """A competing process: one core kept busy, ending by itself after ``seconds`` at the latest."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@contextmanager
def competing(n: int, seconds: float = 600.0):
    """``n`` busy processes for the duration of the block (stopped on exit, bounded if the bench dies)."""
    procs = [multiprocessing.get_context("spawn").Process(target=_spin, args=(seconds,), daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    time.sleep(1.0 if n else 0.0)  # let them reach the loop
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(5)


def _histograms(q) -> list:
    return [m._calibrator for m in q.modules() if isinstance(m, trtquant.TensorQuantizer)
            and isinstance(m._calibrator, HistogramCalibrator) and m._calibrator.num_batches]


def _time_batched(q, method, kw, sync) -> float:
    for cal in _histograms(q):
        cal._statistics_changed()  # forget cached amax: time the computation, not a cache hit
    sync(); t = time.perf_counter()
    trtquant.compute_amax(q, method, **kw)
    sync()
    return time.perf_counter() - t


def _time_per_quantizer(q, method, kw, sync) -> float:
    fn = get_method(method)
    hists = [cal.histogram for cal in _histograms(q)]
    extra = {"num_bits": 8, "unsigned": False} if method in ("mse", "entropy") else {}
    sync(); t = time.perf_counter()
    for hist, edges in hists:
        fn(hist, edges, **kw, **extra)
    sync()
    return time.perf_counter() - t


def amax_under_load(q, loads, repeats, sync) -> dict:
    out = {}
    for n in loads:
        with competing(n):
            rows = {}
            for method, kw in METHODS:
                batched = [_time_batched(q, method, kw, sync) for _ in range(repeats)]
                single = [_time_per_quantizer(q, method, kw, sync) for _ in range(repeats)]
                rows[method] = {"batched_median_s": statistics.median(batched), "batched_max_s": max(batched),
                                "per_quantizer_median_s": statistics.median(single), "per_quantizer_max_s": max(single)}
        out[str(n)] = rows
    return out


def main() -> None:
    ap = _common.resnet50_parser(__doc__, "results/calibration.json", batches=4, repeats=5)
    ap.add_argument("--loads", default="0,1,2", help="numbers of competing busy processes to time amax under")
    args = ap.parse_args()
    loads = [int(v) for v in args.loads.split(",") if v.strip()]
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
    under_load = amax_under_load(q, loads, args.repeats, sync)
    methods = {m: under_load[str(loads[0])][m]["batched_median_s"] for m, _ in METHODS} if loads else {}
    res = {
        "machine": _common.machine(), "model": "resnet50", "batch": args.batch, "batches": args.batches,
        "device": args.device, "quantizers": n_quant,
        "float_forward_ms": 1000 * statistics.median(t_float), "calib_forward_ms": 1000 * statistics.median(t_calib),
        "calib_forward_ratio": statistics.median(t_calib) / statistics.median(t_float),
        "amax_seconds": methods, "amax_under_load": under_load, "load_processes": loads, "repeats": args.repeats,
        "reference_pytorch_quantization": {"calib_forward_ratio": 1.69, "entropy_s": 103, "mse_s": 13, "percentile_s": 0.01},
    }
    _common.dump(args.out, res)
    print(f"| ResNet-50 b{args.batch}, {args.batches} batches, {args.device} | trtquant | pytorch-quantization |")
    print("|---|---|---|")
    print(f"| calibration forward / float forward | {res['calib_forward_ratio']:.3f}x | 1.69x |")
    for m, ref in [("entropy", "103 s"), ("mse", "13 s"), ("percentile", "0.01 s"), ("max", "-")]:
        if m in methods:
            print(f"| amax, all {n_quant} quantizers: {m} | {methods[m]:.3f} s | {ref} |")
    n_hist = len(_histograms(q))
    print(f"\namax for {n_hist} histograms, seconds, median (worst) of {args.repeats}; "
          "competing = busy processes started by the bench")
    print("| competing processes | method | batched (compute_amax) | per-quantizer searches |")
    print("|---|---|---|---|")
    for n in loads:
        for m, _ in METHODS:
            r = under_load[str(n)][m]
            print(f"| {n} | {m} | {r['batched_median_s']:.3f} ({r['batched_max_s']:.3f}) | "
                  f"{r['per_quantizer_median_s']:.3f} ({r['per_quantizer_max_s']:.3f}) |")


if __name__ == "__main__":
    main()
