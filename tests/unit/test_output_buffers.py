"""Reused fake-quant output buffers (trtquant.functional.BUFFERS): reused only when nobody holds them,
never overwriting a result that is kept, viewed or saved by autograd; numerics unchanged."""

from __future__ import annotations

import pytest
import torch

from trtquant import functional as F
from trtquant.functional import BUFFERS, fake_quant

import _qref as R


@pytest.fixture(autouse=True)
def small_buffers(monkeypatch):
    # Pool tensors of 64 KiB and up, so the tests stay small; a clean pool per test.
    monkeypatch.setattr(BUFFERS, "min_bytes", 1 << 16)
    BUFFERS.enabled = True
    BUFFERS.clear()
    yield
    BUFFERS.enabled = None
    BUFFERS.clear()


def _x(seed: int) -> torch.Tensor:
    return torch.randn(4, 16, 32, 32, generator=torch.Generator().manual_seed(seed)) * 3  # 256 KiB


def _expected(x: torch.Tensor, amax: float) -> torch.Tensor:
    return R.fake_quant(x, amax)


def test_a_dropped_result_is_reused_and_exact():
    amax = torch.tensor(4.0)
    with torch.no_grad():
        ptr = fake_quant(_x(0), amax).data_ptr()
        y = fake_quant(_x(1), amax)
    assert y.data_ptr() == ptr  # the first result was dropped: its buffer came back
    assert torch.equal(y, _expected(_x(1), 4.0))


def test_a_kept_result_is_never_overwritten():
    amax = torch.tensor(4.0)
    with torch.no_grad():
        kept = fake_quant(_x(0), amax)
        view = fake_quant(_x(1), amax).view(-1)  # only a view survives
        third = fake_quant(_x(2), amax)
    assert len({kept.data_ptr(), view.data_ptr(), third.data_ptr()}) == 3
    assert torch.equal(kept, _expected(_x(0), 4.0))
    assert torch.equal(view, _expected(_x(1), 4.0).view(-1))
    assert torch.equal(third, _expected(_x(2), 4.0))


def test_a_result_saved_by_autograd_is_not_reused():
    # x needs no gradient, so the fake quant records nothing, but the product saves its output for w's gradient.
    amax = torch.tensor(4.0)
    w = torch.ones(32, requires_grad=True)
    q1 = fake_quant(_x(0), amax)
    z1 = (q1 * w).sum()
    del q1  # only autograd holds it now
    q2 = fake_quant(_x(1), amax)
    z2 = (q2 * w).sum()
    z1.backward()
    assert torch.equal(w.grad, _expected(_x(0), 4.0).sum((0, 1, 2)))
    w.grad = None
    z2.backward()
    assert torch.equal(w.grad, _expected(_x(1), 4.0).sum((0, 1, 2)))


def test_a_buffer_once_returned_through_autograd_comes_back_without_a_graph():
    # The custom op's implementation runs below autograd (grad looks off there), so a training-step result can be
    # a pooled buffer that autograd then gives a grad_fn in place; handed out again under no_grad it must not
    # carry that graph (it made cached weights un-copyable and .numpy() fail, depending on pool order).
    amax = torch.tensor(4.0)
    x = _x(0).requires_grad_(True)
    y = fake_quant(x, amax)
    assert y.grad_fn is not None
    y.sum().backward()
    ptr = y.data_ptr()
    del y
    with torch.no_grad():
        z = fake_quant(_x(1), amax)
    assert not z.requires_grad and z.grad_fn is None
    assert z.data_ptr() == ptr  # still the pooled storage
    assert torch.equal(z, _expected(_x(1), 4.0))
    z.numpy()


def test_ste_gradients_reuse_buffers_and_stay_exact():
    amax = torch.tensor(2.0)
    grads = []
    for seed in range(3):
        x = _x(seed).requires_grad_(True)
        g = torch.randn(x.shape, generator=torch.Generator().manual_seed(10 + seed))
        fake_quant(x, amax).backward(g)
        assert torch.equal(x.grad, torch.where(x.detach().abs() <= 2.0, g, torch.zeros(())))
        grads.append(x.grad)  # kept: the next backward must not write into it
    assert torch.equal(grads[0], torch.where(_x(0).abs() <= 2.0,
                                             torch.randn(grads[0].shape, generator=torch.Generator().manual_seed(10)),
                                             torch.zeros(())))


def test_pool_is_bounded_and_switchable(monkeypatch):
    amax = torch.tensor(4.0)
    with torch.no_grad():
        held = [fake_quant(_x(i), amax) for i in range(4)]  # all kept: 2 pooled, then fresh ones
        assert len({h.data_ptr() for h in held}) == 4
        assert sum(len(b) for b in BUFFERS._buckets.values()) == BUFFERS.per_shape
        BUFFERS.enabled = False
        a = fake_quant(_x(5), amax).data_ptr()
        b = fake_quant(_x(6), amax)
        assert torch.equal(b, _expected(_x(6), 4.0))
        BUFFERS.clear()
        assert not BUFFERS._buckets
    del a


def test_cuda_and_small_tensors_are_left_alone():
    with torch.no_grad():
        small = torch.randn(8)
        assert BUFFERS.acquire(small) is None
    assert F.OutputBuffers.min_bytes == 1 << 20  # the class default: allocations glibc may map fresh
