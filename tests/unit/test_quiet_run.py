"""A quiet first run: our packaging raises no deprecation, library log lines and warning source lines stay out."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_license_is_an_spdx_string() -> None:
    # setuptools >= 77 deprecates the `license = {text = ...}` table (a warning on every install).
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(meta["project"]["license"], str)
    assert any(r.startswith("setuptools>=") and int(r.split(">=")[1].split(".")[0]) >= 77
               for r in meta["build-system"]["requires"])


def test_compiler_import_does_not_log_cuda_home(tmp_path: Path) -> None:
    code = ("import logging, sys; logging.basicConfig(stream=sys.stderr, level=logging.WARNING)\n"
            "from trtquant.functional import _import_compiler_quietly\n"
            "_import_compiler_quietly(); import torch.utils.cpp_extension as c; print('ok', c.__name__)")
    env = dict(os.environ, CUDA_HOME=str(tmp_path))  # an existing CUDA_HOME without a GPU: torch logs it
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "No CUDA runtime" not in proc.stderr, proc.stderr
    # The control: importing it directly does log (on a machine without a GPU), so the test above can fail.
    import torch

    if torch.cuda.is_available():
        return
    raw = subprocess.run([sys.executable, "-c", "import logging, sys; logging.basicConfig(stream=sys.stderr);"
                          "import torch.utils.cpp_extension"], capture_output=True, text=True, env=env, timeout=120)
    assert "No CUDA runtime" in raw.stderr, raw.stderr


def test_cli_shows_a_warning_as_one_line(capsys) -> None:
    from trtquant.bench import UnstableLatencyWarning
    from trtquant.cli.main import _show_warning

    _show_warning(UnstableLatencyWarning("batch 1: latency is unstable: stop other load"), UnstableLatencyWarning,
                  "/x/demo.py", 36, line="res = benchmark(...)")
    err = capsys.readouterr().err
    assert err == "warning (UnstableLatencyWarning): batch 1: latency is unstable: stop other load\n"


def test_cli_main_restores_the_warning_hook(tmp_path: Path) -> None:
    from trtquant.cli.main import main

    before = warnings.showwarning
    assert main(["check", str(tmp_path / "missing.onnx")]) == 2
    assert warnings.showwarning is before
