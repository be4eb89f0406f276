"""Shared helpers for the CPU benchmarks: interleaved timing so ratios come from one run."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch


def resnet50_parser(doc: str, out: str, **extra: int) -> argparse.ArgumentParser:
    """The arguments every ResNet-50 CPU benchmark takes (plus ``extra`` int options with defaults)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    for name, default in extra.items():
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=out)
    return ap


def imagenet_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The arguments every EfficientNet-Lite0-on-photos benchmark takes (add its own before parse_args)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-per-photo", type=int, default=50)
    ap.add_argument("--calib-per-photo", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=out)
    return ap


def setup(args: argparse.Namespace) -> Tuple[torch.device, Callable[[], None]]:
    """Threads and seed as asked; (device, a sync that waits for CUDA work or does nothing)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    return dev, (torch.cuda.synchronize if dev.type == "cuda" else (lambda: None))


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


def allocator_tuned() -> bool:
    """Whether the process runs with a tuned allocator (glibc tunables or a preloaded malloc)."""
    return bool(os.environ.get("GLIBC_TUNABLES") or os.environ.get("LD_PRELOAD"))


def ratio(times: Dict[str, List[float]], num: str, den: str) -> float:
    return statistics.median(times[num]) / statistics.median(times[den])


def dump(path: str, payload: Dict[str, object]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(path + ".tmp", path)
