"""Issue-4 figures: ResNet-50 export time, and ONNX Runtime CPU latency of the FP32 graph vs
trtquant's ONNX Runtime INT8 graph (batch 1 and 8, 2 threads), as speed-up ratios from one run,
plus the fraction of Conv layers ONNX Runtime runs as INT8 kernels.

    python bench/ort_int8.py [--models resnet50,mobilenet_v2] [--size 224] [--duration 3]
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import time
import warnings
from pathlib import Path

import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import trtquant  # noqa: E402
from trtquant.bench import benchmark  # noqa: E402
from trtquant.export import export_onnx  # noqa: E402
from trtquant.export.compare import ort_session  # noqa: E402
from trtquant.export.ort_graph import int8_conv_fraction  # noqa: E402
from trtquant.models import get  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,mobilenet_v2")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--workdir", default="runs/ort_int8")
    ap.add_argument("--out", default="results/ort_int8.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    results = {"machine": _common.machine(), "threads": args.threads, "size": args.size, "models": {}}
    rows = []
    for name in args.models.split(","):
        recipe = get(name)
        fp, _ = recipe.create(pretrained=False)
        x = recipe.example_input(1, args.size)
        fp32_path = work / f"{name}_fp32.onnx"
        buf = io.BytesIO()
        torch.onnx.export(fp, (x,), buf, dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        fp32_path.write_bytes(buf.getvalue())
        q = trtquant.quantize(copy.deepcopy(fp))
        trtquant.calibrate(q, [recipe.example_input(4, args.size) for _ in range(2)], method="entropy", progress=False)
        timings = {}
        for exporter in ("legacy", "dynamo"):
            t = time.perf_counter()
            export_onnx(q, x, work / f"{name}_trt_{exporter}.onnx", exporter=exporter)
            timings[f"export_trt_{exporter}_s"] = time.perf_counter() - t
        t = time.perf_counter()
        int8_path = work / f"{name}_ort_int8.onnx"
        export_onnx(q, x, int8_path, target="onnxruntime", exporter="legacy")
        timings["export_ort_int8_s"] = time.perf_counter() - t
        opt_path = work / f"{name}_ort_int8.optimized.onnx"
        ort_session(int8_path, optimize=True, threads=args.threads, optimized_model_path=str(opt_path))
        n_int8, n_conv = int8_conv_fraction(onnx.load(str(opt_path)))
        shape = tuple(recipe.input_shape[:1]) + (args.size, args.size)
        lat = {}
        for label, path in (("fp32", fp32_path), ("int8", int8_path)):
            res = benchmark("onnxruntime", str(path), input_shape=shape, batch_sizes=batches, device="cpu",
                            intra_op_threads=args.threads, duration_s=args.duration, machine_info=False)
            lat[label] = {b.batch_size: b.latency_ms.median for b in res.results}
        speed = {b: lat["fp32"][b] / lat["int8"][b] for b in batches}
        results["models"][name] = {"timings": timings, "int8_convs": n_int8, "convs": n_conv, "latency": lat,
                                   "speedup": speed}
        for b in batches:
            rows.append(f"| {name} | {b} | {lat['fp32'][b]:.1f} | {lat['int8'][b]:.1f} | {speed[b]:.2f}x | "
                        f"{n_int8}/{n_conv} |")
        print(f"{name}: export TRT graph legacy {timings['export_trt_legacy_s']:.1f} s, dynamo "
              f"{timings['export_trt_dynamo_s']:.1f} s; ORT INT8 graph {timings['export_ort_int8_s']:.1f} s")
    _common.dump(args.out, results)
    print(f"\nONNX Runtime CPU, {args.threads} threads, {args.size}x{args.size}, median latency")
    print("| model | batch | FP32 ms | INT8 ms | speed-up | INT8 convs |\n|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
