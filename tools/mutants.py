#!/usr/bin/env python
"""Hand-written mutants of trtquant/functional.py, each run against the tests that must catch it.

Each mutation is applied to a temporary copy of the ``trtquant`` package (the working tree is never
touched: other people run tests in it). The copy comes first on ``sys.path`` (``PYTHONPATH`` and the
current directory of the pytest process), so the tests import the mutant; the tests themselves are
the working tree's. A cell is *killed* when pytest reports a failing test (exit code 1), *survived*
when every test passes, and *error* for anything else (collection error, interrupted, no tests).

    .venv/bin/python tools/mutants.py                 # every mutation x every file
    .venv/bin/python tools/mutants.py --mutation identity --file tests/unit/test_qat.py
    .venv/bin/python tools/mutants.py --baseline      # also run the unmutated copy (must pass)
    .venv/bin/python tools/mutants.py --mutmut        # mutmut 3 ([tool.mutmut] in pyproject.toml), from a copy

Exit status: 0 when every cell is killed (and the baseline passes), 1 otherwise. With ``--mutmut``:
mutmut's score (killed/total) is printed and the exit status is mutmut's (a score is not a gate).

Mutations:
  identity  ``fake_quant`` returns its input unchanged.
  amax128   ``scale = amax / 128`` instead of ``amax / bound`` (in ``amax_to_scale``).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
TARGET = Path("trtquant/functional.py")

FILES = [
    "tests/unit/test_functional.py",
    "tests/unit/test_quantizer.py",
    "tests/unit/test_nn_modules.py",
    "tests/unit/test_qat.py",
    "tests/unit/test_states.py",
    "tests/flows/test_export_models.py",
]


def _replace(src: str, node: ast.AST, text: str) -> str:
    """``src`` with the source span of ``node`` replaced by ``text``."""
    lines = src.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    # col offsets are in UTF-8 bytes; functional.py is ASCII where mutated (checked below).
    a = starts[node.lineno - 1] + node.col_offset
    b = starts[node.end_lineno - 1] + node.end_col_offset
    assert src[a:b].isascii()
    return src[:a] + text + src[b:]


def _function(tree: ast.Module, name: str) -> ast.FunctionDef:
    found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    if len(found) != 1:
        raise SystemExit(f"mutants: {TARGET} has {len(found)} top-level functions named {name!r}; "
                         "update tools/mutants.py for the refactored code")
    return found[0]


def mutate_identity(src: str) -> str:
    """``fake_quant(x, amax, ...)`` returns ``x``: its first statement (after the docstring) becomes ``return x``."""
    fn = _function(ast.parse(src), "fake_quant")
    first_arg = fn.args.args[0].arg
    body = fn.body
    stmt = body[1] if isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
        else body[0]
    indent = " " * stmt.col_offset
    lines = src.splitlines(keepends=True)
    lines.insert(stmt.lineno - 1, f"{indent}return {first_arg}  # MUTANT identity\n")
    return "".join(lines)


def mutate_amax128(src: str) -> str:
    """In ``amax_to_scale``: the one division by ``bound`` becomes a division by 128."""
    fn = _function(ast.parse(src), "amax_to_scale")
    divs = [n for n in ast.walk(fn) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div)
            and isinstance(n.right, ast.Name) and n.right.id == "bound"]
    if len(divs) != 1:
        raise SystemExit(f"mutants: amax_to_scale has {len(divs)} divisions by 'bound' (want 1); "
                         "update tools/mutants.py for the refactored code")
    return _replace(src, divs[0].right, "128")


MUTATIONS: Dict[str, Tuple[str, Callable[[str], str]]] = {
    "identity": ("fake_quant returns its input unchanged", mutate_identity),
    "amax128": ("scale = amax/128 instead of amax/bound", mutate_amax128),
}


def make_copy(dest: Path, mutation: str | None) -> None:
    """``dest/trtquant``: the working tree's package, mutated (None: as it is)."""
    shutil.copytree(ROOT / "trtquant", dest / "trtquant",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    if mutation is not None:
        path = dest / TARGET
        src = path.read_text()
        mutated = MUTATIONS[mutation][1](src)
        assert mutated != src
        compile(mutated, str(path), "exec")
        path.write_text(mutated)


def check_import(dest: Path, env: dict) -> None:
    """The pytest process will import the copy (not the editable install of the working tree)."""
    out = subprocess.run([sys.executable, "-c", "import trtquant.functional as f; print(f.__file__)"],
                         cwd=dest, env=env, capture_output=True, text=True)
    got = out.stdout.strip()
    want = str(dest / TARGET)
    if out.returncode or os.path.realpath(got) != os.path.realpath(want):
        raise SystemExit(f"mutants: the copy is not what gets imported ({got!r}, want {want!r}):\n{out.stderr}")


def run_file(dest: Path, env: dict, test_file: str, timeout: int, extra: List[str]) -> Tuple[str, float, str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
           "-c", str(ROOT / "pyproject.toml"), str(ROOT / test_file)] + extra
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "error (timeout)", time.monotonic() - t0, ""
    dt = time.monotonic() - t0
    tail = (p.stdout + p.stderr).strip().splitlines()
    summary = tail[-1] if tail else ""
    failed = [line for line in tail if line.startswith(("FAILED", "ERROR"))]
    detail = failed[0] if failed else summary
    if p.returncode == 0:
        return "survived", dt, summary
    if p.returncode == 1:
        return "killed", dt, detail
    return f"error (rc {p.returncode})", dt, detail


def run_mutmut(max_children: int, time_limit: int) -> int:
    """mutmut 3 over [tool.mutmut]'s files, in a temporary copy of the tree; prints killed/total."""
    mutmut = Path(sys.executable).with_name("mutmut")
    if not mutmut.exists():
        raise SystemExit(f"mutants: {mutmut} not found: install the dev extra (.venv/bin/pip install mutmut)")
    with tempfile.TemporaryDirectory(prefix="trtquant-mutmut-") as tmp:
        dest = Path(tmp)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "mutants", ".pytest_cache")
        for d in ("trtquant", "models", "tests"):
            shutil.copytree(ROOT / d, dest / d, ignore=ignore)
        shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
        # The unfused reference kernels: a mutated functional.py would otherwise be compiled again by
        # torch.compile in every worker (seconds per mutant, and mutmut calls that a timeout).
        # One OpenMP/intra-op thread: mutmut forks its workers from a process that already ran torch, and
        # a forked child of a process whose OpenMP pool ran can hang (observed here: workers stuck at 0 % CPU).
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", TRTQUANT_FUSED_KERNELS="0", OMP_NUM_THREADS="1",
                   MKL_NUM_THREADS="1")
        env.pop("PYTHONPATH", None)
        t0 = time.monotonic()
        p = subprocess.Popen([str(mutmut), "run", "--max-children", str(max_children)], cwd=dest, env=env,
                             start_new_session=True)
        try:
            rc = p.wait(timeout=time_limit)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGTERM)  # mutmut and the workers it started (its own session)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            rc = 124
            print(f"mutants: mutmut stopped after {time_limit}s (--mutmut-time-limit): partial results", flush=True)
        dt = time.monotonic() - t0
        subprocess.run([str(mutmut), "export-cicd-stats"], cwd=dest, env=env, capture_output=True)
        stats_file = dest / "mutants" / "mutmut-cicd-stats.json"
        if not stats_file.exists():
            print(f"mutants: mutmut wrote no statistics (exit {rc})")
            return rc or 1
        stats = json.loads(stats_file.read_text())
        res = subprocess.run([str(mutmut), "results"], cwd=dest, env=env, capture_output=True, text=True)
        survivors = [line.strip() for line in res.stdout.splitlines() if line.strip()]
    total = stats["total"]
    killed = stats["killed"]
    print(f"\nmutmut ({dt:.0f}s): {json.dumps(stats)}")
    if survivors:
        print("not killed:\n  " + "\n  ".join(survivors[:200]))
    print(f"mutmut score: {killed}/{total} killed ({100 * killed / max(total, 1):.1f} %)")
    return rc


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mutation", action="append", choices=sorted(MUTATIONS), help="default: all")
    ap.add_argument("--file", action="append", help="test file (default: the six listed in this script)")
    ap.add_argument("--baseline", action="store_true", help="also run the unmutated copy; it must pass")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per pytest run")
    ap.add_argument("--show", action="store_true", help="print each mutated diff line and exit")
    ap.add_argument("--mutmut", action="store_true", help="run mutmut 3 ([tool.mutmut]) from a copy instead")
    ap.add_argument("--max-children", type=int, default=2, help="mutmut workers (default 2)")
    ap.add_argument("--mutmut-time-limit", type=int, default=3 * 3600, help="seconds before mutmut is stopped")
    args, extra = ap.parse_known_args(argv)
    if args.mutmut:
        return run_mutmut(args.max_children, args.mutmut_time_limit)
    mutations = args.mutation or list(MUTATIONS)
    files = args.file or FILES

    if args.show:
        src = (ROOT / TARGET).read_text()
        for m in mutations:
            new = MUTATIONS[m][1](src)
            diff = [f"  {b.strip()}" for b in new.splitlines() if b not in src.splitlines()]
            print(f"{m}: {MUTATIONS[m][0]}\n" + "\n".join(diff))
        return 0

    rows = ([None] if args.baseline else []) + mutations
    results: Dict[Tuple[str | None, str], Tuple[str, float, str]] = {}
    for m in rows:
        with tempfile.TemporaryDirectory(prefix=f"trtquant-mutant-{m or 'none'}-") as tmp:
            dest = Path(tmp)
            make_copy(dest, m)
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join([str(dest)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
            env["PYTHONDONTWRITEBYTECODE"] = "1"
            check_import(dest, env)
            for f in files:
                res = run_file(dest, env, f, args.timeout, extra)
                results[(m, f)] = res
                print(f"[{m or 'baseline'}] {f}: {res[0]} in {res[1]:.1f}s - {res[2]}", flush=True)

    # The table: mutation x file -> killed/survived.
    names = [Path(f).name for f in files]
    width = max(len(n) for n in names)
    header = f"{'test file':<{width}}  " + "  ".join(f"{(m or 'baseline'):<16}" for m in rows)
    print("\n" + header)
    print("-" * len(header))
    ok = True
    for f, n in zip(files, names):
        cells = []
        for m in rows:
            verdict = results[(m, f)][0]
            if m is None:
                good = verdict == "survived"
                verdict = "passes" if good else f"FAILS ({verdict})"
            else:
                good = verdict == "killed"
            ok &= good
            cells.append(f"{verdict:<16}")
        print(f"{n:<{width}}  " + "  ".join(cells))
    for m in mutations:
        print(f"  {m}: {MUTATIONS[m][0]}")
    print("all mutants killed" if ok else "SOME MUTANTS SURVIVED (or a run errored / the baseline failed)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
