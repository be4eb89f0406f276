"""The torchvision zoo sweep: every classification, segmentation, video and detection model through
trtquant's TensorRT path and its ONNX Runtime INT8 target, one row per model.

Per model (random init, BatchNorm statistics re-estimated on the calibration images so the network
is well conditioned; each model in its own process, so one crash or out-of-memory is one row):

* quantize (placement 'trt') -> calibrate (percentile, 2 batches) -> export the TensorRT Q/DQ graph
  -> ``check_onnx``: quantizers placed, checker errors and warnings by rule id;
* teacher-forced parity: every activation QuantizeLinear's float input from ONNX Runtime re-quantized
  in PyTorch (share of INT8 codes that differ, largest difference);
* end to end: ONNX Runtime vs the fake-quant model (cosine, worst output leaf) beside the chaos floor
  (the fake-quant model's own change under 1e-6 relative noise on its input and on every activation
  quantizer's input - what another runtime's summation order does at every layer);
* the ONNX Runtime target (``target='onnxruntime'``): loads, cosine against its flavour, share of Conv
  layers run as INT8 kernels (per-channel weights, and per-tensor weights with BatchNorm folded);
* ONNX Runtime INT8 vs FP32 latency (2 threads, batch 8, interleaved rounds), and the seconds taken.

    python bench/zoo.py                                  # everything, 224x224 (hours on 2 cores)
    python bench/zoo.py --families classification --size 128 --models resnet18,efficientnet_b0
    python bench/zoo.py --table-only                     # re-print the table from the JSON

Writes ``results/zoo.json`` (one row per model, rewritten after each model) and ``results/zoo.md``.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

FAMILIES = ("classification", "segmentation", "video", "detection")
#: Attention models: their rows also count the attention blocks check_onnx finds fusable (C27).
ATTENTION = ("vit_", "swin", "maxvit", "mvit")
VIDEO_FRAMES = 8


def list_family(family: str) -> List[str]:
    import torchvision.models as tvm

    module = {"classification": tvm, "segmentation": tvm.segmentation, "video": tvm.video,
              "detection": tvm.detection}[family]
    return sorted(tvm.list_models(module=module))


def num_params_m(name: str) -> Optional[float]:
    """Parameters (millions) from torchvision's weight metadata, without building the model."""
    import torchvision.models as tvm

    try:
        return tvm.get_model_weights(name).DEFAULT.meta["num_params"] / 1e6
    except Exception:  # no weights registered
        return None


def build(name: str, family: str) -> nn.Module:
    import torchvision.models as tvm

    kwargs: Dict[str, Any] = {"weights": None}
    if family in ("segmentation", "detection"):
        kwargs.update(weights_backbone=None, num_classes=21 if family == "segmentation" else 11)
    if family == "detection" and not name.startswith("ssd"):  # SSDs resize to their own fixed 300/320
        kwargs.update(min_size=SIZE_HOLDER["size"], max_size=SIZE_HOLDER["size"])
    if name == "inception_v3":
        kwargs.update(aux_logits=False, init_weights=False)
    if name == "googlenet":
        kwargs.update(aux_logits=False, init_weights=False)
    return tvm.get_model(name, **kwargs).eval()


SIZE_HOLDER: Dict[str, int] = {"size": 224}


def images(family: str, batch: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if family == "video":
        return torch.randn(batch, 3, VIDEO_FRAMES, size, size, generator=g)
    return torch.randn(batch, 3, size, size, generator=g)


def reestimate_bn(model: nn.Module, batches: List[Any], run: Callable[[nn.Module, Any], Any]) -> None:
    """BatchNorm running statistics := averages over ``batches`` (a random-init net with mean 0 / var 1
    statistics is chaotic; with estimated ones it is well conditioned)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    model.eval()  # only the BatchNorms train (a detector in train mode wants targets; dropout stays off)
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for b in batches:
            run(model, b)
    model.eval()


def _rel_l2(ref: np.ndarray, out: np.ndarray) -> float:
    r, o = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    d = np.linalg.norm(r)
    return float(np.linalg.norm(o - r) / d) if d > 0 else float(np.linalg.norm(o - r))


def _cos(ref: np.ndarray, out: np.ndarray) -> float:
    r, o = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    d = np.linalg.norm(r) * np.linalg.norm(o)
    return float(r @ o / d) if d > 0 else 1.0


def _leaves(out: Any) -> List[np.ndarray]:
    try:
        from trtquant.outputs import flatten_outputs

        return [t.detach().float().cpu().numpy() for _, t in flatten_outputs(out)]
    except ImportError:  # before the shared flattening utility exists
        if isinstance(out, torch.Tensor):
            return [out.detach().float().numpy()]
        if isinstance(out, dict):
            return [v.detach().float().numpy() for v in out.values()]
        return [t.detach().float().numpy() for t in out]


def _ort_run(path: Path, x: torch.Tensor, optimize: bool = False) -> List[np.ndarray]:
    from trtquant.export.compare import ort_session

    sess = ort_session(path, optimize=optimize, threads=2)
    return [np.asarray(v) for v in sess.run(None, {sess.get_inputs()[0].name: x.numpy()})]


def _worst(ref: List[np.ndarray], got: List[np.ndarray]) -> Dict[str, float]:
    cos = [_cos(r, o) for r, o in zip(ref, got)]
    rel = [_rel_l2(r, o) for r, o in zip(ref, got)]
    return {"cosine": min(cos), "rel_l2": max(rel)}


def chaos_floor(model: nn.Module, x: torch.Tensor, ref: List[np.ndarray], rel: float = 1e-6) -> Dict[str, float]:
    """How far the fake-quant model moves under ``rel`` relative noise on its input and on every activation
    quantizer's input (:func:`trtquant.export.parity.layer_noise`): the floor for an end-to-end comparison
    with another runtime, whose convolutions sum in another order at every layer."""
    from trtquant.export.parity import layer_noise, with_relative_noise

    with torch.no_grad(), layer_noise(model, rel, seed=9):
        noisy = _leaves(model(with_relative_noise(x, rel, seed=9)))
    return _worst(ref, noisy)


def _export_fp32(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            buf = io.BytesIO()
            torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["input"],
                              dynamic_axes={"input": {0: "batch"}})
            path.write_bytes(buf.getvalue())
        except Exception:  # as for the INT8 graph: dynamo where TorchScript cannot
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["input"],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))


def _latency_ms(path: Path, x: torch.Tensor, rounds: int, reps: int) -> float:
    from trtquant.export.compare import ort_session

    sess = ort_session(path, optimize=True, threads=2)
    feed = {sess.get_inputs()[0].name: x.numpy()}
    sess.run(None, feed)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            sess.run(None, feed)
        times.append((time.perf_counter() - t) / reps)
    return 1000 * float(np.median(times))


def _speedup(fp32: Path, int8: Path, x: torch.Tensor) -> Dict[str, float]:
    """Interleaved rounds (a slow phase of a shared machine hits both graphs alike)."""
    a, b = [], []
    for _ in range(3):
        a.append(_latency_ms(fp32, x, 1, 3))
        b.append(_latency_ms(int8, x, 1, 3))
    fp, q = float(np.median(a)), float(np.median(b))
    return {"fp32_ms": fp, "int8_ms": q, "speedup": fp / q}


def _tf_row(report: Any) -> Dict[str, Any]:
    """Teacher-forced code agreement: codes compared, off by one, off by more, the worst nodes."""
    return {"codes": report.codes, "off_by_one": report.off_by_one,
            "off_by_more": sum(n.mismatched - n.off_by_one for n in report.nodes),
            "flagged": [f"{n.node} ({100 * n.share:.3f} %, max {n.max_diff})" for n in report.flagged()][:5]}


def one_model(name: str, family: str, size: int, workdir: Path, speed: bool, per_tensor: bool) -> Dict[str, Any]:
    """Every measurement of one model (exceptions are caught per stage and reported in the row)."""
    import trtquant
    from trtquant.export import check_onnx, export_onnx
    from trtquant.export.ort_graph import int8_conv_fraction
    from trtquant.export.compare import optimized_graph

    torch.manual_seed(0)
    torch.set_num_threads(2)
    row: Dict[str, Any] = {"model": name, "family": family, "size": size}
    if family == "video":
        row["frames"] = VIDEO_FRAMES
    t0 = time.perf_counter()
    SIZE_HOLDER["size"] = size
    model = build(name, family)
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    core = model

    def run(m: nn.Module, b: Any) -> Any:
        return m(list(b)) if family == "detection" else m(b)

    calib = [images(family, 2, size, seed=s) for s in (1, 2)]
    # BN statistics from more images than calibration needs: a better-conditioned random-init net.
    reestimate_bn(model, calib + [images(family, 2, size, seed=s) for s in range(10, 16)], run)
    fp = copy.deepcopy(model)
    stage = "quantize"
    try:
        trtquant.quantize(model)
        from trtquant.placement.fx_pass import placement_report

        rep = placement_report(model)
        qs = rep["quantizers"]
        row["quantizers"] = sum(1 for q in qs if q["enabled"])  # type: ignore[union-attr]
        subtrees = rep.get("placed_subtrees") or []
        row["placement"] = "traced" if rep["traced"] else (
            f"{len(subtrees)} traceable submodules placed ({rep['reason']})" if subtrees else f"skipped: {rep['reason']}")
        stage = "calibrate"
        trtquant.calibrate(model, [list(b) if family == "detection" else b for b in calib], method="percentile",
                           progress=False)
        if family == "detection":
            from trtquant.export.detection import detection_core

            core, fp = detection_core(model), detection_core(fp)
        x = images(family, 2, size, seed=3)
        stage = "export"
        trt_path = workdir / f"{name}_trt.onnx"
        try:
            exporter = "legacy"  # the faster exporter; dynamo where TorchScript cannot (AlexNet's 6x6
            export_onnx(core, x, trt_path, exporter=exporter)  # adaptive pool from a 2x2 map)
        except Exception as e:
            row["note"] = f"legacy exporter failed ({str(e).splitlines()[0][:120]}); dynamo exporter used"
            exporter = "dynamo"
            export_onnx(core, x, trt_path, exporter=exporter)
        stage = "check"
        report = check_onnx(str(trt_path))
        by_rule: Dict[str, int] = {}
        for f in report.findings:
            if f.severity in ("error", "warning"):
                key = f"{f.severity[0].upper()}:{f.rule}"
                by_rule[key] = by_rule.get(key, 0) + 1
        row["checker_errors"] = len(report.errors)
        row["checker_warnings"] = len(report.warnings)
        row["checker_by_rule"] = by_rule
        row["attention_fusable"] = sum(f.rule == "C27-attention-fusable" for f in report.findings)
        stage = "teacher-forced parity"
        try:
            from trtquant.export.parity import teacher_forced
        except ImportError:
            teacher_forced = None
        if teacher_forced is not None:
            row["teacher_forced"] = _tf_row(teacher_forced(core, trt_path, x))
        stage = "end to end"
        with torch.no_grad():
            ref = _leaves(core(x))
        row["e2e"] = _worst(ref, _ort_run(trt_path, x))
        row["chaos_floor"] = chaos_floor(core, x, ref)
        stage = "onnxruntime target"
        ort_path = workdir / f"{name}_ort.onnx"
        export_onnx(core, x, ort_path, target="onnxruntime", exporter=exporter)
        from trtquant.export.ort_flavor import ort_flavor_

        flavour = ort_flavor_(copy.deepcopy(core))
        with torch.no_grad():
            fref = _leaves(flavour(x))
        row["ort_valid"] = True
        row["ort_cosine"] = _worst(fref, _ort_run(ort_path, x))["cosine"]
        row["ort_cosine_optimized"] = _worst(fref, _ort_run(ort_path, x, optimize=True))["cosine"]
        row["ort_chaos_floor"] = chaos_floor(flavour, x, fref)["cosine"]
        n8, nc = int8_conv_fraction(optimized_graph(ort_path))
        row["int8_convs"] = [n8, nc]
        if teacher_forced is not None:
            row["ort_teacher_forced"] = _tf_row(teacher_forced(core, ort_path, x))
        if per_tensor:
            stage = "per-tensor weights"
            from trtquant.config import QuantConfig
            from trtquant.descriptor import QuantDescriptor

            pt = copy.deepcopy(fp if family != "detection" else build(name, family))
            trtquant.quantize(pt, QuantConfig(weight=QuantDescriptor(num_bits=8, axis=None)))
            trtquant.calibrate(pt, calib[:1] if family != "detection" else [list(calib[0])], method="max",
                               progress=False)
            if family == "detection":
                from trtquant.export.detection import detection_core

                pt = detection_core(pt)
            pt_path = workdir / f"{name}_ort_pt.onnx"
            export_onnx(pt, x, pt_path, target="onnxruntime", exporter=exporter)
            n8, nc = int8_conv_fraction(optimized_graph(pt_path))
            row["int8_convs_per_tensor"] = [n8, nc]
        if speed:
            stage = "speed"
            fp32_path = workdir / f"{name}_fp32.onnx"
            _export_fp32(fp, x, fp32_path)
            row["ort_speed"] = _speedup(fp32_path, ort_path, images(family, 8, size, seed=4))
        stage = "done"
    except Exception as e:  # the row says where and why
        row["failed_at"] = stage
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        row["traceback"] = traceback.format_exc()[-2000:]
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _ort_cos(row: Dict[str, Any]) -> str:
    if "ort_cosine" not in row:
        return "-"
    worst = min(row["ort_cosine"], row["ort_cosine_optimized"])
    floor = row.get("ort_chaos_floor")
    return f"{worst:.5f}" + ("" if floor is None else f" (floor {floor:.5f})")


def _fmt(row: Dict[str, Any]) -> str:
    def pct(v: Optional[List[int]]) -> str:
        return "-" if not v else f"{v[0]}/{v[1]} ({100 * v[0] / max(v[1], 1):.0f} %)"

    def tf_s(tf: Optional[Dict[str, Any]]) -> str:
        return "-" if not tf else f"{100 * tf['off_by_one'] / max(tf['codes'], 1):.4f} % / {tf['off_by_more']}"

    e2e, chaos = row.get("e2e"), row.get("chaos_floor")
    rules = ", ".join(f"{k} {v}" for k, v in sorted(row.get("checker_by_rule", {}).items())) or "-"
    speed = row.get("ort_speed")
    attention = f"{row['attention_fusable']} attention blocks INT8-fusable (C27)" if row.get("attention_fusable") else None
    note = "; ".join(x for x in (row.get("note"), attention, f"failed at {row['failed_at']}: {row['error']}"
                                  if row.get("failed_at") else None) if x)
    return (f"| {row['model']} | {row.get('quantizers', '-')} | {row.get('checker_errors', '-')} / "
            f"{row.get('checker_warnings', '-')} | {rules} | {tf_s(row.get('teacher_forced'))} | "
            f"{'-' if not e2e else format(e2e['cosine'], '.5f')} | {'-' if not chaos else format(chaos['cosine'], '.5f')} | "
            f"{'yes' if row.get('ort_valid') else 'no'} | {_ort_cos(row)} | {tf_s(row.get('ort_teacher_forced'))} | "
            f"{pct(row.get('int8_convs'))} | {pct(row.get('int8_convs_per_tensor'))} | "
            f"{'-' if not speed else format(speed['speedup'], '.2f') + 'x'} | {row['seconds']} | {note} |")


HEADER = ("| model | quantizers | checker E / W | findings by rule | teacher-forced codes off by 1 / by more | "
          "e2e cosine | chaos-floor cosine | ORT target valid | ORT cosine vs flavour | ORT teacher-forced off by 1 / "
          "by more | INT8 convs (per-channel) | INT8 convs (per-tensor) | ORT INT8 vs FP32 (b8) | s | note |\n"
          + "|---" * 15 + "|")


def table(rows: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    out = [f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores; input {meta['size']}x{meta['size']} "
           f"(video {VIDEO_FRAMES} frames); random init, BN re-estimated; ONNX Runtime {meta.get('onnxruntime')}, "
           f"2 threads.", ""]
    for fam in FAMILIES:
        fam_rows = [r for r in rows if r["family"] == fam]
        if fam_rows:
            out += [f"### {fam}", "", HEADER, *(_fmt(r) for r in fam_rows), ""]
    return "\n".join(out)


def main() -> None:
    global VIDEO_FRAMES
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--models", default="", help="comma-separated names (default: every model of the families)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--frames", type=int, default=VIDEO_FRAMES, help="video clip length (s3d needs >= 14 at 224)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per model")
    ap.add_argument("--max-params", type=float, default=0,
                    help="skip models with more parameters (millions, from torchvision's weight metadata); 0 = none")
    ap.add_argument("--no-speed", dest="speed", action="store_false")
    ap.add_argument("--no-per-tensor", dest="per_tensor", action="store_false")
    ap.add_argument("--out", default="results/zoo.json")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--one", nargs=2, metavar=("NAME", "FAMILY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    VIDEO_FRAMES = args.frames
    warnings.filterwarnings("ignore")
    if args.one:
        import logging

        logging.disable(logging.WARNING)
        with tempfile.TemporaryDirectory() as d:
            row = one_model(args.one[0], args.one[1], args.size, Path(d), args.speed, args.per_tensor)
        print("ZOO-ROW " + json.dumps(row))
        return
    import onnxruntime

    meta = {"machine": _common.machine(), "size": args.size, "onnxruntime": onnxruntime.__version__}
    rows: List[Dict[str, Any]] = []
    if os.path.exists(args.out):
        old = json.load(open(args.out))
        rows = old.get("rows", [])
        meta = old.get("meta", meta) if args.table_only else meta
    if not args.table_only:
        wanted = [m for m in args.models.split(",") if m]
        todo = [(n, fam) for fam in args.families.split(",") for n in list_family(fam) if not wanted or n in wanted]
        if wanted:  # in the order given (the most telling models first when time is short)
            todo.sort(key=lambda t: wanted.index(t[0]))
        for i, (name, fam) in enumerate(todo):
            print(f"[{i + 1}/{len(todo)}] {fam} {name} ...", flush=True)
            params = num_params_m(name)
            if args.max_params and params is not None and params > args.max_params:
                row = {"model": name, "family": fam, "size": args.size, "params_m": params, "seconds": 0,
                       "note": f"not run: {params:.0f} M parameters > --max-params {args.max_params:g}"}
                rows = [r for r in rows if r["model"] != name] + [row]
                continue
            t = time.perf_counter()
            cmd = [sys.executable, __file__, "--one", name, fam, "--size", str(args.size), "--frames", str(args.frames)]
            cmd += [] if args.speed else ["--no-speed"]
            cmd += [] if args.per_tensor else ["--no-per-tensor"]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ZOO-ROW ")), None)
                row = json.loads(line[8:]) if line else {
                    "model": name, "family": fam, "size": args.size, "failed_at": "process",
                    "error": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['no output'])[-1][:300]}",
                    "seconds": round(time.perf_counter() - t, 1)}
            except subprocess.TimeoutExpired:
                row = {"model": name, "family": fam, "size": args.size, "failed_at": "timeout",
                       "error": f"over {args.timeout} s", "seconds": args.timeout}
            rows = [r for r in rows if r["model"] != name] + [row]
            _common.dump(args.out, {"meta": meta, "rows": rows})
            print("  " + _fmt(row), flush=True)
    md = table(sorted(rows, key=lambda r: (FAMILIES.index(r["family"]), r["model"])), meta)
    Path(args.out).with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
