"""Sweep models x precisions (fp32, fp16, int8) x batch sizes into one results file + summary table.

TensorRT (default when installed with a GPU): strongly typed engines built from an fp32 graph, an
fp16 graph, and trtquant's Q/DQ INT8 graph exported in fp16 (INT8 layers + FP16 elsewhere); latency
is GPU compute time from CUDA events (trtexec 11.x semantics), throughput separately per batch.
``--backend onnxruntime`` runs the same sweep on the CPU (fp32 and trtquant's ORT INT8 graph).

    python bench/trt_suite.py --models resnet50,mobilenet_v2 --batch-sizes 1,8,32 [--backend tensorrt]
Results: results/suite_<date>_<device>_<backend>.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import io
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import trtquant  # noqa: E402
from trtquant.bench import benchmark, collect_machine_info  # noqa: E402
from trtquant.export import check_onnx, export_onnx  # noqa: E402
from trtquant.models import get  # noqa: E402


def export_float(model, x, path: Path, half: bool) -> None:
    m = copy.deepcopy(model).eval()
    if half:
        m, x = m.half(), x.half()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), buf, dynamo=False, opset_version=17, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    path.write_bytes(buf.getvalue())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,mobilenet_v2")
    ap.add_argument("--precisions", default="fp32,fp16,int8")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--backend", choices=["tensorrt", "onnxruntime"], default=None)
    ap.add_argument("--calib-batches", type=int, default=8, help="random-input calibration batches (use real data for accuracy)")
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--workdir", default="runs/suite")
    args = ap.parse_args()
    from trtquant.engine import tensorrt_available

    backend = args.backend or ("tensorrt" if tensorrt_available() and torch.cuda.is_available() else "onnxruntime")
    if backend == "tensorrt" and not (tensorrt_available() and torch.cuda.is_available()):
        print("bench/trt_suite.py: TensorRT with a CUDA GPU is required for --backend tensorrt "
              "(pip install tensorrt-cu12 / tensorrt-cu13, or the NGC container)", file=sys.stderr)
        return 2
    precisions = args.precisions.split(",") if backend == "tensorrt" else [p for p in args.precisions.split(",") if p != "fp16"]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    machine = collect_machine_info()
    rows, results = [], []
    for name in args.models.split(","):
        recipe = get(name)
        fp, real = recipe.create()
        x = recipe.example_input(1)
        q = trtquant.quantize(copy.deepcopy(fp))
        trtquant.calibrate(q, [recipe.example_input(8) for _ in range(args.calib_batches)], method="entropy", progress=False)
        for prec in precisions:
            onnx_path = work / f"{name}_{prec}_{backend}.onnx"
            if prec == "int8":
                export_onnx(q, x, onnx_path, dtype="fp16" if backend == "tensorrt" else "fp32",
                            target="tensorrt" if backend == "tensorrt" else "onnxruntime", exporter="legacy")
                if backend == "tensorrt":
                    report = check_onnx(onnx_path, target="trt10", strongly_typed=True)
                    if not report.ok:
                        print(report.format_table())
                        return 1
            else:
                export_float(fp, x, onnx_path, half=prec == "fp16")
            model_path = onnx_path
            if backend == "tensorrt":
                from trtquant.engine import build_engine

                shape = tuple(recipe.input_shape)
                res = build_engine(onnx_path, onnx_path.with_suffix(".engine"), min_shapes={"input": (1, *shape)},
                                   opt_shapes={"input": (max(batches), *shape)}, max_shapes={"input": (max(batches), *shape)})
                model_path = res.engine_path
            bench = benchmark(backend, str(model_path), input_shape=tuple(recipe.input_shape), batch_sizes=batches,
                              duration_s=args.duration, machine_info=False)
            for b in bench.results:
                results.append({"model": name, "precision": prec, "batch": b.batch_size, "real_weights": real,
                                **b.to_dict()})
                rows.append(f"| {name} | {prec} | {b.batch_size} | {b.latency_ms.median:.3f} | "
                            f"{b.latency_ms.to_dict().get('p99', float('nan')):.3f} | {b.throughput:.1f} |")
    device = (machine.get("gpu") or {}).get("name", "cpu") if isinstance(machine.get("gpu"), dict) else "cpu"
    out = Path("results") / f"suite_{dt.date.today()}_{str(device).replace(' ', '_')}_{backend}.json"
    _common.dump(str(out), {"machine": machine, "backend": backend, "results": results})
    print("| model | precision | batch | median ms | p99 ms | samples/s |\n|---|---|---|---|---|---|\n" + "\n".join(rows))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
