"""Batched amax (trtquant.calib.batched) equals the per-histogram functions, exactly, on varied histograms,
and calibrate / load_calibration / the pytorch-quantization load_calib_amax loop all go through it."""

from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import pytest
import torch
from torch import nn

import trtquant
from trtquant.calib import batched, histogram
from trtquant.calib.histogram import HistogramCalibrator
from trtquant.calib.methods import METHODS

CASES = [
    ("max", {}),
    ("percentile", {"percentile": 99.99}),
    ("percentile", {"percentile": 100.0}),
    ("percentile", {"percentile": 50.0}),
    ("mse", {}),
    ("mse", {"unsigned": True}),
    ("mse", {"num_bits": 4, "start_bin": 7, "stride": 3}),
    ("entropy", {}),
    ("entropy", {"unsigned": True}),
    ("entropy", {"num_bits": 6, "start_bin": 5, "stride": 2}),
]


def _varied(seed: int = 0, rows: int = 40, bins: int = 2048) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Raw histograms of every shape the collector produces: one bin, two, around start_bin, full length,
    holes (empty bins inside), spikes, heavy tails, flat noise; widths over many powers of two."""
    g = torch.Generator().manual_seed(seed)
    lengths = ([1, 2, 3, 127, 128, 129, 130, bins] + torch.randint(1, bins + 1, (max(rows - 8, 0),), generator=g).tolist())[:rows]
    hists, widths = [], []
    for r, n in enumerate(lengths):
        kind = r % 5
        if kind == 0:
            h = torch.randint(0, 1000, (n,), generator=g)
        elif kind == 1:  # a ReLU-like decaying tail
            h = (torch.rand(n, generator=g) * 1e5 * torch.exp(-torch.arange(n) / max(n / 8, 1))).long()
        elif kind == 2:  # a few spikes, empty elsewhere
            h = torch.zeros(n, dtype=torch.long)
            h[torch.randint(0, n, (3,), generator=g)] = torch.randint(1, 50, (3,), generator=g)
        elif kind == 3:  # sparse 0/1/2 counts (many empty bins inside)
            h = torch.randint(0, 3, (n,), generator=g) * torch.randint(0, 2, (n,), generator=g)
        else:  # everything in bin 0 but the last bin (the entropy bins[0] = bins[1] substitution)
            h = torch.zeros(n, dtype=torch.long)
            h[0] = 10_000
        h[-1] = max(int(h[-1]), 1)  # the collector trims after the last non-empty bin
        full = torch.zeros(bins, dtype=torch.long)
        full[:n] = h
        hists.append(full)
        widths.append(torch.tensor(2.0 ** int(torch.randint(-30, 12, (1,), generator=g))))
    return hists, widths


def _reference(hist: torch.Tensor, width: torch.Tensor, method: str, kwargs: Dict) -> torch.Tensor:
    n = int(torch.nonzero(hist).max()) + 1
    edges = torch.arange(n + 1, dtype=torch.float32) * width
    return METHODS[method](hist[:n].clone(), edges, **kwargs).to(torch.float32)


@pytest.mark.parametrize("method,kwargs", CASES, ids=[f"{m}-{sorted(k.items())}" for m, k in CASES])
def test_batched_equals_per_histogram(method, kwargs):
    hists, widths = _varied()
    got = batched.amax_batched(batched.stack_histograms(hists, widths), method, **kwargs)
    want = torch.stack([_reference(h, w, method, kwargs) for h, w in zip(hists, widths)])
    mismatched = (got != want).nonzero().flatten().tolist()
    assert not mismatched, [(i, float(got[i]), float(want[i])) for i in mismatched]


def test_mse_beyond_the_cached_table_equals_per_histogram():
    hists, widths = _varied(seed=3, rows=10, bins=batched._MSE_TABLE_MAX_BINS + 512)
    got = batched.amax_batched(batched.stack_histograms(hists, widths), "mse")
    want = torch.stack([_reference(h, w, "mse", {}) for h, w in zip(hists, widths)])
    assert torch.equal(got, want)


def test_small_entropy_blocks_give_the_same_answer(monkeypatch):
    # Blocks of a few candidates, and rows dropping out between blocks, change nothing.
    hists, widths = _varied(seed=5, rows=12)
    stack = batched.stack_histograms(hists, widths)
    whole = batched.entropy_amax_batched(stack)
    monkeypatch.setattr(batched, "_ENTROPY_BLOCK_ELEMS", 12 * 129 * 3)
    assert torch.equal(batched.entropy_amax_batched(stack), whole)


def test_empty_rows_are_named():
    hists, widths = _varied(rows=10)
    hists[4] = torch.zeros_like(hists[4])
    with pytest.raises(ValueError, match=r"rows \[4\] are empty"):
        batched.stack_histograms(hists, widths)


def test_bad_arguments_raise_like_the_per_histogram_functions():
    stack = batched.stack_histograms(*_varied(rows=9))
    with pytest.raises(ValueError, match="percentile must be in"):
        batched.amax_batched(stack, "percentile", percentile=0)
    with pytest.raises(ValueError, match="num_bits"):
        batched.amax_batched(stack, "entropy", num_bits=1)
    with pytest.raises(ValueError, match="did you mean 'entropy'"):
        batched.amax_batched(stack, "entropie")


# ---- through the calibrators and the model-level entry points ----------------------------------------

class _Net(nn.Module):
    """Signed and unsigned activations, 8- and 6-bit inputs, a per-channel (max) weight, a zero layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.zero = nn.Conv2d(8, 4, 1)
        nn.init.zeros_(self.zero.weight)
        nn.init.zeros_(self.zero.bias)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = self.conv2(x)
        x = self.zero(x)
        return self.fc(x.mean((2, 3)))


def _calibrated_statistics() -> nn.Module:
    torch.manual_seed(0)
    model = trtquant.quantize(_Net().eval())
    model.conv2.input_quantizer._calibrator = HistogramCalibrator(num_bits=6)  # a different group of the batch
    data = [torch.randn(4, 3, 16, 16) * s for s in (0.5, 2.0, 8.0)]
    trtquant.collect_statistics(model, data, progress=False)
    return model


def _histogram_quantizers(model: nn.Module) -> Dict[str, trtquant.TensorQuantizer]:
    return {n: q for n, q in model.named_modules()
            if isinstance(q, trtquant.TensorQuantizer) and isinstance(q._calibrator, HistogramCalibrator)}


@pytest.mark.parametrize("method,kwargs", [("entropy", {}), ("mse", {}), ("percentile", {"percentile": 99.9}),
                                           ("max", {})])
def test_calibrate_equals_per_quantizer_functions(method, kwargs, monkeypatch):
    model = _calibrated_statistics()
    calls = []
    real = batched.amax_batched
    monkeypatch.setattr(batched, "amax_batched", lambda *a, **k: calls.append(1) or real(*a, **k))
    trtquant.compute_amax(model, method, **kwargs)
    groups = {(q._calibrator._num_bits, q._calibrator._unsigned) for q in _histogram_quantizers(model).values()
              if not q._calibrator._all_zero()}
    assert len(calls) == (1 if method in ("max", "percentile") else len(groups))  # one batch per argument group
    for name, q in _histogram_quantizers(model).items():
        cal = q._calibrator
        if cal._all_zero():
            assert float(q.amax) == trtquant.quantizer.ZERO_AMAX, name
            continue
        hist, edges = cal.histogram
        extra = {"num_bits": cal._num_bits, "unsigned": cal._unsigned} if method in ("mse", "entropy") else {}
        want = METHODS[method](hist, edges, **kwargs, **extra)
        assert torch.equal(q.amax, want.to(torch.float32)), name
    # Weights are max-calibrated per channel: untouched by the batch, max |w| per output channel.
    w = model.conv.weight.detach().abs().amax((1, 2, 3))
    assert torch.equal(model.conv.weight_quantizer.amax.flatten(), w)


def test_pytorch_quantization_loop_batches_lazily(monkeypatch):
    model = _calibrated_statistics()
    reference = copy.deepcopy(model)
    trtquant.compute_amax(reference, "entropy")
    mine = {q._calibrator for q in _histogram_quantizers(model).values()}
    for other in list(histogram._PENDING):  # calibrators other tests left alive would join the batch
        if other not in mine:
            histogram._PENDING.discard(other)
    groups = {(c._num_bits, c._unsigned) for c in mine if not c._all_zero()}
    calls = []
    real = batched.amax_batched
    monkeypatch.setattr(batched, "amax_batched", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _, module in model.named_modules():  # pytorch-quantization's documented loop
        if isinstance(module, trtquant.TensorQuantizer) and module._calibrator is not None:
            if isinstance(module._calibrator, HistogramCalibrator):
                module.load_calib_amax("entropy")
            else:
                module.load_calib_amax()
    # The first request computed every pending histogram (one batch per argument group), the rest read the cache.
    assert len(calls) == len(groups) == 2
    for name, q in _histogram_quantizers(model).items():
        assert torch.equal(q.amax, _histogram_quantizers(reference)[name].amax), name


def test_new_statistics_invalidate_the_cached_amax():
    cal = HistogramCalibrator()
    cal.collect(torch.rand(1000))
    first = cal.compute_amax("entropy")
    assert torch.equal(cal.compute_amax("entropy"), first)  # cached
    cal.collect(torch.rand(1000) * 50)
    second = cal.compute_amax("entropy")
    hist, edges = cal.histogram
    assert torch.equal(second, METHODS["entropy"](hist, edges).to(torch.float32))
    assert float(second) > float(first)
    cal.reset()
    assert cal.compute_amax("entropy") is None
    other = HistogramCalibrator()
    other.collect(torch.rand(500))
    cal.load_state_dict(other.state_dict())
    hist, edges = cal.histogram
    assert torch.equal(cal.compute_amax("mse"), METHODS["mse"](hist, edges).to(torch.float32))


def test_load_calibration_goes_through_the_batch(tmp_path, monkeypatch):
    model = _calibrated_statistics()
    path = tmp_path / "calib.safetensors"
    trtquant.save_calibration(model, path)
    fresh = trtquant.quantize(_Net().eval())
    fresh.conv2.input_quantizer._calibrator = HistogramCalibrator(num_bits=6)
    calls = []
    real = batched.amax_batched
    monkeypatch.setattr(batched, "amax_batched", lambda *a, **k: calls.append(1) or real(*a, **k))
    trtquant.load_calibration(fresh, path, method="percentile", percentile=99.9)
    assert len(calls) == 1
    trtquant.compute_amax(model, "percentile", percentile=99.9)
    for name, q in _histogram_quantizers(model).items():
        assert torch.equal(_histogram_quantizers(fresh)[name].amax, q.amax), name


def test_row_workers_give_the_same_answer_and_restore_threads(monkeypatch):
    stack = batched.stack_histograms(*_varied(seed=9, rows=13))
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # three workers even on a 2-core machine
    try:
        spread = batched.amax_batched(stack, "entropy")
        assert torch.get_num_threads() == 3  # the caller's setting is back
        monkeypatch.setattr(batched, "_MAX_ROW_WORKERS", 1)
        single = batched.amax_batched(stack, "entropy")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(spread, single)
