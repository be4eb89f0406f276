"""Shared helpers for the CPU benchmarks: interleaved timing so ratios come from one run."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List

import torch


def machine() -> Dict[str, object]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def interleaved(fns: Dict[str, Callable[[], None]], repeats: int, sync: Callable[[], None] = lambda: None) -> Dict[str, List[float]]:
    """Time each fn ``repeats`` times, alternating between them so drift hits all equally."""
    for fn in fns.values():  # warm-up
        fn()
    sync()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t)
    return times


def ratio(times: Dict[str, List[float]], num: str, den: str) -> float:
    return statistics.median(times[num]) / statistics.median(times[den])


def dump(path: str, payload: Dict[str, object]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(path + ".tmp", path)
