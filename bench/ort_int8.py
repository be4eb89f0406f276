"""Issue-4 figures: ResNet-50 export time, and ONNX Runtime CPU latency of the FP32 graph vs
trtquant's ONNX Runtime INT8 graph (batch 1 and 8, 2 threads), as speed-up ratios from one run,
plus the fraction of Conv layers ONNX Runtime runs as INT8 kernels, and for reference the graph that
ONNX Runtime's own quantize_static makes from the FP32 graph (its speed is what ORT reaches here).

    python bench/ort_int8.py [--models resnet50,mobilenet_v2] [--size 224] [--duration 3]
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
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


def _ort_quantize_static(fp32_path: Path, out: Path, calib: list) -> None:
    """ONNX Runtime's own static quantizer on the FP32 graph (QDQ, per-channel int8 weights, uint8
    activations, MinMax), same calibration images: the speed ONNX Runtime itself reaches here."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{"input": x.numpy()} for x in calib])

        def get_next(self):
            return next(self._it, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)  # ORT's documented first step
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,mobilenet_v2")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per graph and batch size, over all rounds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-ort-reference", dest="ort_reference", action="store_false",
                    help="skip the reference graph from onnxruntime.quantization.quantize_static")
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
        graphs = {"fp32": fp32_path, "int8": int8_path}
        if args.ort_reference:
            ref_path = work / f"{name}_ort_quantizer.onnx"
            try:
                _ort_quantize_static(fp32_path, ref_path, [recipe.example_input(4, args.size) for _ in range(2)])
                graphs["ort_quantizer"] = ref_path
            except Exception as e:  # the reference is informative only
                print(f"{name}: onnxruntime.quantization reference failed: {e}")
        # Interleaved rounds: a slow phase of a shared machine hits every graph alike.
        per_round: dict = {label: {b: [] for b in batches} for label in graphs}
        for _ in range(args.rounds):
            for label, path in graphs.items():
                res = benchmark("onnxruntime", str(path), input_shape=shape, batch_sizes=batches, device="cpu",
                                intra_op_threads=args.threads, duration_s=args.duration / args.rounds,
                                warmup_s=0.2, machine_info=False)
                for b in res.results:
                    per_round[label][b.batch_size].append(b.latency_ms.median)
        lat = {label: {b: statistics.median(v) for b, v in d.items()} for label, d in per_round.items()}
        speed = {b: lat["fp32"][b] / lat["int8"][b] for b in batches}
        results["models"][name] = {"timings": timings, "int8_convs": n_int8, "convs": n_conv, "latency": lat,
                                   "speedup": speed}
        for b in batches:
            ref = f"{lat['fp32'][b] / lat['ort_quantizer'][b]:.2f}x" if "ort_quantizer" in lat else "-"
            rows.append(f"| {name} | {b} | {lat['fp32'][b]:.1f} | {lat['int8'][b]:.1f} | {speed[b]:.2f}x | "
                        f"{n_int8}/{n_conv} | {ref} |")
        print(f"{name}: export TRT graph legacy {timings['export_trt_legacy_s']:.1f} s, dynamo "
              f"{timings['export_trt_dynamo_s']:.1f} s; ORT INT8 graph {timings['export_ort_int8_s']:.1f} s")
    _common.dump(args.out, results)
    print(f"\nONNX Runtime CPU, {args.threads} threads, {args.size}x{args.size}, median latency")
    print("| model | batch | FP32 ms | INT8 ms | speed-up | INT8 convs | onnxruntime.quantization graph |\n"
          "|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
