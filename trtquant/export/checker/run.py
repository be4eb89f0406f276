"""The entry point: load, validate (onnx.checker, shape inference), run every rule, add statistics."""

from __future__ import annotations

import os
import re
from typing import get_args

import onnx
from onnx import TensorProto as TP

from trtquant.graph.index import GraphIndex

# The rule modules register their rules on import; RULES orders them by checklist number.
from . import rules_attention, rules_fp8, rules_fusion, rules_kernels, rules_model, rules_qdq  # noqa: F401
from .context import RULES, Ctx, collect_qdq
from .report import CheckReport, Finding, Target

#: Finding ids of the loading and validation step (A1), reported before any rule runs.
VALIDATION_IDS = ("A1-load", "A1-onnx-checker", "A1-shape-inference", "A1-too-large")

_PROTO_LIMIT = 2**31 - 1


def _clip(text: object, n: int = 400) -> str:
    text = re.sub(r"\s+", " ", str(text)).strip()
    return text if len(text) <= n else text[: n - 3] + "..."


def _validate(model: onnx.ModelProto, path: str | None) -> tuple[onnx.ModelProto, list[Finding]]:
    """onnx.checker + strict shape inference (= check_model(full_check=True), reported separately)."""
    found: list[Finding] = []
    if model.ByteSize() > _PROTO_LIMIT:
        if path is None:
            found.append(Finding("info", "A1-too-large", (),
                                 "the model is over 2 GiB in memory: checker and shape inference were skipped",
                                 "pass the file path so onnx.checker.check_model can read the external data"))
            return model, found
        try:
            onnx.checker.check_model(path, full_check=True)
        except Exception as exc:
            found.append(Finding("error", "A1-onnx-checker", (), f"onnx.checker failed: {_clip(exc)}",
                                 "fix the export so that onnx.checker.check_model(path, full_check=True) passes"))
        return model, found
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        found.append(Finding("error", "A1-onnx-checker", (), f"onnx.checker failed: {_clip(exc)}",
                             "fix the export so that onnx.checker.check_model(model, full_check=True) passes"))
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True), found
    except Exception as exc:
        found.append(Finding("error", "A1-shape-inference", (), f"ONNX shape inference failed: {_clip(exc)}",
                             "fix the shapes/dtypes named above (onnx.shape_inference.infer_shapes(strict_mode=True))"))
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True), found
    except Exception:
        return model, found


def _stats(ctx: Ctx) -> dict[str, int | None]:
    weighted = [i for i, _ in ctx.weighted()]
    nq = sum(q.is_q for q in ctx.qdq.values())
    return {"opset": ctx.g.opset, "nodes": len(ctx.g.nodes), "qdq_nodes": len(ctx.qdq), "quantize_linear": nq,
            "dequantize_linear": len(ctx.qdq) - nq, "weighted_ops": len(weighted),
            "weighted_ops_quantized": sum(ctx.quantized_weighted(i) for i in weighted)}


def check_onnx(model: str | os.PathLike[str] | onnx.ModelProto, target: Target = "trt10",
               strongly_typed: bool | None = None) -> CheckReport:
    """Check a Q/DQ ONNX model against TensorRT's explicit-quantization rules (static part).

    Args:
        model: a path (external data is loaded relative to the file) or a loaded ``ModelProto``.
        target: ``trt10`` (TensorRT 10.x), ``trt11`` (always strongly typed) or ``dla`` (implicit
            INT8 through a calibration cache, static shapes).
        strongly_typed: whether a ``trt10`` build is strongly typed; None (unknown) reports an
            FP32 graph as info, True as a warning. ``trt11`` is always strongly typed.

    Returns:
        A :class:`CheckReport`; it never raises for a bad model, only for bad arguments.

    Raises:
        ValueError: unknown ``target``.
        TypeError: ``model`` is neither a path nor a ``ModelProto``.
        FileNotFoundError: ``model`` is a path to no file.
    """
    if target not in get_args(Target):
        raise ValueError(f"unknown target {target!r}; known: {', '.join(get_args(Target))}")
    typed = {"trt10": strongly_typed, "trt11": True, "dla": None}[target]
    path: str | None = None
    if isinstance(model, onnx.ModelProto):
        proto = model
    elif isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no ONNX file at {path!r}")
        try:
            proto = onnx.load(path)
        except Exception as exc:
            bad = Finding("error", "A1-load", (), f"{path} cannot be loaded as ONNX: {_clip(exc)}",
                          "re-export the model (the file is truncated, not ONNX, or its external data is missing)")
            return CheckReport((bad,), target, typed, {})
    else:
        raise TypeError(f"model must be a path or onnx.ModelProto, not {type(model).__name__}")
    if path is None and any(t.data_location == TP.EXTERNAL for t in proto.graph.initializer):
        raise ValueError("the model's external data is not loaded; pass the .onnx path (its data is read relative "
                         "to the file) or load it with onnx.load(path) first")
    inferred, findings = _validate(proto, path)
    g = GraphIndex(inferred, os.path.dirname(os.path.abspath(path)) if path else "")
    qdq = collect_qdq(g)
    ctx = Ctx(g, target, typed, qdq, [q for q in qdq.values() if q.merged_into is None],
               dtypes=frozenset(g.all_dtypes()), shapes_ok=not findings)
    for rule in RULES:
        try:
            findings.extend(rule(ctx))
        except Exception as exc:  # a checker must report on odd graphs, not die on them
            findings.append(Finding("warning", "internal-error", (), f"rule {rule.__name__} crashed ({exc!r}); "
                                    "the check is incomplete", "report this model to the trtquant maintainers"))
    return CheckReport(tuple(findings), target, typed, _stats(ctx))
