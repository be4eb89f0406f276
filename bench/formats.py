"""FP8 E4M3 and INT4 weight-only: pretrained MiniLM-L6 and ResNet-18, exported for TensorRT, checked exact in
ONNX Runtime (CPU). Writes results/formats.json and prints the README table.

    python bench/formats.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import _common  # noqa: E402  (bench/ is on sys.path when a script here runs)

from trtquant.accuracy.formats import minilm_format, resnet18_fp8, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="16 sentences instead of 50")
    ap.add_argument("--out", default="results/formats.json")
    args = ap.parse_args()
    runs = [("fp8", {}), ("int4", {"block_size": 128, "clip": False}), ("int4", {"block_size": 128}),
            ("int4", {"block_size": 64}), ("int4+fp8", {"block_size": 128, "patterns": ["*.intermediate.dense",
                                                                                         "*.output.dense"]})]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, kw in runs:
            t = time.perf_counter()
            r = minilm_format(fmt, Path(tmp), quick=args.quick, **kw)
            r["seconds"] = round(time.perf_counter() - t, 1)
            results.append(r)
            print(json.dumps(r))
        resnet = [resnet18_fp8(Path(tmp), size=224, batch=2, dtype=dt) for dt in ("fp16", "fp32")]
    for r in resnet:
        print(json.dumps(r))
    machine = _common.machine()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "minilm": results, "resnet18": resnet}, indent=1))
    print(summary(results, f"Machine: {machine}"))


if __name__ == "__main__":
    main()
