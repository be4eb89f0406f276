"""``trtquant demo``: one real model end to end on the best available backend.

scikit-learn's digits with a small ResNet-style CNN (trained on first use, cached): FP32 vs INT8
top-1 and latency side by side. TensorRT when it is installed with a GPU, otherwise ONNX Runtime on
the CPU with trtquant's INT8 graph. Then ResNet-18 at 224x224 (random weights: latency only).
"""

from __future__ import annotations

import copy
import io
import time
import warnings
from pathlib import Path
from typing import Dict, List

import torch


def _say(msg: str) -> None:
    print(msg, flush=True)


def _export_float(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    path.write_bytes(buf.getvalue())


_UNSTABLE: List[float] = []  # latency CVs (%) above the harness's threshold, reported once per step


def _latency(path: Path, shape, batch: int, duration: float) -> float:
    from .bench import UnstableLatencyWarning, benchmark

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnstableLatencyWarning)
        res = benchmark("onnxruntime", str(path), input_shape=shape, batch_sizes=[batch], device="cpu",
                        intra_op_threads=torch.get_num_threads(), duration_s=duration, machine_info=False)
    for w in caught:
        if issubclass(w.category, UnstableLatencyWarning):
            _UNSTABLE.append(res.results[0].latency_ms.cv_pct)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return res.results[0].latency_ms.median


def _say_unstable() -> None:
    """One line instead of a warning per measurement: a busy machine is normal, the medians still stand."""
    if _UNSTABLE:
        worst = max(_UNSTABLE)
        _say(f"      note: latency varied between runs (coefficient of variation up to {worst:.0f}%): other load "
             "on this machine; medians shown. For stable figures stop other load (on a GPU also lock clocks)")
        _UNSTABLE.clear()


def run_demo(quick: bool = False, workdir: str = "runs/demo") -> int:
    from . import calibrate, quantize
    from .accuracy.digits import accuracy, get_digits_model, load_digits_data, ort_accuracy
    from .calib_cache import load_calibration, save_calibration
    from .calibrate import collect_statistics
    from .engine import tensorrt_available
    from .export import check_onnx, export_onnx

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    backend = "tensorrt" if tensorrt_available() and torch.cuda.is_available() else "onnxruntime"
    _say(f"trtquant demo - backend: {backend}"
         + ("" if backend == "tensorrt" else " (TensorRT not installed or no GPU: ONNX Runtime on CPU, INT8 kernels)"))

    _say("\n[1/5] digits (scikit-learn, 1797 real 8x8 images -> 32x32): loading or training the float CNN ...")
    t = time.perf_counter()
    data = load_digits_data()
    fp32 = get_digits_model(data=data)
    _say(f"      ready in {time.perf_counter() - t:.1f} s; test set {len(data.y_test)} images")
    acc_fp32 = accuracy(fp32, data.x_test, data.y_test)

    _say("[2/5] quantize (TensorRT placement) and calibrate: histograms collected once, amax per method ...")
    q = quantize(copy.deepcopy(fp32))
    collect_statistics(q, data.calib_batches(), progress=False)
    cache = save_calibration(q, work / "digits_calib.safetensors")
    results: Dict[str, float] = {}
    for method, kw in [("max", {}), ("percentile", {"percentile": 99.99}), ("mse", {}), ("entropy", {})]:
        load_calibration(q, cache, method=method, **kw)
        results[method] = accuracy(q, data.x_test, data.y_test)
    best = max(results, key=lambda m: (results[m], m == "entropy"))
    load_calibration(q, cache, method=best, **({"percentile": 99.99} if best == "percentile" else {}))
    _say("      fake-quant top-1 by method: " + ", ".join(f"{m} {a:.2f}%" for m, a in results.items())
         + f" -> using {best}")

    _say("[3/5] export Q/DQ ONNX for TensorRT and validate it ...")
    example = data.x_test[:1]
    trt_onnx = work / "digits_int8_trt.onnx"
    export_onnx(q, example, trt_onnx, exporter="legacy")
    report = check_onnx(trt_onnx, target="trt10")
    _say(f"      {trt_onnx}: {len(report.errors)} errors, {len(report.warnings)} warnings "
         f"({'TensorRT fuses the placement' if report.fusion_ok else 'fusion warnings: see trtquant check'})")

    rows: List[List[str]] = []
    shape = tuple(example.shape[1:])
    if backend == "tensorrt":
        _say("[4/5] TensorRT engine build ...")
        from .engine import build_engine

        build_engine(trt_onnx, work / "digits_int8.engine", max_shapes={"input": (256, *shape)},
                     opt_shapes={"input": (64, *shape)}, min_shapes={"input": (1, *shape)})
        _say("      built; run 'trtquant bench --backend tensorrt' for latency")
    _say("[4/5] ONNX Runtime: FP32 graph vs trtquant's INT8 graph (same calibration) ...")
    fp32_onnx, int8_onnx = work / "digits_fp32.onnx", work / "digits_int8_ort.onnx"
    _export_float(fp32, example, fp32_onnx)
    export_onnx(q, example, int8_onnx, target="onnxruntime", exporter="legacy")
    acc_ort_fp32 = ort_accuracy(fp32_onnx, data.x_test, data.y_test)
    acc_ort_int8 = ort_accuracy(int8_onnx, data.x_test, data.y_test)
    dur = 0.5 if quick else 2.0
    lat32, lat8 = _latency(fp32_onnx, shape, 64, dur), _latency(int8_onnx, shape, 64, dur)
    _say_unstable()
    rows.append(["digits CNN, batch 64", f"{acc_fp32:.2f}%", f"{results[best]:.2f}%", f"{acc_ort_fp32:.2f}%",
                 f"{acc_ort_int8:.2f}%", f"{lat32:.2f}", f"{lat8:.2f}", f"{lat32 / lat8:.2f}x"])

    if not quick:
        _say("[5/5] ResNet-18 224x224 (random weights: latency only) ...")
        import torchvision

        r18 = torchvision.models.resnet18().eval()
        x = torch.randn(1, 3, 224, 224)
        qr = quantize(copy.deepcopy(r18))
        calibrate(qr, [torch.randn(4, 3, 224, 224) for _ in range(2)], method="entropy", progress=False)
        _export_float(r18, x, work / "resnet18_fp32.onnx")
        export_onnx(qr, x, work / "resnet18_int8_ort.onnx", target="onnxruntime", exporter="legacy")
        l32 = _latency(work / "resnet18_fp32.onnx", (3, 224, 224), 1, dur)
        l8 = _latency(work / "resnet18_int8_ort.onnx", (3, 224, 224), 1, dur)
        _say_unstable()
        rows.append(["ResNet-18 224, batch 1", "-", "-", "-", "-", f"{l32:.2f}", f"{l8:.2f}", f"{l32 / l8:.2f}x"])
    else:
        _say("[5/5] skipped (--quick)")

    head = ["model", "FP32 top-1", "fake-quant INT8", "ORT FP32", "ORT INT8", "FP32 ms", "INT8 ms", "speed-up"]
    _say("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        _say("| " + " | ".join(r) + " |")
    _say(f"\nONNX Runtime CPU, {torch.get_num_threads()} threads, median latency. Artifacts in {work}/ "
         f"(TensorRT graph: {trt_onnx.name}; build it on a GPU with 'trtquant build {trt_onnx}').")
    return 0
