"""Benchmark reports: versioned JSON, a markdown table, and a latency/throughput PNG.

Every function takes the JSON form (``BenchResult.to_dict()`` or a loaded JSON file), so
stored results can be re-rendered and compared without re-running. Files are written
atomically (temp file + ``os.replace``). matplotlib is imported only by :func:`plot`.

JSON schema (``schema_version`` 1)::

    {"schema_version": 1, "created": iso-8601, "backend": str,
     "machine": {...collect_machine_info()...},
     "config": {backend, model, device, batch_sizes, warmup_s, duration_s, min_iterations,
                cuda_graph, include_transfers, percentiles, ...backend options},
     "results": [{"batch_size", "iterations", "walltime_s", "throughput", "timing",
                  "warmup_iterations", "warmup_s",
                  "latency_ms": {n, min, max, mean, median, p90, p95, p99, stddev, cv_pct},
                  "compute_ms" | "h2d_ms" | "d2h_ms" | "enqueue_ms": same keys or null,
                  "warnings": [str]}],
     "warnings": [str]}
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trtquant.engine.build import atomic_write_bytes, atomic_write_text

__all__ = ["SCHEMA_VERSION", "load_json", "plot", "to_markdown", "write_json", "write_markdown", "write_report"]

SCHEMA_VERSION = 1
REQUIRED_KEYS = ("schema_version", "created", "backend", "machine", "config", "results", "warnings")


def _as_dict(result: Any) -> Mapping[str, Any]:
    data = result if isinstance(result, Mapping) else result.to_dict()
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise ValueError(f"not a trtquant benchmark result: missing {missing}")
    if data["schema_version"] != SCHEMA_VERSION:
        raise ValueError(
            f"benchmark result has schema_version {data['schema_version']}; this trtquant reads {SCHEMA_VERSION}"
        )
    return data


def write_json(result: Any, path: str | os.PathLike[str]) -> Path:
    """Write the result as indented JSON (atomically) and return the path."""
    return atomic_write_text(path, json.dumps(_as_dict(result), indent=2, sort_keys=False, default=str) + "\n")


def load_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a result written by :func:`write_json`, checking its schema version."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return dict(_as_dict(data))


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def to_markdown(result: Any) -> str:
    """A markdown summary: one header line of context and a table row per batch size."""
    data = _as_dict(result)
    config, machine = data["config"], data.get("machine") or {}
    gpu = machine.get("gpu") or {}
    packages = machine.get("packages") or {}
    where = gpu.get("name") or (machine.get("cpu") or {}).get("model") or "unknown machine"
    pct_keys = [f"p{p:g}" for p in config.get("percentiles", [90, 95, 99])]
    version = packages.get("tensorrt") if data["backend"] == "tensorrt" else packages.get(data["backend"])
    lines = [
        f"**{data['backend']}**{f' {version}' if version else ''} · `{config.get('model')}` · "
        f"{config.get('device', '?')} ({where}) · CUDA graph {'on' if config.get('cuda_graph') else 'off'} · "
        f"transfers {'in' if config.get('include_transfers') else 'out of'} latency · {data['created']}",
        "",
        "| batch | iterations | median ms | " + " | ".join(f"{k} ms" for k in pct_keys)
        + " | mean ms | min ms | max ms | CV % | throughput (samples/s) |",
        "|" + "---:|" * (8 + len(pct_keys)),
    ]
    for row in data["results"]:
        lat = row["latency_ms"]
        cells = [
            str(row["batch_size"]),
            str(row["iterations"]),
            _fmt(lat["median"]),
            *(_fmt(lat.get(k)) for k in pct_keys),
            _fmt(lat["mean"]),
            _fmt(lat["min"]),
            _fmt(lat["max"]),
            _fmt(lat["cv_pct"], 1),
            _fmt(row["throughput"], 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if data["warnings"]:
        lines += ["", *(f"> warning: {w}" for w in data["warnings"])]
    return "\n".join(lines) + "\n"


def write_markdown(result: Any, path: str | os.PathLike[str]) -> Path:
    """Write :func:`to_markdown` atomically."""
    return atomic_write_text(path, to_markdown(result))


def plot(result: Any, path: str | os.PathLike[str]) -> Path:
    """PNG of latency (median and p99) and throughput against batch size.

    Needs matplotlib (``pip install 'trtquant[bench]'``); uses the Agg backend, so no display.
    """
    data = _as_dict(result)
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'trtquant[bench]' (or pip install matplotlib)") from exc

    rows = sorted(data["results"], key=lambda r: r["batch_size"])
    batches = [r["batch_size"] for r in rows]
    median = [r["latency_ms"]["median"] for r in rows]
    tail_key = "p99" if all("p99" in r["latency_ms"] for r in rows) else "max"
    tail = [r["latency_ms"][tail_key] for r in rows]
    throughput = [r["throughput"] for r in rows]

    fig = Figure(figsize=(9, 3.6), dpi=110)
    ax_lat, ax_thr = fig.subplots(1, 2)
    ax_lat.plot(batches, median, marker="o", label="median")
    ax_lat.plot(batches, tail, marker="^", linestyle="--", label=tail_key)
    ax_lat.set_xlabel("batch size")
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_title("Latency")
    ax_lat.legend()
    ax_thr.plot(batches, throughput, marker="o", color="tab:green")
    ax_thr.set_xlabel("batch size")
    ax_thr.set_ylabel("samples / s")
    ax_thr.set_title("Throughput")
    for ax in (ax_lat, ax_thr):
        ax.grid(True, alpha=0.3)
        if len(batches) > 1 and max(batches) / min(batches) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
    config = data["config"]
    fig.suptitle(f"{data['backend']} · {Path(str(config.get('model'))).name} · {config.get('device', '')}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())


def write_report(result: Any, out_dir: str | os.PathLike[str], stem: str = "bench", *, png: bool = True) -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and (optionally) ``<stem>.png`` into ``out_dir``."""
    out = Path(out_dir)
    paths = {"json": write_json(result, out / f"{stem}.json"), "markdown": write_markdown(result, out / f"{stem}.md")}
    if png:
        paths["png"] = plot(result, out / f"{stem}.png")
    return paths
