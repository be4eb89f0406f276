"""The accuracy runs behind ``bench/accuracy.py`` and the flow tests (one code path for both).

:func:`run_digits`: FP32 -> quantize -> collect histograms once -> ``save_calibration`` -> every amax
method recomputed from the cache (``load_calibration(..., method=...)``, no data) -> best PTQ ->
QAT from it -> ONNX export -> ONNX Runtime CPU (graph optimisations on) top-1 on the test set.

:func:`run_minilm`: the same per-method comparison of embeddings against FP32 for MiniLM's Linear
layers, then :func:`trtquant.sensitivity.auto_fallback` to a cosine budget.
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

logger = logging.getLogger(__name__)

# (label, load_calibration kwargs); max-calibrated weights always use max.
METHODS: List[Tuple[str, Dict[str, Any]]] = [
    ("max", {"method": "max"}),
    ("percentile 99.9", {"method": "percentile", "percentile": 99.9}),
    ("percentile 99.99", {"method": "percentile", "percentile": 99.99}),
    ("mse", {"method": "mse"}),
    ("entropy", {"method": "entropy"}),
]

Log = Callable[[str], None]


def _quiet_ort() -> None:
    try:
        import onnxruntime as ort

        ort.set_default_logger_severity(3)  # no per-initializer warnings
    except Exception:  # pragma: no cover - onnxruntime is a core dependency
        pass


def _export(model: nn.Module, example: Any, path: Path, exporter: str) -> Tuple[Any, str]:
    """Export for ONNX Runtime's INT8 kernels when the exporter supports it, else the TensorRT Q/DQ graph."""
    from ..export.onnx import export_onnx

    kwargs: Dict[str, Any] = {}
    target = "tensorrt"
    if "target" in inspect.signature(export_onnx).parameters:
        kwargs["target"] = target = "onnxruntime"
    return export_onnx(model, example, path, exporter=exporter, **kwargs), target


def _ort_int8_ops(path: Path) -> Dict[str, int]:
    """Op counts of the graph ONNX Runtime actually runs (after its optimisations)."""
    import collections

    from ..export.compare import optimized_graph

    counts = collections.Counter(n.op_type for n in optimized_graph(path).graph.node)
    return {k: v for k, v in sorted(counts.items()) if k.startswith("QLinear") or k in (
        "QGemm", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "ConvInteger", "QAttention")}


def run_digits(quick: bool = False, workdir: Optional[Path] = None, qat_epochs: Optional[int] = None,
               exporter: Optional[str] = None, log: Log = logger.info) -> Dict[str, Any]:
    """Digits CNN: FP32, PTQ per method, QAT, ONNX Runtime INT8. Accuracies in percent."""
    import trtquant

    from ..qat import amax_param_groups, clamp_learned_amax, prepare_qat
    from ..states import set_state
    from . import digits as D

    _quiet_ort()
    workdir = Path(workdir or "results/accuracy")
    workdir.mkdir(parents=True, exist_ok=True)
    qat_epochs = qat_epochs if qat_epochs is not None else (1 if quick else 3)
    exporter = exporter or ("legacy" if quick else "dynamo")
    times: Dict[str, float] = {}

    t = time.perf_counter()
    data = D.load_digits_data()
    fp = D.get_digits_model(data=data)
    times["load_or_train_s"] = time.perf_counter() - t
    fp32 = D.accuracy(fp, data.x_test, data.y_test)
    log(f"digits: FP32 top-1 {fp32:.2f}% on {len(data.y_test)} test images")

    q = trtquant.quantize(copy.deepcopy(fp)).eval()
    t = time.perf_counter()
    trtquant.collect_statistics(q, data.calib_batches(512), progress=False)
    cache = trtquant.save_calibration(q, workdir / "digits.calib.safetensors")
    times["collect_s"] = time.perf_counter() - t

    ptq: Dict[str, float] = {}
    for label, kw in METHODS:
        trtquant.load_calibration(q, cache, **kw)  # recomputed from the stored histograms, no data
        set_state(q, "validate")
        ptq[label] = D.accuracy(q, data.x_test, data.y_test)
        log(f"digits: PTQ {label:17s} {ptq[label]:.2f}%")
    best = max(METHODS, key=lambda m: ptq[m[0]])  # ties: the first in METHODS
    trtquant.load_calibration(q, cache, **best[1])
    set_state(q, "validate")

    example = data.x_test[:1]
    t = time.perf_counter()
    res, target = _export(q, example, workdir / "digits_ptq.onnx", exporter)
    ptq_ort = D.ort_accuracy(res.path, data.x_test, data.y_test, optimize=True)
    times["export_ort_ptq_s"] = time.perf_counter() - t
    log(f"digits: PTQ {best[0]} in ONNX Runtime ({target} graph) {ptq_ort:.2f}%")

    # QAT from the best calibration, learned activation amax.
    t = time.perf_counter()
    prepare_qat(q, learn_amax=True)
    opt = torch.optim.AdamW(amax_param_groups(q, lr=1e-4, amax_lr=1e-3, weight_decay=1e-4))
    losses = D.train_epochs(q, data, qat_epochs, opt, seed=1, after_step=lambda: clamp_learned_amax(q))
    q.eval()
    set_state(q, "validate")
    qat = D.accuracy(q, data.x_test, data.y_test)
    times["qat_s"] = time.perf_counter() - t
    log(f"digits: QAT ({qat_epochs} epoch(s), losses {', '.join(f'{x:.4f}' for x in losses)}) {qat:.2f}%")

    t = time.perf_counter()
    res, target = _export(q, example, workdir / "digits_qat.onnx", exporter)
    qat_ort = D.ort_accuracy(res.path, data.x_test, data.y_test, optimize=True)
    times["export_ort_qat_s"] = time.perf_counter() - t
    ops = _ort_int8_ops(res.path)
    log(f"digits: QAT in ONNX Runtime ({target} graph, INT8 kernels {ops}) {qat_ort:.2f}%")
    return {
        "test_images": len(data.y_test), "fp32": fp32, "ptq": ptq, "best_ptq_method": best[0],
        "ptq_best": ptq[best[0]], "ptq_ort": ptq_ort, "qat": qat, "qat_ort": qat_ort, "qat_epochs": qat_epochs,
        "qat_losses": losses, "onnx_target": target, "exporter": exporter, "ort_int8_kernels": ops,
        "ort_graph_optimization": "ORT_ENABLE_ALL", "times": times, "calibration_cache": str(cache),
    }


def run_minilm(quick: bool = False, workdir: Optional[Path] = None, budget: float = 0.01, ort: bool = True,
               log: Log = logger.info) -> Dict[str, Any]:
    """MiniLM: embeddings vs FP32 per method (all encoder Linear layers INT8), then auto_fallback to
    ``mean cosine >= 1 - budget`` on the calibration sentences, evaluated on the test sentences."""
    import trtquant

    from ..nn.base import QuantMixin
    from ..sensitivity import auto_fallback, sensitivity
    from ..states import set_state
    from . import minilm as M

    _quiet_ort()
    workdir = Path(workdir or "results/accuracy")
    workdir.mkdir(parents=True, exist_ok=True)
    times: Dict[str, float] = {}
    t = time.perf_counter()
    fp, tok = M.load_minilm()
    ev = M.tokenize(tok, M.SENTENCES)
    cal = M.tokenize(tok, M.CALIB_SENTENCES)
    ref = M.encode(fp, ev)
    times["load_s"] = time.perf_counter() - t

    q = M.MiniLMEncoder(copy.deepcopy(fp.bert)).eval()
    trtquant.quantize(q, include=nn.Linear, exclude="bert.pooler*", placement=None)
    n_linear = sum(1 for m in q.modules() if isinstance(m, QuantMixin))
    t = time.perf_counter()
    trtquant.collect_statistics(q, cal, progress=False)
    cache = trtquant.save_calibration(q, workdir / "minilm.calib.safetensors")
    times["collect_s"] = time.perf_counter() - t

    per_method: Dict[str, Dict[str, float]] = {}
    t = time.perf_counter()
    for label, kw in METHODS:
        if quick and label != "percentile 99.99":
            continue  # the quick run keeps the best method only
        trtquant.load_calibration(q, cache, **kw)
        set_state(q, "validate")
        per_method[label] = M.compare_embeddings(ref, M.encode(q, ev))
        log(f"minilm: {label:17s} mean cosine {per_method[label]['mean_cosine']:.4f}, "
            f"top-1 agreement {100 * per_method[label]['top1_agreement']:.0f}%")
    times["methods_s"] = time.perf_counter() - t
    best = max((m for m in METHODS if m[0] in per_method), key=lambda m: per_method[m[0]]["mean_cosine"])
    trtquant.load_calibration(q, cache, **best[1])
    set_state(q, "validate")

    # Fallback: rank by output SQNR on a few calibration sentences, metric on calibration sentences
    # (never the test sentences).
    metric_batches = M.tokenize(tok, M.CALIB_SENTENCES[:12]) if quick else cal
    ref_metric = M.encode(fp, metric_batches)

    def cosine_on_calib(model: nn.Module) -> float:
        return M.compare_embeddings(ref_metric, M.encode(model, metric_batches))["mean_cosine"]

    t = time.perf_counter()
    rank_data = M.tokenize(tok, M.CALIB_SENTENCES[: 4 if quick else 12], batch_size=16)
    ranking = sensitivity(q, rank_data)
    report = auto_fallback(q, None, cosine_on_calib, budget=budget, ranking=ranking)
    fallback = M.compare_embeddings(ref, M.encode(q, ev))
    times["fallback_s"] = time.perf_counter() - t
    log(f"minilm: auto_fallback (budget {budget}) keeps {report.fallback_layers or 'no layer'} in float: "
        f"mean cosine {fallback['mean_cosine']:.4f}")

    ort_result: Dict[str, Any] = {"ran": False}
    if ort:
        t = time.perf_counter()
        try:
            longest = max(int(b["attention_mask"].sum(1).max()) for b in ev)
            ev_fixed = M.tokenize(tok, M.SENTENCES, max_length=longest, fixed_length=True)
            ort_result = _minilm_ort(q, ev_fixed, ref, workdir / "minilm_int8.onnx")
        except Exception as e:  # an exporter limitation on transformers must not sink the whole report
            ort_result = {"ran": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            log(f"minilm: ONNX Runtime run skipped: {ort_result['error']}")
        times["ort_s"] = time.perf_counter() - t
    return {
        "sentences": len(M.SENTENCES), "calibration_sentences": len(M.CALIB_SENTENCES),
        "quantized_linear": n_linear,
        "per_method": per_method, "best_method": best[0], "best": per_method[best[0]],
        "fallback": {"budget": budget, "layers": report.fallback_layers, "embeddings": fallback,
                     "steps": [(s.layer, s.metric) for s in report.steps], "quantized_layers": report.quantized_layers,
                     "float_layers": report.float_layers, "met_on_calibration": report.met},
        "sensitivity_top5": [(r.name, r.sqnr_db) for r in ranking[:5]],
        "ort": ort_result, "times": times, "calibration_cache": str(cache),
    }


def _minilm_ort(q: nn.Module, ev: List[Dict[str, torch.Tensor]], ref: torch.Tensor, path: Path) -> Dict[str, Any]:
    import numpy as np

    from ..export.compare import ort_session
    from ..export.onnx import export_onnx
    from . import minilm as M

    example = (ev[0]["input_ids"], ev[0]["attention_mask"])
    # Dynamic batch, sequence length fixed by the example (sentences are padded to it; padding is masked).
    # The ONNX Runtime target: every quantized Linear becomes an INT8 MatMulIntegerToFloat kernel.
    export_onnx(q, example, path, exporter="dynamo", input_names=["input_ids", "attention_mask"],
                target="onnxruntime")
    sess = ort_session(path, optimize=True)
    names = [i.name for i in sess.get_inputs()]
    outs = []
    for b in ev:
        feed = {n: b[n].numpy().astype(np.int64) for n in names}
        outs.append(torch.from_numpy(np.asarray(sess.run(None, feed)[0])))
    emb = torch.cat(outs)
    res = M.compare_embeddings(ref, emb)
    from ..export.ort_flavor import ort_flavor_

    fq = M.compare_embeddings(M.encode(ort_flavor_(copy.deepcopy(q)), ev), emb)
    return {"ran": True, "graph": "onnxruntime INT8 graph, ORT_ENABLE_ALL", "vs_fp32": res,
            "vs_fake_quant_cosine": fq["mean_cosine"], "int8_kernels": _ort_int8_ops(path)}


def markdown_digits(r: Dict[str, Any]) -> str:
    lines = [f"Digits ResNet ({r['test_images']} test images), top-1 %", "",
             "| calibration method | FP32 | INT8 fake quant (PTQ) |", "|---|---|---|"]
    for label, _ in METHODS:
        if label in r["ptq"]:
            lines.append(f"| {label} | {r['fp32']:.2f} | {r['ptq'][label]:.2f} |")
    lines += ["", f"| model | FP32 | INT8 fake quant | ONNX Runtime INT8 |", "|---|---|---|---|",
              f"| PTQ ({r['best_ptq_method']}) | {r['fp32']:.2f} | {r['ptq_best']:.2f} | {r['ptq_ort']:.2f} |",
              f"| QAT ({r['qat_epochs']} epoch(s), learned amax) | {r['fp32']:.2f} | {r['qat']:.2f} | {r['qat_ort']:.2f} |"]
    return "\n".join(lines)


def markdown_minilm(r: Dict[str, Any]) -> str:
    lines = [f"MiniLM-L6 embeddings vs FP32 ({r['sentences']} sentences, {r['quantized_linear']} Linear layers INT8)", "",
             "| calibration method | mean cosine | min cosine | top-1 retrieval agreement |", "|---|---|---|---|"]
    for label, m in r["per_method"].items():
        lines.append(f"| {label} | {m['mean_cosine']:.4f} | {m['min_cosine']:.4f} | {100 * m['top1_agreement']:.0f}% |")
    fb = r["fallback"]
    e = fb["embeddings"]
    lines.append(f"| {r['best_method']} + auto_fallback ({len(fb['layers'])} layer(s) float) | {e['mean_cosine']:.4f} | "
                 f"{e['min_cosine']:.4f} | {100 * e['top1_agreement']:.0f}% |")
    o = r.get("ort") or {}
    if o.get("ran"):
        v = o["vs_fp32"]
        how = "INT8 kernels" if o.get("int8_kernels") else "Q/DQ executed as float: ORT fuses no INT8 kernel here"
        lines.append(f"| same, ONNX Runtime ({how}) | {v['mean_cosine']:.4f} | {v['min_cosine']:.4f} | "
                     f"{100 * v['top1_agreement']:.0f}% |")
    elif o.get("error"):
        lines.append(f"\nONNX Runtime: not run ({o['error']})")
    if fb["layers"]:
        lines.append(f"\nkept in float by auto_fallback: {', '.join(fb['layers'])}")
    return "\n".join(lines)
