"""``trtquant`` command line: parse arguments, call the library, print tables and JSON.

Exit codes: 0 ok; 1 the step ran and found errors (validator errors, failed parity); 2 a
requirement is missing (TensorRT not installed) or the input is unusable.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, List, Optional, Sequence

EPILOG = """\
typical flow (ONNX Runtime on CPU; swap 'build'/'bench' to TensorRT on a GPU machine):
  trtquant quantize  --model resnet18 -o q.pt
  trtquant calibrate q.pt --data random --num-batches 4 --method entropy -o q_cal.pt
  trtquant export    q_cal.pt -o resnet18_int8.onnx
  trtquant check     resnet18_int8.onnx --target trt10
  trtquant debug     q_cal.pt resnet18_int8.onnx --plot sqnr.png       # per-layer SQNR, first divergence
  trtquant build     resnet18_int8.onnx -o resnet18.engine            # needs TensorRT
  trtquant bench     resnet18_int8.onnx --backend onnxruntime --batch-sizes 1,8
"""


def _csv(text: Optional[str]) -> Optional[List[str]]:
    return None if not text else [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> List[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _emit_json(obj: Any, path: Optional[str]) -> None:
    if path:
        from ..calib_cache import atomic_write_bytes

        atomic_write_bytes(path, json.dumps(obj, indent=2, default=str).encode())
        print(f"wrote {path}")


def _calibration_batches(kind: str, shape: Sequence[int], batch: int, num_batches: int):
    import torch

    if kind == "random":
        g = torch.Generator().manual_seed(0)
        return [torch.randn(batch, *shape, generator=g) for _ in range(num_batches)]
    path = Path(kind)
    if path.suffix == ".npy":
        import numpy as np

        arr = torch.from_numpy(np.load(path)).float()
        return [arr[i:i + batch] for i in range(0, min(len(arr), batch * num_batches), batch)]
    if path.suffix == ".pt":
        t = torch.load(path, map_location="cpu", weights_only=True)
        return [t[i:i + batch] for i in range(0, min(len(t), batch * num_batches), batch)]
    raise ValueError(f"--data must be 'random', a .npy or a .pt tensor file, got {kind!r}")


# ---- subcommands ------------------------------------------------------------------------------------

def cmd_quantize(a: argparse.Namespace) -> int:
    from ..convert import quantize
    from ..placement.fx_pass import format_placement_report, placement_report
    from . import checkpoint

    model, info = checkpoint.build_model(a.model, a.weights)
    quantize(model, include=_csv(a.include), exclude=_csv(a.exclude))
    checkpoint.save(a.output, a.model, a.weights, _csv(a.include), _csv(a.exclude), model)
    report = placement_report(model)
    if a.report:
        print(format_placement_report(report))
    n_on = sum(1 for e in report["quantizers"] if e["enabled"])
    print(f"quantized {a.model} ({'real' if info['real_weights'] else 'RANDOM'} weights): {n_on} quantizers on, "
          f"graph rules {'applied' if report['traced'] else 'skipped: ' + str(report['reason'])} -> {a.output}")
    return 0


def cmd_calibrate(a: argparse.Namespace) -> int:
    from ..calib_cache import load_calibration, save_calibration
    from ..calibrate import calibrate
    from . import checkpoint

    model, info = checkpoint.load(a.checkpoint)
    data = None
    if not a.from_cache or a.adaround or a.bias_correction:
        shape = info.get("input_shape") or _parse_shape(a.input_shape)
        if a.size:
            shape = [shape[0], a.size, a.size]
        data = _calibration_batches(a.data, shape, a.batch_size, a.num_batches)
    if a.from_cache:
        load_calibration(model, a.from_cache, method=a.method, **_method_kwargs(a))
        print(f"amax recomputed with {a.method} from {a.from_cache} (no data run)")
    else:
        assert data is not None  # built above whenever there is no cache
        calibrate(model, data, num_batches=a.num_batches, method=a.method, progress=not a.quiet, **_method_kwargs(a))
        cache = save_calibration(model, a.cache) if a.cache != "none" else None
        if cache:
            print(f"statistics cached in {cache} (try other methods: trtquant calibrate {a.checkpoint} --from-cache {cache} --method mse)")
    if a.adaround or a.bias_correction:
        _after_calibration(model, data or [], a)
    checkpoint.save(a.output, info["spec"], info.get("weights"), info.get("include"), info.get("exclude"), model)
    print(f"calibrated ({a.method}) -> {a.output}")
    return 0


def _after_calibration(model: Any, data: List[Any], a: argparse.Namespace) -> None:
    """The trtquant.ptq steps that run on the calibrated model, in the order docs/ptq.md gives."""
    from ..ptq import adaround, bias_correction

    if a.adaround:
        res = adaround(model, data, time_budget_s=a.adaround_budget, progress=not a.quiet)
        kept = sum(r.kept == "adaround" for r in res.values())
        print(f"adaround: {len(res)} layer(s) rounded, learned rounding kept in {kept} (nearest elsewhere)")
    if a.bias_correction:
        changes = bias_correction(model, data, error=a.bias_correction)
        print(f"bias_correction ({a.bias_correction}): {len(changes)} layer(s), largest change "
              f"{max(changes.values(), default=0.0):.3g}")


def _method_kwargs(a: argparse.Namespace) -> dict:
    return {"percentile": a.percentile} if a.method == "percentile" else {}


def _parse_shape(text: Optional[str]) -> List[int]:
    if not text:
        raise ValueError("this model has no recipe input shape: pass --input-shape C,H,W")
    return _ints(text)


def cmd_export(a: argparse.Namespace) -> int:
    import torch

    from ..export.onnx import export_onnx
    from . import checkpoint

    model, info = checkpoint.load(a.checkpoint)
    shape = info.get("input_shape") or _parse_shape(a.input_shape)
    if a.size:
        shape = [shape[0], a.size, a.size]
    res = export_onnx(model, torch.randn(a.batch_size, *shape), a.output, opset=a.opset, dtype=a.dtype,
                      dynamic_batch=not a.static_batch, exporter=a.exporter, weights=a.weights, target=a.target)
    print(f"exported {res.num_qdq} Q/DQ nodes, opset {res.opset}, {res.dtype}, {res.exporter} exporter, "
          f"target {a.target} -> {res.path}")
    if a.check and a.target == "tensorrt":
        return _print_check(str(res.path), "trt10", None, None)
    return 0


def _print_check(path: str, target: str, strongly_typed: Optional[bool], json_out: Optional[str]) -> int:
    from ..export.checker import check_onnx

    report = check_onnx(path, target=target, strongly_typed=strongly_typed)
    print(report.format_table())
    s = report.to_dict()
    print(f"\n{path}: {len(report.errors)} error(s), {len(report.warnings)} warning(s), {len(report.infos)} info; "
          f"{'TensorRT fuses the Q/DQ placement' if report.fusion_ok else 'see warnings: INT8 fusion will be lost'}")
    _emit_json(s, json_out)
    return 0 if report.ok else 1


def cmd_check(a: argparse.Namespace) -> int:
    return _print_check(a.onnx, a.target, a.strongly_typed, a.json)


def cmd_build(a: argparse.Namespace) -> int:
    if a.backend == "onnxruntime":
        from ..export.compare import ort_session

        out = a.output or str(Path(a.onnx).with_suffix(".ort.onnx"))
        ort_session(a.onnx, optimize=True, threads=a.threads, optimized_model_path=out)
        import onnx

        from ..export.ort_graph import int8_conv_fraction

        n_int8, n_conv = int8_conv_fraction(onnx.load(out))  # the optimized graph the user asked to keep
        print(f"ONNX Runtime optimized graph (CPU provider, ORT_ENABLE_ALL) -> {out}"
              + (f"; {n_int8}/{n_conv} Conv layers as INT8 kernels" if n_conv else ""))
        return 0
    from ..engine import build_engine

    shapes = {}
    for flag in ("min", "opt", "max"):
        val = getattr(a, f"{flag}_batch")
        if val:
            shapes[flag] = val
    res = build_engine(a.onnx, a.output or str(Path(a.onnx).with_suffix(".engine")),
                       strongly_typed=not a.weakly_typed, precision_flags=_csv(a.precision) or (),
                       workspace_mib=a.workspace_mib, optimization_level=a.optimization_level,
                       timing_cache_path=a.timing_cache,
                       min_shapes=_batch_shapes(a.onnx, shapes.get("min")),
                       opt_shapes=_batch_shapes(a.onnx, shapes.get("opt")),
                       max_shapes=_batch_shapes(a.onnx, shapes.get("max")))
    print(f"engine -> {res.engine_path}\nmetadata -> {res.metadata_path}\nlayer report -> {res.layer_report_path}")
    return 0


def _batch_shapes(onnx_path: str, batch: Optional[int]):
    if not batch:
        return None
    import onnx

    m = onnx.load(onnx_path, load_external_data=False)
    out = {}
    for i in m.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in i.type.tensor_type.shape.dim]
        dims[0] = batch
        out[i.name] = tuple(dims)
    return out


def cmd_bench(a: argparse.Namespace) -> int:
    from ..bench import benchmark

    model: Any = a.model
    shape = _ints(a.input_shape) if a.input_shape else None
    if a.backend == "torch":
        from . import checkpoint

        model, info = checkpoint.load(a.model)
        shape = shape or info.get("input_shape")
    res = benchmark(a.backend, model, input_shape=tuple(shape) if shape else None, batch_sizes=a.batch_sizes,
                    warmup_s=a.warmup, duration_s=a.duration, min_iterations=a.iterations, device=a.device,
                    intra_op_threads=a.threads, cuda_graph=a.cuda_graph)
    print(res.to_markdown())
    if a.json:
        res.to_json(a.json)
        print(f"wrote {a.json}")
    if a.plot:
        res.plot(a.plot)
        print(f"wrote {a.plot}")
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    import torch

    from ..export.compare import compare
    from . import checkpoint

    model, info = checkpoint.load(a.checkpoint)
    shape = info.get("input_shape") or _parse_shape(a.input_shape)
    if a.size:
        shape = [shape[0], a.size, a.size]
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(a.batch_size, *shape, generator=g) for _ in range(a.num_batches)]
    res = compare(model, a.onnx, batches, optimize=a.optimize, teacher_forced=a.teacher_forced,
                  input_noise=None if a.no_noise_floor else 1e-6)
    print(res.format_table())
    _emit_json(res.to_dict(), a.json)
    return 0


def cmd_debug(a: argparse.Namespace) -> int:
    from ..debug import debug
    from . import checkpoint

    model, info = checkpoint.load(a.checkpoint)
    shape = info.get("input_shape") or _parse_shape(a.input_shape)
    if a.size:
        shape = [shape[0], a.size, a.size]
    data = _calibration_batches(a.data, shape, a.batch_size, a.num_batches)
    report = debug(model, data, onnx_path=a.onnx, num_batches=a.num_batches, runtime=a.runtime, top_k=a.top_k,
                   progress=not a.quiet)
    print(report.format_table())
    _emit_json(report.to_dict(), a.json)
    if a.plot:
        report.plot(a.plot)
        print(f"wrote {a.plot}")
    return 1 if report.first_divergence or report.first_divergence_tensorrt else 0


def cmd_demo(a: argparse.Namespace) -> int:
    from ..demo import run_demo

    return run_demo(quick=a.quick, workdir=a.workdir)


def cmd_serve(a: argparse.Namespace) -> int:
    from ..service import serve
    from ..service.__main__ import limits_from_args

    from ..service.__main__ import scale_out_from_args

    serve(host=a.host, port=a.port, db_path=a.db, workdir=a.workdir, workers=a.workers,
          max_upload_mb=a.max_upload_mb, token_env=a.token_env, backend=None if a.backend == "auto" else a.backend,
          limits={**limits_from_args(a), **scale_out_from_args(a)}, log_format=a.log_format)
    return 0


def cmd_worker(a: argparse.Namespace) -> int:
    from ..service.worker import resolve_worker_args, run_worker

    return run_worker(resolve_worker_args(a))


# ---- parser --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trtquant", description="PyTorch -> INT8 TensorRT: quantize, calibrate, export Q/DQ ONNX, check, build, bench.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log INFO messages")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("quantize", help="swap a model's layers for quantized ones (TensorRT placement)")
    s.add_argument("--model", required=True, help="recipe name (resnet18, resnet50, mobilenet_v2, inception_v3) or module:function")
    s.add_argument("--weights", help="float state-dict file (default: cached torchvision weights, else random init)")
    s.add_argument("--include", help="comma-separated module-name globs to quantize (default: all)")
    s.add_argument("--exclude", help="comma-separated module-name globs to keep in float")
    s.add_argument("--report", action="store_true", help="print every quantizer and the rule that placed it")
    s.add_argument("-o", "--output", required=True, help="checkpoint to write (.pt)")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("calibrate", help="collect statistics and set amax (entropy, mse, percentile, max)")
    s.add_argument("checkpoint")
    s.add_argument("--data", default="random", help="'random' (structure/speed only), or a .npy/.pt tensor of inputs")
    s.add_argument("--num-batches", type=int, default=4)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--size", type=int, help="override image height/width")
    s.add_argument("--input-shape", help="C,H,W for module:function models")
    s.add_argument("--method", default="entropy", choices=["entropy", "mse", "percentile", "max"])
    s.add_argument("--percentile", type=float, default=99.99)
    s.add_argument("--cache", default="calib_cache/latest.safetensors", help="where to cache statistics ('none' to skip)")
    s.add_argument("--from-cache", help="recompute amax from a statistics cache instead of running data")
    s.add_argument("--adaround", action="store_true",
                   help="then learn each layer's weight rounding on the same data (trtquant.ptq.adaround)")
    s.add_argument("--adaround-budget", type=float, default=600.0, help="AdaRound time budget in seconds")
    s.add_argument("--bias-correction", nargs="?", const="weight", choices=["weight", "accumulated"],
                   help="then correct biases (trtquant.ptq.bias_correction; default: the weight-error correction)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("export", help="write Q/DQ ONNX (TensorRT graph, or the ONNX Runtime INT8 graph)")
    s.add_argument("checkpoint")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--target", default="tensorrt", choices=["tensorrt", "onnxruntime"])
    s.add_argument("--opset", type=int, default=17)
    s.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    s.add_argument("--exporter", default="dynamo", choices=["dynamo", "legacy"])
    s.add_argument("--weights", default="qdq", choices=["qdq", "dq_only"])
    s.add_argument("--static-batch", action="store_true")
    s.add_argument("--batch-size", type=int, default=1)
    s.add_argument("--size", type=int)
    s.add_argument("--input-shape")
    s.add_argument("--no-check", dest="check", action="store_false", help="skip the validator after export")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("check", help="validate a Q/DQ ONNX against TensorRT's rules (exit 1 on errors)")
    s.add_argument("onnx")
    s.add_argument("--target", default="trt10", choices=["trt10", "trt11", "dla"])
    s.add_argument("--strongly-typed", action=argparse.BooleanOptionalAction, default=None)
    s.add_argument("--json", help="also write the findings as JSON")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("build", help="build a TensorRT engine (or ONNX Runtime's optimized graph)")
    s.add_argument("onnx")
    s.add_argument("-o", "--output")
    s.add_argument("--backend", default="tensorrt", choices=["tensorrt", "onnxruntime"])
    s.add_argument("--weakly-typed", action="store_true", help="TensorRT 8.6-10.x weak typing with --precision flags")
    s.add_argument("--precision", help="weakly typed flags: int8,fp16,bf16")
    s.add_argument("--min-batch", type=int)
    s.add_argument("--opt-batch", type=int)
    s.add_argument("--max-batch", type=int)
    s.add_argument("--workspace-mib", type=int)
    s.add_argument("--optimization-level", type=int, default=3)
    s.add_argument("--timing-cache")
    s.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    s.set_defaults(func=cmd_build)

    s = sub.add_parser("bench", help="latency/throughput with trtexec statistics")
    s.add_argument("model", help="engine (tensorrt), .onnx (onnxruntime) or a trtquant checkpoint (torch)")
    s.add_argument("--backend", default="onnxruntime", choices=["tensorrt", "onnxruntime", "torch"])
    s.add_argument("--batch-sizes", type=_ints, default=[1])
    s.add_argument("--input-shape", help="C,H,W when the model does not say")
    s.add_argument("--warmup", type=float, default=0.2)
    s.add_argument("--duration", type=float, default=3.0)
    s.add_argument("--iterations", type=int, default=10)
    s.add_argument("--threads", type=int)
    s.add_argument("--device")
    s.add_argument("--cuda-graph", action="store_true")
    s.add_argument("--json")
    s.add_argument("--plot", help="PNG of latency and throughput vs batch size")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("compare", help="ONNX Runtime vs the PyTorch fake-quant model")
    s.add_argument("checkpoint")
    s.add_argument("onnx")
    s.add_argument("--num-batches", type=int, default=4)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--size", type=int)
    s.add_argument("--input-shape")
    s.add_argument("--optimize", action="store_true", help="let ORT fuse INT8 kernels (default: Q/DQ run literally)")
    s.add_argument("--teacher-forced", action="store_true",
                   help="also check every activation QuantizeLinear on ONNX Runtime's own input (first batch)")
    s.add_argument("--no-noise-floor", action="store_true",
                   help="skip the chaos floor (PyTorch vs itself under 1e-6 relative input noise)")
    s.add_argument("--json")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("debug", help="per-layer quantization error (SQNR) and the first layer where the runtime "
                                     "diverges (exit 1 when one does)")
    s.add_argument("checkpoint")
    s.add_argument("onnx", nargs="?", help="the graph exported from the checkpoint: also check ONNX Runtime's codes")
    s.add_argument("--data", default="random", help="'random' (structure only), or a .npy/.pt tensor of inputs")
    s.add_argument("--num-batches", type=int, default=2)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--size", type=int, help="override image height/width")
    s.add_argument("--input-shape", help="C,H,W for module:function models")
    s.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                   help="tensorrt: also run the graph in TensorRT through Polygraphy (when installed)")
    s.add_argument("--top-k", type=int, default=5, help="how many worst layers to name")
    s.add_argument("--json", help="also write the report as JSON")
    s.add_argument("--plot", help="PNG of SQNR per layer")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_debug)

    s = sub.add_parser("demo", help="one model end to end: FP32 vs INT8 accuracy and latency")
    s.add_argument("--quick", action="store_true")
    s.add_argument("--workdir", default="runs/demo")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("serve", help="engine-build HTTP service")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--db", default=None, help="SQLite job database (default: <workdir>/jobs.db)")
    s.add_argument("--workdir", default="trtquant-service")
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--max-upload-mb", type=int, default=512)
    s.add_argument("--token-env", default="TRTQUANT_SERVICE_TOKEN",
                   help="environment variable holding the bearer token (auth off when unset)")
    s.add_argument("--backend", default="auto", choices=["auto", "tensorrt", "onnxruntime"])
    from ..service.__main__ import add_limit_arguments, add_scale_out_arguments

    add_limit_arguments(s)
    add_scale_out_arguments(s)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("worker", help="scale-out build worker (one per GPU; consumes its GPU kind's queue)")
    from ..service.worker import add_worker_arguments

    add_worker_arguments(s)
    s.set_defaults(func=cmd_worker)
    return p


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: Optional[str] = None) -> None:
    """Warnings as one readable line (category and message, which says what to do), no source line."""
    print(f"warning ({category.__name__}): {message}", file=file or sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    shown, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        return _run(a)
    finally:
        warnings.showwarning = shown


def _run(a: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from ..errors import TensorRTNotAvailableError, TrtQuantError

    try:
        return int(a.func(a) or 0)
    except TensorRTNotAvailableError as e:
        print(f"trtquant {a.command}: {e}", file=sys.stderr)
        return 2
    except (TrtQuantError, ValueError, FileNotFoundError) as e:
        print(f"trtquant {a.command}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, (FileNotFoundError, ValueError)) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
