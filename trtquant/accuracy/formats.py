"""FP8 E4M3 and INT4 weight-only on real models: the pretrained MiniLM encoder and a ResNet-18 graph.

One function per acceptance figure of the formats work, shared by ``bench/formats.py`` (full data,
timings, JSON) and ``tests/flows/test_formats_models.py`` (quick): quantize, calibrate, compare with
FP32, export for TensorRT, prove ONNX Runtime exact on it (teacher-forced activation codes; INT4
weights element by element) and list the ONNX Runtime kernels the graph runs.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from ..config import FP8_DEFAULT, QuantConfig, int4_weight_only

__all__ = ["minilm_format", "resnet18_fp8", "ort_kernels"]


def ort_kernels(path: Path, optimized: Path) -> Dict[str, int]:
    """Op counts of ONNX Runtime's optimised CPU graph (ORT_ENABLE_ALL), e.g. MatMulNBits for INT4."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(optimized)
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return dict(Counter(n.op_type for n in onnx.load(str(optimized)).graph.node))


def _ort_embeddings(path: Path, batches: Sequence[Dict[str, torch.Tensor]], level: str) -> torch.Tensor:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    outs = [sess.run(None, {"input_ids": b["input_ids"].numpy(), "attention_mask": b["attention_mask"].numpy()})[0]
            for b in batches]
    return torch.cat([torch.from_numpy(o).float() for o in outs])


def minilm_format(fmt: str, workdir: Path, quick: bool = False, block_size: int = 128,
                  patterns: Sequence[str] = ("*",), clip: bool = True) -> Dict[str, Any]:
    """MiniLM-L6 (pretrained) with every encoder Linear in ``fmt`` ('fp8', 'int4' weight-only, or 'int4+fp8':
    INT4 on ``patterns``, FP8 elsewhere): cosine vs FP32 in fake quant and ONNX Runtime, exactness, kernels.
    ``clip``: INT4 block amax by :func:`trtquant.ptq.clip_weight_amax` (else max, round to nearest)."""
    import trtquant
    from trtquant.export import check_onnx, export_onnx
    from trtquant.export.parity import teacher_forced, weight_parity

    from . import minilm as M

    fp, tok = M.load_minilm()
    sentences = M.SENTENCES[:16] if quick else M.SENTENCES
    # One padded length for every batch: the exported graph has a dynamic batch, a fixed sequence length.
    ev, cal = M.tokenize(tok, sentences, max_length=64, fixed_length=True), M.tokenize(tok, M.CALIB_SENTENCES)
    if fmt == "fp8":
        config: QuantConfig = FP8_DEFAULT
    elif fmt == "int4":
        config = int4_weight_only(list(patterns), block_size)
    elif fmt == "int4+fp8":
        config = int4_weight_only(list(patterns), block_size, base=FP8_DEFAULT)
    else:
        raise ValueError(f"fmt must be 'fp8', 'int4' or 'int4+fp8', got {fmt!r}")
    q = M.MiniLMEncoder(copy.deepcopy(fp.bert)).eval()
    trtquant.quantize(q, include=nn.Linear, exclude="bert.pooler*", placement=None, config=config)
    trtquant.calibrate(q, cal, method="max", progress=False)
    if clip and "int4" in fmt:
        from ..ptq import clip_weight_amax

        clip_weight_amax(q)
    ref = M.encode(fp, ev)
    fake = M.compare_embeddings(ref, M.encode(q, ev))
    formats = Counter(m.quant_desc.format_name for n, m in q.named_modules()
                      if n.endswith("weight_quantizer") and m.is_enabled)
    b = ev[0]
    path = Path(workdir) / f"minilm_{fmt}.onnx"
    export_onnx(q, (b["input_ids"], b["attention_mask"]), path, exporter="legacy",
                input_names=["input_ids", "attention_mask"])
    target = "trt11" if "int4" in fmt else "trt10"  # INT4 needs opset 21 (TensorRT 10.6+ parser)
    report = check_onnx(str(path), target=target)
    out: Dict[str, Any] = {"checker_target": target, "format": fmt, "block_size": block_size if "int4" in fmt else None,
                           "int4_amax": ("clip search" if clip else "max") if "int4" in fmt else None,
                           "weight_formats": dict(formats), "fake_quant": fake, "sentences": len(sentences),
                           "checker_errors": [f.rule for f in report.errors],
                           "checker_warnings": sorted({f.rule for f in report.warnings})}
    if "fp8" in fmt:
        tf = teacher_forced(q, path, (b["input_ids"], b["attention_mask"]))
        out["teacher_forced"] = {"nodes": len(tf.nodes), "codes": tf.codes, "mismatched": tf.mismatched,
                                 "max_diff_fp8_steps": tf.max_diff}
        # ORT_ENABLE_EXTENDED and up drop a Relu/Clip before a float8 QuantizeLinear (see docs/formats.md)
        out["ort"] = M.compare_embeddings(ref, _ort_embeddings(path, ev, "ORT_ENABLE_BASIC"))
    if "int4" in fmt:
        wp = weight_parity(q, path)
        out["weight_parity"] = {"layers": len(wp), "mismatched": sum(w.mismatched for w in wp)}
        out["ort"] = M.compare_embeddings(ref, _ort_embeddings(path, ev, "ORT_ENABLE_ALL"))
        out["ort_kernels"] = {k: v for k, v in ort_kernels(path, path.with_suffix(".opt.onnx")).items()
                              if k in ("MatMulNBits", "MatMul", "DequantizeLinear", "MatMulIntegerToFloat")}
    return out


def resnet18_fp8(workdir: Path, size: int = 64, batch: int = 2, dtype: str = "fp16",
                 seed: int = 0) -> Dict[str, Any]:
    """torchvision ResNet-18 (random init: structure and exactness, not accuracy) in FP8 E4M3: TensorRT graph,
    checker findings, teacher-forced exactness of every activation QuantizeLinear in ONNX Runtime."""
    import torchvision

    import trtquant
    from trtquant.export import check_onnx, export_onnx
    from trtquant.export.parity import teacher_forced

    torch.manual_seed(seed)
    m = torchvision.models.resnet18().eval()
    x = torch.randn(batch, 3, size, size)
    q = trtquant.quantize(m, config=FP8_DEFAULT)
    trtquant.calibrate(q, [x, torch.randn_like(x)], method="max", progress=False)
    path = Path(workdir) / f"resnet18_fp8_{dtype}.onnx"
    export_onnx(q, x, path, dtype=dtype, exporter="legacy")
    report = check_onnx(str(path), target="trt10")
    ref: nn.Module = copy.deepcopy(q).half() if dtype == "fp16" else q
    xin = x.half() if dtype == "fp16" else x
    tf = teacher_forced(ref, path, xin)
    n_fp8 = sum(1 for n, mod in q.named_modules() if n.endswith("quantizer") and mod.is_enabled
                and mod.quant_desc.is_fp8)
    return {"model": "resnet18", "size": size, "dtype": dtype, "fp8_quantizers": n_fp8,
            "checker_errors": [f.rule for f in report.errors],
            "checker_warnings": dict(Counter(f.rule for f in report.warnings)),
            "teacher_forced": {"nodes": len(tf.nodes), "codes": tf.codes, "mismatched": tf.mismatched,
                               "flagged": [n.node for n in tf.flagged()]}}


def summary(results: Sequence[Dict[str, Any]], machine: Optional[str] = None) -> str:
    """Markdown table of minilm_format results."""
    lines = ["| MiniLM-L6 format | weights | cosine vs FP32 (fake quant) | ONNX Runtime cosine | exact in ORT | ORT kernels |",
             "|---|---|---|---|---|---|"]
    for r in results:
        exact = []
        if "teacher_forced" in r:
            exact.append(f"{r['teacher_forced']['mismatched']} of {r['teacher_forced']['codes']} codes differ")
        if "weight_parity" in r:
            exact.append(f"{r['weight_parity']['mismatched']} weight values differ ({r['weight_parity']['layers']} layers)")
        int4 = f" b{r['block_size']}, {r['int4_amax']}" if r.get("block_size") else ""
        lines.append(f"| {r['format']}{int4} | {r['weight_formats']} | "
                     f"{r['fake_quant']['mean_cosine']:.4f} | {r['ort']['mean_cosine']:.4f} | {'; '.join(exact)} | "
                     f"{r.get('ort_kernels', '-')} |")
    return "\n".join(lines) + (f"\n\n{machine}" if machine else "")
