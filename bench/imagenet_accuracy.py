"""INT8 accuracy of a real ImageNet-pretrained CNN on real photographs: EfficientNet-Lite0 (depthwise, ReLU6) on
random crops of the photos bundled with scikit-image, scikit-learn and matplotlib (trtquant.accuracy.imagenet).

Per configuration (per-channel vs per-tensor weights, each calibration method): top-1 agreement with FP32 on all
crops and on the confident ones (FP32 top-1 probability >= 0.5), top-5 overlap, KL(FP32 || INT8), beside two
references - the FP32 model under input noise of one input step (the acceptance reference) and of half a step (the
input's own rounding error), and under half a step of rounding noise at every quantizer (INT8 rounding without
clipping) - and the best per-channel configuration in ONNX Runtime INT8.

    python bench/imagenet_accuracy.py [--eval-per-photo 50] [--calib-per-photo 8] [--out results/imagenet.json]
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import trtquant  # noqa: E402
from trtquant.accuracy import imagenet as I  # noqa: E402
from trtquant.config import QuantConfig  # noqa: E402
from trtquant.descriptor import QuantDescriptor  # noqa: E402

METHODS = (("max", {}), ("percentile 99.99", {"percentile": 99.99}), ("mse", {}), ("entropy", {}))


def main() -> None:
    args = _common.imagenet_parser(__doc__, "results/imagenet.json").parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    fp = I.load_efficientnet_lite0()
    ev, cal = I.split(args.eval_per_photo, args.calib_per_photo)
    ref = I.logits(fp, ev)
    payload: Dict[str, Any] = {"machine": _common.machine(), "model": "EfficientNet-Lite0 (ImageNet)",
                               "photos": sorted(I.photos()), "eval_crops": len(ev), "calib_crops": len(cal),
                               **I.references(fp, ev, ref, cal), "configs": {}}
    best = None
    for label, wdesc in (("per-channel", None), ("per-tensor", QuantDescriptor(num_bits=8, axis=None))):
        q = copy.deepcopy(fp)
        trtquant.quantize(q, QuantConfig(weight=wdesc))
        trtquant.collect_statistics(q, I.batches(cal, 16), progress=False)
        for method, kw in METHODS:
            trtquant.compute_amax(q, method.split()[0], **kw)
            a = I.agreement(ref, I.logits(q, ev))
            row = {"fake_quant": a.as_dict()}
            if method.startswith("percentile"):
                row["rounding_noise_reference"] = I.rounding_noise_reference(q, ev, ref).as_dict()
            payload["configs"][f"{label}, {method}"] = row
            print(f"{label:11s} {method:17s} {I.describe(a)}", flush=True)
            if label == "per-channel" and (best is None or a.kl < best[1]):
                best = (method, a.kl, copy.deepcopy(q))
    assert best is not None
    with tempfile.TemporaryDirectory() as d:
        a = I.agreement(ref, I.ort_logits(best[2], ev, Path(d) / "effnet_int8.onnx"))
    payload["ort_int8_best_per_channel"] = {"method": best[0], **a.as_dict()}
    print(f"ONNX Runtime INT8 ({best[0]}): {I.describe(a)}")
    payload["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
