"""Transformers on ONNX Runtime's CPU INT8 kernels: the pretrained MiniLM-L6 encoder (accuracy and speed, every
Linear INT8, with and without the attention matmuls quantized) and ViT-B/16 (speed; random init), against FP32.

Speed: ONNX Runtime (ORT_ENABLE_ALL, 2 intra-op threads), FP32 graph vs trtquant's ONNX Runtime INT8 graph,
interleaved rounds so the ratio comes from one run on a shared machine. Accuracy: MiniLM sentence embeddings
vs FP32 on the 50 evaluation sentences (mean cosine, top-1 retrieval agreement), fake quant and ONNX Runtime.

    python bench/transformer_int8.py [--skip-vit] [--rounds 5] [--out results/transformers.json]
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import trtquant  # noqa: E402
from trtquant.export import check_onnx, export_onnx  # noqa: E402
from trtquant.export.compare import optimized_graph, ort_session  # noqa: E402

INTEGER_KERNELS = ("MatMulIntegerToFloat", "QLinearMatMul", "QGemm", "QLinearConv", "MatMulInteger",
                   "DynamicQuantizeMatMul", "QAttention")


def _kernels(path: Path) -> Dict[str, int]:
    counts = collections.Counter(n.op_type for n in optimized_graph(path).graph.node)
    return {k: counts[k] for k in INTEGER_KERNELS if counts.get(k)}


def _latency_ms(sess, feed: Dict[str, np.ndarray], reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        sess.run(None, feed)
    return 1000 * (time.perf_counter() - t) / reps


def speedup(paths: Dict[str, Path], feed: Dict[str, np.ndarray], rounds: int, threads: int) -> Dict[str, Any]:
    """Median latency per graph over interleaved rounds, and each graph's speed-up over "fp32"."""
    sessions = {k: ort_session(p, optimize=True, threads=threads) for k, p in paths.items()}
    for s in sessions.values():
        names = [i.name for i in s.get_inputs()]
        s.run(None, {n: feed[n] for n in names})
    times: Dict[str, List[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            names = [i.name for i in s.get_inputs()]
            times[k].append(_latency_ms(s, {n: feed[n] for n in names}, reps=3))
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"ms": med, "speedup": {k: med["fp32"] / v for k, v in med.items() if k != "fp32"}}


def minilm(workdir: Path, rounds: int, threads: int, seq: int = 128, batch: int = 8) -> Dict[str, Any]:
    from trtquant.accuracy import minilm as M
    from trtquant.export.ort_flavor import ort_flavor_
    from trtquant.placement.fx_pass import placement_report

    fp, tok = M.load_minilm(attn_implementation="sdpa")  # placement quantizes SDPA in TensorRT's fusable shape
    ev = M.tokenize(tok, M.SENTENCES)
    cal = M.tokenize(tok, M.CALIB_SENTENCES)
    ref = M.encode(fp, ev)
    ev_fixed = M.tokenize(tok, M.SENTENCES, max_length=seq, fixed_length=True)  # the graphs' static shape (padding masked)
    timing = M.tokenize(tok, M.SENTENCES[:batch], batch_size=batch, max_length=seq, fixed_length=True)[0]
    feed = {k: v.numpy().astype(np.int64) for k, v in timing.items()}
    example = (timing["input_ids"], timing["attention_mask"])
    names = ["input_ids", "attention_mask"]
    paths = {"fp32": workdir / "minilm_fp32.onnx"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch_dim = torch.export.Dim("batch", min=1)
        torch.onnx.export(fp, example, str(paths["fp32"]), dynamo=True, input_names=names,
                          dynamic_shapes=({0: batch_dim}, {0: batch_dim}))
    out: Dict[str, Any] = {"sequence": seq, "batch": batch, "variants": {}}
    variants = {"linear": dict(include=nn.Linear, exclude="bert.pooler*", placement=None),
                "linear+attention": dict(exclude="bert.pooler*")}
    for label, kw in variants.items():
        q = M.MiniLMEncoder(copy.deepcopy(fp.bert)).eval()
        trtquant.quantize(q, **kw)
        rules = collections.Counter(e["rule"] for e in placement_report(q)["quantizers"] if e["enabled"])
        t = time.perf_counter()
        trtquant.calibrate(q, cal, method="percentile", percentile=99.99, progress=False)
        calib_s = time.perf_counter() - t
        fq = M.compare_embeddings(ref, M.encode(q, ev))
        path = workdir / f"minilm_{label.replace('+', '_')}_ort.onnx"
        export_onnx(q, example, path, exporter="dynamo", input_names=names, target="onnxruntime")
        sess = ort_session(path, optimize=True, threads=threads)
        embs = [torch.from_numpy(np.asarray(sess.run(None, {n: b[n].numpy().astype(np.int64) for n in names})[0]))
                for b in ev_fixed]
        ort_vs_fp32 = M.compare_embeddings(ref, torch.cat(embs))
        flavour = M.compare_embeddings(M.encode(ort_flavor_(copy.deepcopy(q)), ev_fixed), torch.cat(embs))
        trt_path = workdir / f"minilm_{label.replace('+', '_')}_trt.onnx"
        export_onnx(q, example, trt_path, exporter="dynamo", input_names=names)
        rep = check_onnx(str(trt_path))
        paths[label] = path
        out["variants"][label] = {
            "quantizers": sum(rules.values()), "attention_quantizers": sum(v for k, v in rules.items() if "attention" in k),
            "calibration_s": round(calib_s, 2), "fake_quant_vs_fp32": fq, "ort_vs_fp32": ort_vs_fp32,
            "ort_vs_flavour_cosine": flavour["mean_cosine"], "ort_integer_kernels": _kernels(path),
            "trt_graph_errors": len(rep.errors),
            "attention_fusable": sum(f.rule == "C27-attention-fusable" for f in rep.findings),
        }
    # Reference: ONNX Runtime's own dynamic INT8 quantization of the FP32 graph (every MatMul weight INT8,
    # activations quantized at run time) - the speed ONNX Runtime itself reaches on this machine.
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        paths["ort quantize_dynamic"] = workdir / "minilm_ort_dynamic.onnx"
        quantize_dynamic(str(paths["fp32"]), str(paths["ort quantize_dynamic"]), weight_type=QuantType.QInt8)
        sess = ort_session(paths["ort quantize_dynamic"], optimize=True, threads=threads)
        embs = [torch.from_numpy(np.asarray(sess.run(None, {n: b[n].numpy().astype(np.int64) for n in names})[0]))
                for b in ev_fixed]
        out["ort_quantize_dynamic_vs_fp32"] = M.compare_embeddings(ref, torch.cat(embs))
    except Exception as e:  # a reference only
        paths.pop("ort quantize_dynamic", None)
        out["ort_quantize_dynamic_error"] = f"{type(e).__name__}: {e}"[:300]
    out["speed"] = speedup(paths, feed, rounds, threads)
    return out


def vit(workdir: Path, rounds: int, threads: int) -> Dict[str, Any]:
    from torchvision.models import vit_b_16

    torch.manual_seed(0)
    fp = vit_b_16().eval()  # random init: structure and speed only
    q = trtquant.quantize(copy.deepcopy(fp))
    trtquant.calibrate(q, [torch.randn(2, 3, 224, 224)], method="percentile", progress=False)
    x = torch.randn(1, 3, 224, 224)
    paths = {"fp32": workdir / "vit_fp32.onnx", "int8": workdir / "vit_int8_ort.onnx"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(fp, (x,), str(paths["fp32"]), dynamo=False, opset_version=17, input_names=["input"],
                          dynamic_axes={"input": {0: "batch"}})
    export_onnx(q, x, paths["int8"], exporter="legacy", target="onnxruntime")
    res: Dict[str, Any] = {"ort_integer_kernels": _kernels(paths["int8"])}
    for b in (1, 8):
        res[f"batch{b}"] = speedup(paths, {"input": torch.randn(b, 3, 224, 224).numpy()}, rounds, threads)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-vit", action="store_true")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default="results/transformers")
    ap.add_argument("--out", default="results/transformers.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    payload: Dict[str, Any] = {"machine": _common.machine(), "threads": args.threads}
    if not args.skip_minilm:
        from trtquant.accuracy.minilm import why_unavailable

        why = why_unavailable()
        payload["minilm"] = {"skipped": why} if why else minilm(workdir, args.rounds, args.threads)
    if not args.skip_vit:
        payload["vit_b_16"] = vit(workdir, args.rounds, args.threads)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2))
    print(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
