"""mypy checks trtquant/engine against the TensorRT API described by `tensorrt-stubs`.

The stub wheel (10.13.0.35) cannot be used by mypy as installed: no py.typed marker, and
`tensorrt_bindings/tensorrt.pyi` does not parse (parameters named `in`; a parameter
without default after defaulted ones). :func:`prepare_trt_stubs` writes a copy with only
those syntax fixes (`in` -> `in_`, `= ...` defaults), keeping every name and signature,
to build/trt-stubs, which mypy.ini puts on the search path.

Run as a script to prepare the stubs and run mypy (what `make typecheck` needs):
    .venv/bin/python tests/unit/test_engine_typecheck.py
"""

from __future__ import annotations

import ast
import importlib.util
import keyword
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STUB_DIR = ROOT / "build" / "trt-stubs"
STUB_PACKAGES = ("tensorrt", "tensorrt_bindings")

_KEYWORDS = "|".join(k for k in keyword.kwlist if k.islower())
_KEYWORD_PARAM = re.compile(rf"(?<=[(,])(\s*)({_KEYWORDS})(?=\s*:)")
_DEF = re.compile(r"^(\s*def \w+\()(.*)(\)\s*(?:->.*)?:\s*)$")


def _installed_stub_dir(package: str) -> Path | None:
    """The folder of an installed stub package, without importing it (no runtime exists)."""
    for entry in sys.path:
        candidate = Path(entry) / package
        if (candidate / "__init__.pyi").is_file():
            return candidate
    return None


def _split_top_level(params: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in params:
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _fix_def_line(line: str) -> str:
    line = _KEYWORD_PARAM.sub(lambda m: f"{m.group(1)}{m.group(2)}_", line)
    match = _DEF.match(line)
    if match is None:
        return line
    seen_default = False
    params = []
    for param in _split_top_level(match.group(2)):
        text = param.strip()
        if "=" in text:
            seen_default = True
        elif seen_default and text and not text.startswith("*") and text != "/":
            param = f"{param} = ..."
        params.append(param)
    return match.group(1) + ",".join(params) + match.group(3)


def prepare_trt_stubs(out_dir: Path = STUB_DIR) -> Path:
    """Write syntax-fixed copies of the installed tensorrt-stubs .pyi files under ``out_dir``."""
    for package in STUB_PACKAGES:
        source = _installed_stub_dir(package)
        if source is None:
            raise FileNotFoundError(f"stub package {package!r} not found; pip install --no-deps tensorrt-stubs")
        target = out_dir / package
        target.mkdir(parents=True, exist_ok=True)
        for pyi in sorted(source.glob("*.pyi")):
            lines = pyi.read_text(encoding="utf-8").split("\n")
            text = "\n".join(_fix_def_line(line) if line.lstrip().startswith("def ") else line for line in lines)
            ast.parse(text, filename=str(pyi))  # the fixed copy must parse
            (target / pyi.name).write_text(text, encoding="utf-8")
    return out_dir


def run_mypy(stub_dir: Path = STUB_DIR) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MYPYPATH": str(stub_dir)}
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "mypy.ini"), "trtquant/engine"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_fix_def_line_keeps_signatures() -> None:
    assert _fix_def_line("    def f(self, in: list[int], out: list[int]) -> int:") == (
        "    def f(self, in_: list[int], out: list[int]) -> int:"
    )
    assert _fix_def_line("    def g(self, a: int = None, b: int) -> None:") == (
        "    def g(self, a: int = None, b: int = ...) -> None:"
    )
    untouched = "    def h(self, x: dict[str, int], *args, **kwargs) -> None:"
    assert _fix_def_line(untouched) == untouched


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed (pip install mypy)")
@pytest.mark.skipif(
    _installed_stub_dir("tensorrt_bindings") is None,
    reason="tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs)",
)
def test_engine_package_typechecks_against_tensorrt_stubs(tmp_path: Path) -> None:
    stub_dir = prepare_trt_stubs(tmp_path / "trt-stubs")
    result = run_mypy(stub_dir)
    assert result.returncode == 0, f"mypy failed:\n{result.stdout}\n{result.stderr}"
    assert "Success" in result.stdout


if __name__ == "__main__":
    prepare_trt_stubs()
    completed = run_mypy()
    sys.stdout.write(completed.stdout)
    sys.stderr.write(completed.stderr)
    sys.exit(completed.returncode)
