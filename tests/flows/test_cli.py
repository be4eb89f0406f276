"""The trtquant CLI end to end on ResNet-18 with the ONNX Runtime backend, and missing TensorRT."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


STDERR: list = []  # every run's stderr: the quiet-output checks read it


def run(*args: str, cwd: Path, env=None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "trtquant.cli.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    STDERR.append(proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"trtquant {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_cli_resnet18_onnxruntime_flow(tmp_path: Path) -> None:
    STDERR.clear()
    run("quantize", "--model", "resnet18", "-o", "q.pt", cwd=tmp_path)
    out = run("calibrate", "q.pt", "--data", "random", "--num-batches", "2", "--batch-size", "2", "--size", "64",
              "--method", "percentile", "--quiet", "--cache", "calib.safetensors", "-o", "q_cal.pt", cwd=tmp_path)
    assert "calibrated (percentile)" in out.stdout
    # Another method from the cached histograms, no data.
    out = run("calibrate", "q.pt", "--from-cache", "calib.safetensors", "--method", "mse", "-o", "q_mse.pt", cwd=tmp_path)
    assert "no data run" in out.stdout
    # Bias correction after calibration adds biases to ResNet's bias-free convs: the checkpoint must reload.
    out = run("calibrate", "q.pt", "--from-cache", "calib.safetensors", "--method", "percentile", "--bias-correction",
              "--data", "random", "--num-batches", "2", "--batch-size", "2", "--size", "64", "-o", "q_bc.pt",
              cwd=tmp_path)
    assert re.search(r"bias_correction \(weight\): 21 layer\(s\)", out.stdout), out.stdout
    out = run("export", "q_bc.pt", "-o", "r18_bc.onnx", "--size", "64", "--exporter", "legacy", cwd=tmp_path)
    assert "0 error(s)" in out.stdout
    out = run("export", "q_cal.pt", "-o", "r18.onnx", "--size", "64", "--exporter", "legacy", cwd=tmp_path)
    assert "0 error(s)" in out.stdout and "TensorRT fuses" in out.stdout
    out = run("check", "r18.onnx", "--json", "check.json", cwd=tmp_path)
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["ok"] and report["fusion_ok"] and report["counts"]["error"] == 0
    assert report["stats"]["weighted_ops_quantized"] == report["stats"]["weighted_ops"] == 21
    run("export", "q_cal.pt", "-o", "r18_ort.onnx", "--size", "64", "--exporter", "legacy", "--target", "onnxruntime",
        cwd=tmp_path)
    out = run("build", "r18_ort.onnx", "--backend", "onnxruntime", "-o", "r18_ort.opt.onnx", cwd=tmp_path)
    assert (tmp_path / "r18_ort.opt.onnx").is_file() and "20/20 Conv layers as INT8 kernels" in out.stdout
    out = run("bench", "r18_ort.onnx", "--backend", "onnxruntime", "--batch-sizes", "1,2", "--input-shape", "3,64,64",
              "--duration", "0.2", "--warmup", "0.05", "--iterations", "3", "--json", "bench.json", cwd=tmp_path)
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert "median" in out.stdout or "|" in out.stdout
    assert bench["schema_version"] == 1 and len(bench["results"]) == 2
    out = run("compare", "q_cal.pt", "r18.onnx", "--size", "64", "--num-batches", "1", "--batch-size", "4",
              "--json", "cmp.json", cwd=tmp_path)
    cmp = json.loads((tmp_path / "cmp.json").read_text())
    assert cmp["outputs"][0]["cosine"] > 0.99
    assert cmp["int8_conv_fraction"] == 0.0  # the TensorRT graph: ONNX Runtime runs it in float
    out = run("compare", "q_cal.pt", "r18_ort.onnx", "--size", "64", "--num-batches", "1", "--batch-size", "4",
              "--json", "cmp_ort.json", cwd=tmp_path)
    cmp = json.loads((tmp_path / "cmp_ort.json").read_text())
    assert cmp["int8_conv_fraction"] == 1.0 and "20/20" in out.stdout and "ONNX Runtime flavour" in out.stdout
    assert cmp["outputs"][0]["cosine"] > 0.999
    # A quiet run: no raw library log lines, warnings as one line without the source line under them.
    err = "".join(STDERR)
    assert "No CUDA runtime" not in err, err
    assert not re.search(r"\.py:\d+: \w*Warning", err), err


def test_cli_build_without_tensorrt_exits_2(tmp_path: Path) -> None:
    fake = tmp_path / "shadow"
    fake.mkdir()
    (fake / "tensorrt.py").write_text("raise ImportError('No module named tensorrt (simulated)')\n")
    (tmp_path / "m.onnx").write_bytes(b"not used")
    env = dict(os.environ, PYTHONPATH=str(fake) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = run("build", "m.onnx", "-o", "m.engine", cwd=tmp_path, env=env, check=False)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "tensorrt-cu12" in out.stderr and "nvcr.io/nvidia/tensorrt" in out.stderr


def test_cli_help_reads_well() -> None:
    proc = subprocess.run([sys.executable, "-m", "trtquant.cli.main", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for cmd in ("quantize", "calibrate", "export", "check", "build", "bench", "compare", "demo", "serve"):
        assert cmd in proc.stdout
