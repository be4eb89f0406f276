"""Run pytorch-quantization's own unit tests against trtquant, on the CPU.

Why: trtquant promises to be a drop-in successor of pytorch-quantization 2.1; the honest measure is
that package's own test suite with only the import root changed. This script copies the test folder
of a pytorch-quantization checkout to OUT (never into this repository), rewrites
``pytorch_quantization`` to ``trtquant`` and CUDA placement to the CPU, runs pytest per file and
prints passed/failed per file and in total.

    python tools/port_pq_tests.py /path/to/TensorRT/tools/pytorch-quantization /tmp/pq_ported

The rewrite is purely textual (import root, ``.cuda()``, ``device="cuda"``, CUDA default tensor
type, ``torch.load`` onto the CPU); no test code is embedded here. Files that need data or a network (``classification_flow``),
or that check licence headers, are skipped.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

SKIP_FILES = {
    "license_test.py": "checks NVIDIA licence headers of the original sources",
    "classification_flow_test.py": "needs an ImageNet --data-dir and torchvision downloads",
}

_REWRITES: List[Tuple[str, str]] = [
    (r"\bpytorch_quantization\b", "trtquant"),
    (r"\.cuda\(\)", ""),
    (r"""device\s*=\s*(['"])cuda(:\d+)?\1""", 'device="cpu"'),
    (r"""\.to\((['"])cuda(:\d+)?\1\)""", ""),
    (r"""torch\.device\((['"])cuda(:\d+)?\1\)""", 'torch.device("cpu")'),
    (r"torch\.set_default_tensor_type\((['\"])torch\.cuda\.FloatTensor\1\)", "torch.set_default_dtype(torch.float32)"),
    (r"torch\.cuda\.amp\.autocast\(\)", 'torch.autocast("cpu", dtype=torch.bfloat16)'),
    (r"with torch\.cuda\.device\(0\):", "if True:"),
    (r"torch\.load\(([^()]*)\)", r'torch.load(\1, map_location="cpu")'),
]


def find_tests(src: Path) -> Path:
    """The tests folder of a checkout (repo root, tools/pytorch-quantization, or tests/ itself)."""
    for cand in (src, src / "tests", src / "tools" / "pytorch-quantization" / "tests"):
        if (cand / "tensor_quant_test.py").is_file():
            return cand
    raise SystemExit(f"no pytorch-quantization tests folder (with tensor_quant_test.py) under {src}")


def rewrite(text: str) -> str:
    for pattern, repl in _REWRITES:
        text = re.sub(pattern, repl, text)
    return text


def port(src: Path, out: Path) -> List[Path]:
    """Copy and rewrite the test folder into ``out/tests``; returns the test files to run."""
    tests = find_tests(src)
    dst = out / "tests"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(tests, dst)
    # model_test imports the checkout's example models (``examples.torchvision``): port them alongside.
    examples = tests.parent / "examples"
    if examples.is_dir():
        if (out / "examples").exists():
            shutil.rmtree(out / "examples")
        shutil.copytree(examples, out / "examples", ignore=shutil.ignore_patterns("*.ipynb"))
    for path in list(dst.rglob("*.py")) + list((out / "examples").rglob("*.py")):
        path.write_text(rewrite(path.read_text()))
    return sorted(p for p in dst.glob("*_test.py") if p.name not in SKIP_FILES) + sorted(dst.glob("test_*.py"))


_SUMMARY = re.compile(r"(\d+) (passed|failed|error|errors|skipped|xfailed|xpassed)")


def run_file(path: Path, python: str, timeout: int) -> Dict[str, int]:
    cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--rootdir", str(path.parent.parent),
           str(path)]
    try:
        proc = subprocess.run(cmd, cwd=path.parent.parent, capture_output=True, text=True, timeout=timeout)
        tail = proc.stdout.strip().splitlines()[-1:] or [""]
    except subprocess.TimeoutExpired:
        return {"timeout": 1}
    counts: Dict[str, int] = {}
    for n, kind in _SUMMARY.findall(tail[0]):
        counts["error" if kind.startswith("error") else kind] = int(n)
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="pytorch-quantization checkout or its tests/ folder")
    ap.add_argument("out", type=Path, help="where the ported copy goes (outside this repository)")
    ap.add_argument("--python", default=sys.executable, help="interpreter with trtquant installed")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per test file")
    ap.add_argument("--only", nargs="*", help="run only these file names")
    ap.add_argument("--json", type=Path, help="also write the per-file counts here")
    args = ap.parse_args(argv)
    if Path(__file__).resolve().parents[1] in args.out.resolve().parents:
        raise SystemExit("OUT must lie outside the trtquant repository (the copied tests are not ours)")
    files = port(args.source, args.out)
    if args.only:
        files = [f for f in files if f.name in args.only]
    total: Dict[str, int] = {}
    results = {}
    for f in files:
        counts = run_file(f, args.python, args.timeout)
        results[f.name] = counts
        for k, v in counts.items():
            total[k] = total.get(k, 0) + v
        print(f"{f.name:34s} " + " ".join(f"{k}={v}" for k, v in sorted(counts.items())), flush=True)
    for name, why in SKIP_FILES.items():
        print(f"{name:34s} skipped: {why}")
    print("TOTAL " + " ".join(f"{k}={v}" for k, v in sorted(total.items())))
    if args.json:
        args.json.write_text(json.dumps({"files": results, "total": total}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
