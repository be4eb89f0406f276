"""trtquant.functional: fake quant is ONNX QuantizeLinear -> DequantizeLinear bit for bit, with an STE gradient.

The reference is ONNX Runtime (CPU, graph optimizations off) on >= 10 million values per case, built
so that the hard cases are all present and counted: exact ties (the float32 quotient x / scale is
exactly k + 0.5), saturation far beyond amax on both signs, infinities, negative zero, values that
round to zero from below, denormals and float32 extremes.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from trtquant import functional as F
from trtquant import tensor_quant as tq
from trtquant.functional import amax_to_scale, fake_quant, quant_bounds, quantize

import _qref as R

N_BIG = 10_000_000


# --------------------------------------------------------------------------------------------------
# ONNX Runtime reference
# --------------------------------------------------------------------------------------------------
def _qdq_session(scale: np.ndarray, zero_point: np.ndarray, shape, axis: int | None = None) -> ort.InferenceSession:
    """x -> QuantizeLinear -> q (int) -> DequantizeLinear -> y; outputs both q and y (opset 17)."""
    assert scale.dtype == np.float32 and zero_point.dtype in (np.int8, np.uint8)
    assert not zero_point.any()
    attrs = {} if axis is None else {"axis": axis}
    q_type = TensorProto.INT8 if zero_point.dtype == np.int8 else TensorProto.UINT8
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "scale", "zero_point"], ["q"], **attrs),
            helper.make_node("DequantizeLinear", ["q", "scale", "zero_point"], ["y"], **attrs),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("q", q_type, shape), helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(zero_point, "zero_point")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _ort_qdq(x: torch.Tensor, scale: torch.Tensor, axis: int | None = None, unsigned: bool = False):
    """(codes, dequantized) from ONNX Runtime; ``scale`` 0-d (per tensor) or 1-D (per channel on ``axis``)."""
    s = scale.detach().to(torch.float32).numpy()
    zp = np.zeros(s.shape, np.uint8 if unsigned else np.int8)
    q, y = _qdq_session(s, zp, list(x.shape), axis).run(None, {"x": x.numpy()})
    return torch.from_numpy(q.astype(np.int32)), torch.from_numpy(y)


def _assert_bits_equal(ours: torch.Tensor, ref: torch.Tensor, x: torch.Tensor) -> None:
    assert ours.dtype == ref.dtype == torch.float32 and ours.shape == ref.shape
    bad = ours.view(torch.int32) != ref.view(torch.int32)
    n_bad = int(bad.sum())
    if n_bad:
        idx = bad.flatten().nonzero().flatten()[:5]
        pairs = [(float(x.flatten()[i]), float(ours.flatten()[i]), float(ref.flatten()[i])) for i in idx]
        pytest.fail(f"{n_bad} of {ours.numel()} elements differ in their bits (x, ours, ORT): {pairs}")
    assert torch.equal(ours, ref)


# --------------------------------------------------------------------------------------------------
# test values
# --------------------------------------------------------------------------------------------------
SPECIAL_UNITS = [0.5, -0.5, 1.5, -1.5, 126.5, -127.5, 127.5, -128.5, 127.0, -128.0, 127.49999, -128.49998, 1e6, -1e6]


def _make_values(shape, scale: torch.Tensor, gen: torch.Generator):
    """x = u * scale for a mixture of ``u``, plus values set directly; returns (x, tie_mask, u).

    Sections: 45% N(0, 60^2) codes (mostly inside, some saturating), 15% uniform over [-140, 140],
    20% ties u = k + 0.5 for integers k in [-135, 134], 10% saturation |u| in [128, 1e7] both signs,
    10% set directly: +-2^e for e uniform in [-149, 127] (denormals to near FLT_MAX), +-0, +-inf.
    """
    n = math.prod(shape)
    section = torch.randint(0, 100, (n,), generator=gen).reshape(shape)
    u = torch.randn(shape, generator=gen) * 60
    u = torch.where(section >= 45, torch.empty(shape).uniform_(-140, 140, generator=gen), u)
    tie = (section >= 60) & (section < 80)
    k = torch.randint(-135, 135, shape, generator=gen).float()
    u = torch.where(tie, k + 0.5, u)
    sat = (section >= 80) & (section < 90)
    mag = torch.exp(torch.empty(shape).uniform_(math.log(128), math.log(1e7), generator=gen))
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    u = torch.where(sat, sign * mag, u)
    x = u * scale
    direct = section >= 90
    e = torch.randint(-149, 128, shape, generator=gen).float()
    d = sign * torch.exp2(e)
    pick = torch.randint(0, 60, shape, generator=gen)
    d = torch.where(pick == 0, sign * 0.0, d)  # +0.0 and -0.0
    d = torch.where(pick == 1, sign * math.inf, d)
    x = torch.where(direct, d, x)
    flat = x.view(-1)
    specials = (torch.tensor(SPECIAL_UNITS) * scale.flatten()[0]).tolist() + [-0.0, 0.0, 1e-45, -1e-45, 3.4e38, -3.4e38]
    flat[: len(specials)] = torch.tensor(specials)
    tie.view(-1)[: len(specials)] = False
    return x, tie, u


def _check_coverage(x, tie, u, scale, y_ref, q_ref, qmin, qmax) -> None:
    """The hard cases are really in the data (so that equality on them means something)."""
    exact_tie = tie & (torch.div(x, scale) == u)  # the float32 quotient is exactly k + 0.5
    assert int(exact_tie.sum()) > 1_000_000, int(exact_tie.sum())
    assert float(exact_tie.sum()) / float(tie.sum()) > 0.8
    # Ties inside the range round half to even; both parities of k are present.
    inside = exact_tie & (u > qmin) & (u < qmax)
    assert int((inside & (torch.floor(u) % 2 == 0)).sum()) > 100_000
    assert int((inside & (torch.floor(u) % 2 == 1)).sum()) > 100_000
    assert bool((q_ref[inside] % 2 == 0).all()), "ORT does not round ties to even?"
    assert torch.equal(q_ref[inside].float(), torch.where(torch.floor(u[inside]) % 2 == 0, torch.floor(u[inside]),
                                                          torch.ceil(u[inside])))
    # Saturation on both sides, infinities, exact/negative zeros, denormals.
    assert int((q_ref == qmax).sum()) > 200_000 and int((q_ref == qmin).sum()) > 200_000
    assert int((x == math.inf).sum()) > 1000 and int((x == -math.inf).sum()) > 1000
    assert int((x == 0).sum()) > 1000 and int(torch.signbit(x[x == 0]).sum()) > 500
    assert int(((x < 0) & (x > -scale / 2)).sum()) > 100_000  # round to code 0 from below
    assert int(((x != 0) & (x.abs() < 1.1754944e-38)).sum()) > 1000  # denormals
    assert int(((x.abs() > scale * qmax) & torch.isfinite(x)).sum()) > 1_000_000


class _Calls:
    count = 0
    wrapped = 0


_REFS = (F._qdq_reference, F._ste_reference, F._qdq_into, F._ste_into)


def _count_compiled_kernel_calls(monkeypatch, name: str) -> _Calls:
    """Wrap every compiled kernel ``name`` (or its into-a-buffer twin ``name_into``) in the fused-kernel cache
    with a call counter (for this test)."""
    calls = _Calls()
    for key, fn in list(F.KERNELS.cache.items()):
        if key[0] in (name, f"{name}_into") and fn not in _REFS:
            def counted(*args, _fn=fn):
                calls.count += 1
                return _fn(*args)
            monkeypatch.setitem(F.KERNELS.cache, key, counted)
            calls.wrapped += 1
    return calls


def _kernel_cache_state() -> dict:
    return {str(k[:2]): ("reference (compile failed)" if v in _REFS else "compiled") for k, v in F.KERNELS.cache.items()}


@pytest.fixture(scope="module")
def per_tensor_case():
    gen = torch.Generator().manual_seed(1234)
    amax = torch.tensor(2.3717)
    scale = amax_to_scale(amax, 127)
    x, tie, u = _make_values((N_BIG,), scale, gen)
    q_ref, y_ref = _ort_qdq(x, scale)
    return amax, scale, x, tie, u, q_ref, y_ref


# --------------------------------------------------------------------------------------------------
# closed form, by hand: independent of trtquant (and of the ORT sessions below, whose scale comes from it)
# --------------------------------------------------------------------------------------------------
def test_hand_chosen_values_closed_form():
    """amax 127/16 -> scale exactly 1/16: ties round half to even, saturation at 127 and -128, +0.0 for code 0."""
    x = torch.tensor(R.HAND_X)
    assert float(amax_to_scale(torch.tensor(R.AMAX_SIXTEENTH), 127)) == R.SCALE_SIXTEENTH
    assert quant_bounds(8) == (-128, 127, 127) and quant_bounds(8, narrow_range=True) == (-127, 127, 127)
    expected = torch.tensor(R.HAND_CODES, dtype=torch.float32) * R.SCALE_SIXTEENTH
    y = fake_quant(x, torch.tensor(R.AMAX_SIXTEENTH))
    assert y.tolist() == expected.tolist(), list(zip(R.HAND_X, y.tolist(), expected.tolist()))
    assert not bool(torch.signbit(y[y == 0]).any())  # -0.03125 and -0.0 dequantize to +0.0
    assert fake_quant(x, R.AMAX_SIXTEENTH).tolist() == expected.tolist()  # Python float amax
    narrow = fake_quant(x, torch.tensor(R.AMAX_SIXTEENTH), narrow_range=True)
    assert narrow.tolist() == (torch.tensor(R.HAND_CODES_NARROW) * R.SCALE_SIXTEENTH).tolist()
    codes, scale = quantize(x, torch.tensor(R.AMAX_SIXTEENTH))
    assert codes.tolist() == [float(c) for c in R.HAND_CODES] and float(scale) == R.SCALE_SIXTEENTH
    # Unsigned: amax 255/16 -> scale 1/16, codes clipped to [0, 255]: 0, 0, 0, 2, 254, 255 (255.5 -> 256), 255.
    u = torch.tensor([-1.0, -0.03125, 0.03125, 0.09375, 15.90625, 15.96875, 40.0])
    assert fake_quant(u, torch.tensor(15.9375), unsigned=True).tolist() == [
        0.0, 0.0, 0.0, 0.125, 15.875, 15.9375, 15.9375]
    # The numpy reference agrees with the hand-written codes (so tests using it inherit their meaning).
    assert R.codes(x, R.AMAX_SIXTEENTH).tolist() == [float(c) for c in R.HAND_CODES]


def test_random_values_match_numpy_reference_per_tensor_and_per_channel():
    """scale = float32(amax) / 127 and round half to even from numpy, on non-power-of-two scales."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(6, 500, generator=gen) * 3
    amax = torch.tensor(2.3717)
    y = fake_quant(x, amax)
    assert torch.equal(y, R.fake_quant(x, amax))
    # Within half a step of x inside the range.
    s = float(R.scale_of(amax))
    inside = x.abs() <= 127 * s
    assert float((y - x)[inside].abs().max()) <= s / 2 * (1 + 1e-6)
    amax_c = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0, 0.0]).reshape(6, 1)  # a dead channel: scale 1
    yc = fake_quant(x, amax_c)
    assert torch.equal(yc, R.fake_quant(x, amax_c))
    assert torch.equal(yc[5], torch.clamp(torch.round(x[5]), -128, 127) + 0.0)


# --------------------------------------------------------------------------------------------------
# bit exactness against ONNX Runtime
# --------------------------------------------------------------------------------------------------
def test_amax_to_scale_is_float32_division():
    amax = torch.tensor([1.0, 2.3717, 1e-3, 448.0, 0.0])
    scale = amax_to_scale(amax, 127)
    assert scale.dtype == torch.float32
    expected = (amax.numpy().astype(np.float32) / np.float32(127)).astype(np.float32)
    expected[-1] = 1.0  # a dead channel (amax 0) gets scale 1
    assert np.array_equal(scale.numpy(), expected)
    assert float(amax_to_scale(torch.tensor(3.0), 255)) == np.float32(3.0) / np.float32(255)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_per_tensor_matches_onnxruntime_bit_for_bit(per_tensor_case, fused, monkeypatch):
    amax, scale, x, tie, u, q_ref, y_ref = per_tensor_case
    assert x.numel() >= 10_000_000
    _check_coverage(x, tie, u, scale, y_ref, q_ref, -128, 127)
    # Independent of trtquant's scale: the case's scale is float32(amax) / 127.
    assert float(scale) == float(np.float32(amax.numpy()) / np.float32(127))
    monkeypatch.setattr(F.KERNELS, "_enabled", fused)  # forced either way, whatever TRTQUANT_FUSED_KERNELS says
    if fused:
        # Compile (or find) the kernel for this signature on a slice, then count its uses on the full tensor:
        # a failed compile falls back to the unfused reference with only a log line, which must not pass here.
        # The full tensor is large enough to be written into a reused buffer (its own "qdq_into" kernel).
        fake_quant(x[: 1 << 17], amax)
        fake_quant(x, amax)
        calls = _count_compiled_kernel_calls(monkeypatch, "qdq")
        assert calls.wrapped, f"no compiled qdq kernel in the cache: {_kernel_cache_state()}"
    _assert_bits_equal(fake_quant(x, amax), y_ref, x)
    if fused:
        assert calls.count == 1, f"the compiled qdq kernel ran {calls.count} times: {_kernel_cache_state()}"
    # Negative zero and values in (-scale/2, 0) dequantize to +0.0, as the integer code 0 does.
    y = fake_quant(x[:100_000], amax)
    assert not bool(torch.signbit(y[y == 0]).any())
    # quantize() gives the same integer codes.
    codes, s = quantize(x, amax)
    assert torch.equal(s, scale)
    assert torch.equal(codes, q_ref.float())


def test_per_tensor_matches_onnxruntime_for_many_scales():
    """Exact ties depend on the scale's mantissa: 2000 scales (one per ORT channel), incl. exact-arithmetic ties."""
    gen = torch.Generator().manual_seed(7)
    amax = torch.rand(2000, generator=gen) * 10 + 1e-4
    # 500 scales with a 10-bit mantissa: (k + 0.5) * scale is exact in float32, the tie is exact in reals too.
    m = torch.randint(512, 1024, (500,), generator=gen).float()
    amax[:500] = m * torch.exp2(torch.randint(-20, 5, (500,), generator=gen).float()) * 127
    scale = amax_to_scale(amax, 127)
    k = torch.arange(-131, 131).float()
    x = (k[None, :] + 0.5) * scale[:, None]
    assert torch.equal(x[:500].double() / scale[:500, None].double(), (k[None, :] + 0.5).double().expand(500, -1))
    exact = torch.div(x, scale[:, None]) == (k + 0.5)
    assert float(exact.float().mean()) > 0.85
    q_ref, y_ref = _ort_qdq(x, scale, axis=0)
    _assert_bits_equal(fake_quant(x, amax[:, None]), y_ref, x)
    inside = exact & (k > -128) & (k < 127)
    assert bool((q_ref[inside] % 2 == 0).all())


@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_matches_onnxruntime_bit_for_bit(axis):
    gen = torch.Generator().manual_seed(100 + axis)
    channels = 64
    shape = (channels, 32, 70, 70) if axis == 0 else (32, channels, 70, 70)
    assert math.prod(shape) >= 10_000_000
    amax = torch.exp(torch.empty(channels).uniform_(math.log(1e-3), math.log(50.0), generator=gen))
    amax[5] = 0.0  # a dead channel: scale 1.0, as exporters write it
    bshape = [1, 1, 1, 1]
    bshape[axis] = channels
    amax_b = amax.reshape(bshape)
    scale = amax_to_scale(amax, 127)
    assert float(scale[5]) == 1.0
    x, tie, u = _make_values(shape, scale.reshape(bshape), gen)
    q_ref, y_ref = _ort_qdq(x, scale, axis=axis)
    live = torch.ones(channels, dtype=torch.bool)
    live[5] = False
    sel = (slice(None),) * axis + (live,)
    _check_coverage(x[sel], tie[sel], u[sel], scale.reshape(bshape)[sel], y_ref[sel], q_ref[sel], -128, 127)
    _assert_bits_equal(fake_quant(x, amax_b), y_ref, x)
    codes, s = quantize(x, amax_b)
    assert torch.equal(codes, q_ref.float()) and torch.equal(s.flatten(), scale)


def test_unsigned_matches_onnxruntime_and_numpy():
    gen = torch.Generator().manual_seed(3)
    amax = torch.tensor(6.0)
    scale = amax_to_scale(amax, 255)
    assert quant_bounds(8, unsigned=True) == (0, 255, 255)
    x, tie, u = _make_values((2_000_000,), scale, gen)
    x = torch.where(torch.rand(x.shape, generator=gen) < 0.8, x.abs(), x)  # mostly non-negative, some negative
    q_ref, y_ref = _ort_qdq(x, scale, unsigned=True)
    ours = fake_quant(x, amax, unsigned=True)
    _assert_bits_equal(ours, y_ref, x)
    assert int((q_ref == 255).sum()) > 10_000 and int((q_ref == 0).sum()) > 10_000
    # numpy: clip(rint(x / s), 0, 255) * s, in float32 (rint rounds half to even); + 0 clears -0.
    xn, sn = x.numpy(), scale.numpy()
    with np.errstate(invalid="ignore", over="ignore"):
        ref = (np.clip(np.rint(xn / sn), 0, 255) * sn + np.float32(0)).astype(np.float32)
    assert np.array_equal(ours.numpy().view(np.int32), ref.view(np.int32))


def test_narrow_range_matches_numpy():
    gen = torch.Generator().manual_seed(4)
    amax = torch.tensor(0.731)
    scale = amax_to_scale(amax, 127)
    x, tie, u = _make_values((2_000_000,), scale, gen)
    assert quant_bounds(8, narrow_range=True) == (-127, 127, 127)
    ours = fake_quant(x, amax, narrow_range=True)
    xn, sn = x.numpy(), scale.numpy()
    with np.errstate(invalid="ignore", over="ignore"):
        ref = (np.clip(np.rint(xn / sn), -127, 127).astype(np.float32) * sn + np.float32(0)).astype(np.float32)
    assert np.array_equal(ours.numpy().view(np.int32), ref.view(np.int32))
    assert float(ours.min()) == -float(ours.max()) == float(np.float32(-127) * sn)
    # The wide range reaches -128 on the same data; narrow does not.
    assert float(fake_quant(x, amax).min()) == float(np.float32(-128) * sn)


def test_torch_native_fake_quant_differs_from_onnxruntime():
    """Why trtquant does not call torch.fake_quantize_per_tensor_affine: it multiplies by 1/scale.

    The values are chosen where that matters: float32 x = (k + 0.5) * s and its two float neighbours,
    kept where numpy says rint(x / s) != rint(x * (1 / s)). Deterministic: no skip.
    """
    s = np.float32(2.3717) / np.float32(127)
    k = np.arange(-140, 140, dtype=np.float32)
    base = ((k + np.float32(0.5)) * s).astype(np.float32)
    cands = np.concatenate([base, np.nextafter(base, np.float32(np.inf)), np.nextafter(base, np.float32(-np.inf))])
    by_div, by_mul = np.rint(cands / s), np.rint(cands * (np.float32(1) / s))
    pick = (by_div != by_mul) & (np.abs(by_div) <= 127)
    x = torch.from_numpy(cands[pick].astype(np.float32))
    assert x.numel() >= 20, x.numel()
    q_ref, y_ref = _ort_qdq(x, torch.tensor(s))
    assert torch.equal(q_ref.float(), torch.from_numpy(np.clip(by_div[pick], -128, 127)))  # ORT divides
    native = torch.fake_quantize_per_tensor_affine(x, float(s), 0, -128, 127)
    n_diff = int((native != y_ref).sum())
    assert n_diff >= x.numel() // 2, f"torch's native fake quant differs from ORT on only {n_diff} of {x.numel()}"
    ours = fake_quant(x, torch.tensor(2.3717))
    _assert_bits_equal(ours, y_ref, x)


def test_fake_quant_other_dtypes_and_python_amax():
    """Other dtypes are quantized in float32 and cast back; the expected values come from numpy."""
    x = torch.randn(1000) * 3
    ref = R.fake_quant(x, 2.0)  # scale float32(2) / 127, rint, clip to [-128, 127]
    assert torch.equal(fake_quant(x, torch.tensor(2.0)), ref)
    assert torch.equal(fake_quant(x, 2.0), ref)
    assert int((x.abs() > 2.0).sum()) > 100  # saturation is exercised
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        xd = x.to(dtype)
        y = fake_quant(xd, torch.tensor(2.0))
        assert y.dtype == dtype
        assert torch.equal(y, R.fake_quant(xd.float(), 2.0).to(dtype)), dtype


@pytest.mark.gpu
def test_cuda_matches_cpu_bit_for_bit(per_tensor_case):
    amax, scale, x, tie, u, q_ref, y_ref = per_tensor_case
    y = fake_quant(x.cuda(), amax.cuda()).cpu()
    _assert_bits_equal(y, y_ref, x)
    xc = x[: 64 * 1000].reshape(64, 1000)
    amax_c = torch.rand(64, 1) * 3 + 0.1
    assert torch.equal(fake_quant(xc.cuda(), amax_c.cuda()).cpu().view(torch.int32),
                       fake_quant(xc, amax_c).view(torch.int32))


# --------------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------------
def _edge_values(amax: torch.Tensor) -> torch.Tensor:
    """+-amax (inside), the next float beyond each (outside), and random values around them."""
    a = amax.float()
    beyond = torch.nextafter(a, torch.tensor(math.inf))
    return torch.stack([a, -a, beyond, -beyond, a * 0.999, -a * 0.999, a * 3, -a * 3, a * 0, a * 1e-3])


def test_ste_gradient_per_tensor():
    amax = torch.tensor(1.5)
    x = torch.cat([torch.randn(10_000) * 2, _edge_values(amax)]).requires_grad_()
    g = torch.randn_like(x)
    fake_quant(x, amax).backward(g)
    inside = x.detach().abs() <= amax
    assert torch.equal(x.grad, torch.where(inside, g, torch.zeros_like(g)))
    assert int(inside.sum()) > 1000 and int((~inside).sum()) > 1000
    assert float(x.grad[-10]) == float(g[-10]) and float(x.grad[-8]) == 0.0  # x = amax: 1, next float: 0


@pytest.mark.parametrize("axis", [0, 1])
def test_ste_gradient_per_channel(axis):
    shape = (6, 5, 3, 3) if axis == 0 else (5, 6, 3, 3)
    bshape = [1, 1, 1, 1]
    bshape[axis] = 6
    amax = (torch.rand(6) + 0.2).reshape(bshape)
    x = (torch.randn(shape) * amax * 1.5).requires_grad_()
    g = torch.randn(shape)
    fake_quant(x, amax).backward(g)
    inside = x.detach().abs() <= amax
    assert torch.equal(x.grad, torch.where(inside, g, torch.zeros_like(g)))
    assert 0 < int(inside.sum()) < x.numel()


def _lsq_closed_form(x: torch.Tensor, amax: torch.Tensor, g: torch.Tensor, qmin: int, qmax: int, bound: int):
    """d(sum g * y)/d amax, y = clamp(round(x/s)) * s, s = amax/bound, with the straight-through round."""
    s = amax_to_scale(amax, bound)
    v = x / s
    q = torch.round(v)
    d = torch.where((q >= qmin) & (q <= qmax), q - v, q.clamp(qmin, qmax)) / bound
    return g * d


def test_amax_gradient_closed_form_and_finite_differences():
    x = torch.randn(5000) * 2
    g = torch.randn(5000)
    amax = torch.tensor(1.7, requires_grad=True)
    fake_quant(x, amax).backward(g)
    expected = _lsq_closed_form(x, amax.detach(), g, -128, 127, 127).sum()
    assert torch.allclose(amax.grad, expected, rtol=1e-4, atol=1e-4), (amax.grad, expected)

    # Saturated values: y = 127 s = amax exactly (or -128 s = -128/127 amax), a true derivative.
    pos = torch.full((100,), 50.0)
    neg = torch.full((30,), -50.0)
    for xs, slope in ((pos, 1.0), (neg, -128 / 127)):
        a = torch.tensor(1.7, dtype=torch.float32, requires_grad=True)
        fake_quant(xs, a).sum().backward()
        h = 1e-2
        fd = (fake_quant(xs, torch.tensor(1.7 + h)).double().sum() - fake_quant(xs, torch.tensor(1.7 - h)).double().sum()) / (2 * h)
        assert math.isclose(float(a.grad), xs.numel() * slope, rel_tol=1e-5)
        assert math.isclose(float(fd), xs.numel() * slope, rel_tol=1e-3)


def test_amax_gradient_per_channel_shape_and_values():
    amax = (torch.rand(4, 1, 1, 1) + 0.5).requires_grad_()
    x = torch.randn(4, 3, 5, 5) * 1.2
    g = torch.randn_like(x)
    fake_quant(x, amax).backward(g)
    assert amax.grad.shape == amax.shape
    expected = _lsq_closed_form(x, amax.detach(), g, -128, 127, 127).sum(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(amax.grad, expected, rtol=1e-4, atol=1e-4)
    # Channel 0 entirely saturated positive: its gradient is the sum of g exactly (slope 1).
    x2 = x.clone()
    x2[0] = 100.0
    amax.grad = None
    fake_quant(x2, amax).backward(g)
    assert torch.allclose(amax.grad[0].flatten(), g[0].sum().reshape(1), rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# pytorch-quantization's autograd functions
# --------------------------------------------------------------------------------------------------
def test_pytorch_quantization_fake_tensor_quant():
    x = torch.cat([torch.randn(100_000) * 3, torch.tensor([-100.0, 100.0])]).requires_grad_()
    amax = torch.tensor(2.0)
    y = tq.fake_tensor_quant(x, amax)  # narrow range by default, as in pytorch-quantization
    s = np.float32(2.0) / np.float32(127)
    xn = x.detach().numpy()
    ref = (np.clip(np.rint(xn / s), -127, 127).astype(np.float32) * s + np.float32(0)).astype(np.float32)
    assert np.array_equal(y.detach().numpy().view(np.int32), ref.view(np.int32))
    assert float(y.detach().min()) == -float(y.detach().max()) == float(np.float32(-127) * s)
    g = torch.randn_like(x)
    y.backward(g)
    inside = x.detach().abs() <= amax
    assert torch.equal(x.grad, torch.where(inside, g, torch.zeros_like(g)))
    # Positional (inputs, amax, num_bits, unsigned, narrow_range) like pytorch-quantization's .apply.
    y_wide = tq.fake_tensor_quant(x.detach(), amax, 8, False, False)
    assert float(y_wide.min()) == float(np.float32(-128) * s)


def test_pytorch_quantization_tensor_quant():
    x = torch.cat([torch.randn(100_000) * 3, torch.tensor([-100.0, 100.0])]).requires_grad_()
    amax = torch.tensor(2.0)
    codes, scale = tq.tensor_quant(x, amax)
    assert torch.allclose(scale, torch.tensor(127 / 2.0), rtol=1e-6)  # codes per unit, as pytorch-quantization
    assert bool((codes == codes.round()).all())
    assert float(codes.detach().min()) == -127 and float(codes.detach().max()) == 127
    s = np.float32(2.0) / np.float32(127)
    assert np.array_equal(codes.detach().numpy(), np.clip(np.rint(x.detach().numpy() / s), -127, 127))
    # Per-channel amax broadcasts; STE gradient.
    w = (torch.randn(4, 8) * 2).requires_grad_()
    amax_c = torch.tensor([[0.5], [1.0], [2.0], [4.0]])
    codes_c, scale_c = tq.tensor_quant(w, amax_c)
    assert scale_c.shape == (4, 1)
    assert bool((codes_c.abs() <= 127).all())
    g = torch.randn_like(w)
    codes_c.backward(g)
    assert torch.equal(w.grad, torch.where(w.detach().abs() <= amax_c, g, torch.zeros_like(g)))
