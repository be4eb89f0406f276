"""Distributed calibration: 2 CPU processes on gloo agree exactly with single-process calibration on the union."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import trtquant

METHODS = {"max": {}, "percentile": {"percentile": 99.9}, "mse": {}, "entropy": {}}
WORLD = 2


def _model():
    from _models import SmallNet

    torch.manual_seed(0)  # identical weights on every rank
    return trtquant.quantize(SmallNet().eval())


def _data():
    """Eight batches; the second half is 8x larger, so rank 1's histograms span a wider range than rank 0's."""
    g = torch.Generator().manual_seed(21)
    return [torch.randn(2, 3, 64, 64, generator=g) * (1.0 if i < 4 else 8.0) for i in range(8)]


def _shard(rank: int):
    data = _data()
    per = len(data) // WORLD
    return data[rank * per:(rank + 1) * per]


def _amax_per_method(model):
    out = {}
    for method, kw in METHODS.items():
        trtquant.compute_amax(model, method, **kw)
        out[method] = {n: q.amax.clone() for n, q in trtquant.quantizers(model).items()}
    return out


def _stats(model):
    return {n: {k: v.clone() for k, v in q._calibrator.state_dict().items()}
            for n, q in trtquant.quantizers(model).items()}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    tests = str(Path(__file__).resolve().parents[1])
    if tests not in sys.path:
        sys.path.insert(0, tests)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        trtquant.calibrate(model, _shard(rank), method="entropy", progress=False)
        result = {"amax": _amax_per_method(model), "stats": _stats(model)}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_gloo_ranks_match_single_process_calibration(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    start = time.monotonic()
    ctx = mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=False,
                             start_method="spawn")
    while not ctx.join(timeout=60):
        if time.monotonic() - start > 90:
            for p in ctx.processes:
                p.kill()
            pytest.fail("distributed calibration did not finish within 90 s")
    elapsed = time.monotonic() - start

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    # Single process on the union of both shards.
    single = _model()
    trtquant.calibrate(single, _data(), method="entropy", progress=False)
    want_stats = _stats(single)
    want = _amax_per_method(single)

    names = sorted(want["max"])
    assert len(names) >= 7
    for r, got in enumerate(ranks):
        assert sorted(got["stats"]) == names
        for n in names:
            # Statistics are exact: histograms binned on the agreed range and summed, maxima reduced by MAX.
            assert sorted(got["stats"][n]) == sorted(want_stats[n]), n
            for key, value in want_stats[n].items():
                assert torch.equal(got["stats"][n][key], value), f"rank {r} {n} {key}"
        for method in METHODS:
            for n in names:
                a, b = got["amax"][method][n], want[method][n]
                assert torch.equal(a, b), f"rank {r} {method} {n}: {a} != single-process {b}"
    # The shards really differed: rank 0 alone would have calibrated a smaller range.
    alone = _model()
    trtquant.calibrate(alone, _shard(0), method="max", progress=False)
    assert float(alone.conv1.input_quantizer.amax) < float(single.conv1.input_quantizer.amax)
    assert elapsed < 30, f"2-process calibration took {elapsed:.1f} s"
