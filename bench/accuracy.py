"""INT8 accuracy on real data: the digits ResNet (PTQ per calibration method, QAT, ONNX Runtime INT8)
and the pretrained MiniLM-L6 sentence encoder (embeddings vs FP32, auto_fallback).

Histograms are collected once per model and saved with ``trtquant.save_calibration``; every method
(max, percentile 99.9 / 99.99, mse, entropy) is recomputed from that cache without data. The digits
model trains on first use (well under a minute on 2 CPU cores) and is cached in
``$TRTQUANT_CACHE_DIR`` or ``~/.cache/trtquant``. Results: markdown tables on stdout and
``results/accuracy.json``.

    python bench/accuracy.py [--quick] [--skip-minilm] [--out results/accuracy.json]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from trtquant.accuracy import harness  # noqa: E402
from trtquant.accuracy.minilm import why_unavailable  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 QAT epoch, legacy exporter, two MiniLM methods")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--no-minilm-ort", action="store_true", help="skip the MiniLM ONNX Runtime run")
    ap.add_argument("--qat-epochs", type=int, default=None)
    ap.add_argument("--budget", type=float, default=0.01, help="MiniLM auto_fallback: allowed mean-cosine drop")
    ap.add_argument("--out", default="results/accuracy.json")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.manual_seed(0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = Path(args.out).parent / "accuracy"

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    payload = {"machine": _common.machine(), "quick": args.quick}
    t = time.perf_counter()
    digits = harness.run_digits(quick=args.quick, workdir=workdir, qat_epochs=args.qat_epochs, log=log)
    payload["digits"] = digits
    print(harness.markdown_digits(digits))
    print()
    if args.skip_minilm:
        payload["minilm"] = {"skipped": "--skip-minilm"}
    elif why_unavailable():
        payload["minilm"] = {"skipped": why_unavailable()}
        print(f"MiniLM skipped: {why_unavailable()}")
    else:
        minilm = harness.run_minilm(quick=args.quick, workdir=workdir, budget=args.budget,
                                    ort=not args.no_minilm_ort, log=log)
        payload["minilm"] = minilm
        print(harness.markdown_minilm(minilm))
    payload["wall_s"] = time.perf_counter() - t
    _common.dump(args.out, payload)
    print(f"\nwrote {args.out} ({payload['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
