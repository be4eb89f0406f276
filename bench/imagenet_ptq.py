"""Advanced PTQ on a real pretrained ImageNet CNN: EfficientNet-Lite0 (depthwise, ReLU6) on random crops of the
bundled photos (trtquant.accuracy.imagenet), each step alone and combined, fake quant and ONNX Runtime INT8.

Rows (activations INT8 per tensor, percentile 99.99 on the calibration crops, throughout):
  per-channel / per-tensor INT8 weights: nothing; equalize (BatchNorm kept: each conv equalized against its BN;
  per-channel rows instead show the paper's folded CLE, equalize(batchnorm="fold", relu6="clip"), since keeping BN
  changes no per-channel code); bias_correction (the paper's weight-error correction); both; adaround; the three
  together; the paper's folded CLE and the accumulated bias correction (rows 14-16), which hurt this model; per-channel + a short QAT (KL distillation to FP32 on other crops, frozen BN, learned
  activation amax). 4-bit per-channel weights: nearest rounding against adaround (its summed calibration loss
  too: AdaRound keeps a layer's learned rounding only where it beats nearest on that loss).
Order within a row: equalize (float model) -> quantize -> calibrate -> adaround -> bias_correction [-> QAT].
Time of each step beside it; AdaRound with its default settings (500 steps a layer, 10-minute budget).

The evaluation crops are other crops of the same photos as the calibration crops; ``--holdout`` evaluates on
photos that calibration, AdaRound and QAT never saw.

    python bench/imagenet_ptq.py [--eval-per-photo 50] [--calib-per-photo 8] [--qat-per-photo 32] [--out F]
    python bench/imagenet_ptq.py --holdout chelsea,coffee --eval-per-photo 100 --calib-per-photo 11 --rows 0,3,5
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import trtquant  # noqa: E402
from trtquant.accuracy import imagenet as I  # noqa: E402
from trtquant.config import QuantConfig  # noqa: E402
from trtquant.descriptor import QuantDescriptor  # noqa: E402
from trtquant.ptq import adaround, bias_correction, equalize  # noqa: E402

WEIGHTS = {"per-channel": None, "per-tensor": QuantDescriptor(num_bits=8, axis=None),
           "4-bit per-channel": QuantDescriptor(num_bits=4, axis=(0,))}
ROWS: List[Tuple[str, Tuple[str, ...]]] = [
    ("per-channel", ()), ("per-channel", ("equalize(fold)",)), ("per-channel", ("bias_correction",)),
    ("per-channel", ("adaround",)), ("per-channel", ("equalize", "adaround", "bias_correction")),
    ("per-channel", ("qat",)),
    ("per-tensor", ()), ("per-tensor", ("equalize",)), ("per-tensor", ("bias_correction",)),
    ("per-tensor", ("equalize", "bias_correction")), ("per-tensor", ("adaround",)),
    ("per-tensor", ("equalize", "adaround", "bias_correction")),
    ("4-bit per-channel", ()), ("4-bit per-channel", ("adaround",)),
    ("per-channel", ("bias_correction(accumulated)",)), ("per-tensor", ("equalize(fold)",)),
    ("per-tensor", ("equalize(fold)", "bias_correction(accumulated)")),
]


def qat(q: torch.nn.Module, teacher: torch.nn.Module, crops: torch.Tensor, epochs: int, batch: int) -> List[float]:
    """Distil FP32's output distribution into the fake-quant model: no labels needed, BN statistics frozen."""
    from trtquant.qat import amax_param_groups, clamp_learned_amax, freeze_bn_stats, prepare_qat
    from trtquant.states import set_state

    prepare_qat(q, learn_amax=True)
    freeze_bn_stats(q)
    opt = torch.optim.AdamW(amax_param_groups(q, lr=1e-5, amax_lr=1e-3, weight_decay=0.0))
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(epochs):
        total = 0.0
        for idx in torch.randperm(len(crops), generator=g).split(batch):
            x = crops[idx]
            with torch.no_grad():
                target = F.log_softmax(teacher(x), -1)
            loss = F.kl_div(F.log_softmax(q(x), -1), target, log_target=True, reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
            clamp_learned_amax(q)
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(crops))
    q.eval()
    set_state(q, "validate")
    return losses


def run_row(fp: torch.nn.Module, weights: str, steps: Tuple[str, ...], cal: torch.Tensor, qat_crops: torch.Tensor,
            qat_epochs: int) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    m = copy.deepcopy(fp)
    times: Dict[str, float] = {}
    info: Dict[str, Any] = {}
    cal_b = I.batches(cal, 16)
    if "equalize" in steps or "equalize(fold)" in steps:
        t = time.perf_counter()
        bn = "fold" if "equalize(fold)" in steps else "keep"
        info["equalized_chains"] = len(equalize(m, relu6="clip", batchnorm=bn))
        times["equalize"] = time.perf_counter() - t
    t = time.perf_counter()
    trtquant.quantize(m, QuantConfig(weight=WEIGHTS[weights]))
    trtquant.collect_statistics(m, cal_b, progress=False)
    trtquant.compute_amax(m, "percentile", percentile=99.99)
    times["quantize+calibrate"] = time.perf_counter() - t
    if "adaround" in steps:
        t = time.perf_counter()
        res = adaround(m, cal_b, progress=False)
        times["adaround"] = time.perf_counter() - t
        info["adaround"] = {"layers": len(res), "kept_adaround": sum(r.kept == "adaround" for r in res.values()),
                            "nearest_loss": sum(r.nearest_loss for r in res.values()),
                            "adaround_loss": sum(r.adaround_loss for r in res.values()),
                            "kept_loss": sum(min(r.nearest_loss, r.adaround_loss) for r in res.values()),
                            "learned_beat_nearest": sum(r.adaround_loss <= r.nearest_loss for r in res.values()),
                            "iterations": sum(r.iterations for r in res.values())}
    if "bias_correction" in steps or "bias_correction(accumulated)" in steps:
        t = time.perf_counter()
        bias_correction(m, cal_b, error="accumulated" if "bias_correction(accumulated)" in steps else "weight")
        times["bias_correction"] = time.perf_counter() - t
    if "qat" in steps:
        t = time.perf_counter()
        info["qat_losses"] = qat(m, fp, qat_crops, qat_epochs, 16)
        times["qat"] = time.perf_counter() - t
    info["seconds"] = {k: round(v, 1) for k, v in times.items()}
    return m, info


def main() -> None:
    ap = _common.imagenet_parser(__doc__, "results/imagenet_ptq.json")
    ap.add_argument("--qat-per-photo", type=int, default=32, help="crops per photo for QAT (another seed)")
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--rows", default=None, help="comma-separated row numbers to run (default: all)")
    ap.add_argument("--holdout", default=None,
                    help="comma-separated photo names: evaluate only on crops of these photos and calibrate/train "
                         "only on the others (learned steps cannot fit the evaluation photos' content)")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    fp = I.load_efficientnet_lite0()
    photos = I.photos()
    if args.holdout:
        held = args.holdout.split(",")
        unknown = [h for h in held if h not in photos]
        if unknown:
            raise SystemExit(f"--holdout: unknown photo(s) {unknown}; known: {sorted(photos)}")
        seen = {k: v for k, v in photos.items() if k not in held}
        ev = I.random_crops({k: photos[k] for k in held}, args.eval_per_photo, seed=0)
        cal = I.random_crops(seen, args.calib_per_photo, seed=1)
        qat_crops = I.random_crops(seen, args.qat_per_photo, seed=2)
    else:
        ev, cal = I.split(args.eval_per_photo, args.calib_per_photo)
        qat_crops = I.random_crops(photos, args.qat_per_photo, seed=2)
    ref = I.logits(fp, ev)
    payload: Dict[str, Any] = {"machine": _common.machine(), "model": "EfficientNet-Lite0 (ImageNet)",
                               "eval_crops": len(ev), "calib_crops": len(cal), "qat_crops": len(qat_crops),
                               "holdout_photos": args.holdout.split(",") if args.holdout else None,
                               **I.references(fp, ev, ref, cal), "rows": []}
    print(f"references: one input step KL {payload['input_noise_reference']['kl']:.4f}, half a step (the input's "
          f"rounding) KL {payload['input_rounding_reference']['kl']:.4f}", flush=True)
    wanted: Optional[set] = {int(r) for r in args.rows.split(",")} if args.rows else None
    for i, (weights, steps) in enumerate(ROWS):
        if wanted is not None and i not in wanted:
            continue
        label = f"{weights}" + (" + " + " + ".join(steps) if steps else "")
        m, info = run_row(fp, weights, steps, cal, qat_crops, args.qat_epochs)
        fake = I.agreement(ref, I.logits(m, ev))
        row: Dict[str, Any] = {"row": i, "label": label, "fake_quant": fake.as_dict(), **info}
        if not weights.startswith("4-bit"):  # ONNX Runtime's INT8 graph holds 8-bit weights only
            with tempfile.TemporaryDirectory() as d:
                row["onnxruntime_int8"] = I.agreement(ref, I.ort_logits(m, ev, Path(d) / "m.onnx")).as_dict()
        if "input_only" not in payload and not weights.startswith("4-bit"):
            payload["input_only"] = I.input_only(m, ev, ref).as_dict()
            print(f"input quantizer alone: KL {payload['input_only']['kl']:.4f}", flush=True)
        payload["rows"].append(row)
        ort = row.get("onnxruntime_int8")
        print(f"{i:2d} {label:55s} fake KL {fake.kl:.4f} conf {100 * fake.confident_top1:.1f}%"
              + (f" | ORT KL {ort['kl']:.4f} conf {100 * ort['confident_top1']:.1f}%" if ort else "")
              + f" | {info['seconds']}" + (f" | adaround {info['adaround']}" if "adaround" in info else ""),
              flush=True)
    payload["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
