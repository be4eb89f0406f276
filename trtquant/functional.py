"""Fake quantization with ONNX QuantizeLinear/DequantizeLinear numerics and a straight-through gradient.

Exactness matters more than it looks: ``scale = amax / bound`` in float32, ``x / scale`` (a true
division, as ONNX Runtime and TensorRT do; torch's native fake-quant multiplies by ``1/scale`` and
flips about 2 codes per million), round half to even, saturate, multiply back. One rounding flip in
an early layer is enough to change a deep network's output after export.

The op is registered as ``torch.ops.trtquant.fake_quant`` so that torch.export/dynamo see one node
with a fake (meta) implementation - dynamic batch export works - and the ONNX exporters can map it
to a QuantizeLinear -> DequantizeLinear pair.

Deliberate global: :data:`KERNELS`, the process's cache of compiled fused kernels (compiled code is
a per-process resource; its on/off switch comes from :mod:`trtquant.settings`).
"""

from __future__ import annotations

import logging
import sys
import types
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "quant_bounds",
    "amax_to_scale",
    "fake_quant",
    "quantize",
    "fake_tensor_quant",
    "tensor_quant",
    "fp8_round",
    "fake_fp8",
    "ClipFunction",
    "clip",
    "Clip",
]


def quant_bounds(num_bits: int = 8, unsigned: bool = False, narrow_range: bool = False) -> Tuple[int, int, int]:
    """(qmin, qmax, bound): integer range and the code that amax maps to."""
    if unsigned:
        bound = (1 << num_bits) - 1
        return 0, bound, bound
    bound = (1 << (num_bits - 1)) - 1
    return (-bound if narrow_range else -bound - 1), bound, bound


def amax_to_scale(amax: Tensor, bound: int) -> Tensor:
    """float32 scale = amax / bound; amax 0 (a dead channel) gets scale 1.0, as TensorRT exporters do."""
    amax32 = amax.detach().to(torch.float32)
    if amax32.is_cpu:
        scale = amax32 / bound
    else:  # CUDA divides by a Python scalar as a multiplication by its reciprocal, 1 ulp off for some amax (and every
        # tie of x / scale then rounds to another code): divide by a 0-d tensor on amax's own device instead.
        scale = amax32 / torch.full((), bound, dtype=torch.float32, device=amax32.device)
    return torch.where(amax32 > 0, scale, torch.ones_like(scale))


def _true_div(x: Tensor, scale: Tensor) -> Tensor:
    """``x / scale`` correctly rounded in float32 on every backend.

    Triton, which inductor compiles CUDA kernels to, lowers a float32 ``/`` to ``div.full.f32`` (up to 2 ulp off;
    triton-lang/triton#10661): quotients that should be exact ties moved, and 3 % of a 10M-value test tensor
    rounded to another INT8 code than ONNX Runtime's on an H200. On CUDA the division runs in float64 instead:
    rounding that quotient to float32 gives the correctly rounded float32 quotient (double rounding is
    innocuous for division when the wider format has at least 2p + 2 bits, 53 >= 2 * 24 + 2).
    """
    if x.is_cuda and x.dtype == torch.float32:
        return (x.double() / scale.double()).float()
    return x / scale


def _qdq_reference(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """The definition, one op at a time: round(x / scale) saturated, times scale, with +0.0 for code 0."""
    q = torch.round(_true_div(x, scale)).clamp(qmin, qmax)
    # Code 0 dequantizes to +0.0 in ONNX Runtime/TensorRT (an integer has no signed zero), never -0.0.
    return torch.where(q == 0, torch.zeros_like(q), q * scale)


def _ste_reference(grad: Tensor, x: Tensor, amax: Tensor) -> Tensor:
    return torch.where(x.abs() <= amax, grad, torch.zeros_like(grad))


# Fused single-pass kernels (inductor: vectorised C++ on CPU, Triton on CUDA). The unfused version
# makes five passes over every activation, which costs more than the convolutions on a CPU.
_FUSE_MIN_NUMEL = 1 << 16


class FusedKernels:
    """The compiled twins of the reference kernels, one per signature, and the switch that allows them.

    ``enabled`` follows ``TRTQUANT_FUSED_KERNELS`` (:mod:`trtquant.settings`; ``0`` selects the unfused
    reference everywhere) unless set on the object (tests do). One instance, :data:`KERNELS`, serves
    the process: compiled code is a per-process resource, and sharing it is what makes it cheap.
    """

    def __init__(self) -> None:
        self.cache: dict = {}  # signature -> compiled function (or the reference, where compiling failed)
        self._enabled: Optional[bool] = None  # None: from the settings

    @property
    def enabled(self) -> bool:
        e = self._enabled
        if e is None:
            from .settings import get_settings

            e = get_settings().fused_kernels
        return e

    @enabled.setter
    def enabled(self, value: Optional[bool]) -> None:
        self._enabled = value

    def run(self, name: str, ref, numel: int, *args):
        """``ref(*args)``, through its compiled twin when the tensor is big enough to matter."""
        if numel < _FUSE_MIN_NUMEL or not self.enabled or torch.compiler.is_compiling():
            return ref(*args)
        # Plain tensors only: a Parameter would be a different guard (and a recompile) per call site.
        args = tuple(a.detach() if isinstance(a, torch.nn.Parameter) else a for a in args)
        # One compiled kernel per signature - ranks, which dimensions are 1 (dynamo specialises those),
        # dtypes, device, integer range - so each stays at one graph and never hits the recompile limit.
        key = (name,) + tuple((tuple(d == 1 for d in a.shape), a.dtype, a.device.type) if isinstance(a, Tensor)
                              else a for a in args)
        cache = self.cache
        fn = cache.get(key)
        if fn is None:
            _import_compiler_quietly()
            # Dynamo caches compiled graphs per code object: a renamed copy of the code per signature
            # gives each its own cache (and recompile budget).
            code = ref.__code__.replace(co_name=f"{ref.__name__}_{len(cache)}")
            fresh = types.FunctionType(code, ref.__globals__, code.co_name, ref.__defaults__, ref.__closure__)
            fn = cache[key] = torch.compile(fresh, dynamic=True, fullgraph=True)
        if fn is ref:
            return ref(*args)
        try:
            return fn(*args)
        except Exception as e:  # no C++ compiler / Triton: stay correct, lose speed for this signature, say so
            cache[key] = ref
            logger.warning("fused fake-quant kernel unavailable for %s (%s: %s); using the unfused path",
                           key[0], type(e).__name__, str(e).splitlines()[0][:200])
            return ref(*args)


def _import_compiler_quietly() -> None:
    """Import inductor's C++ toolchain module with its CUDA_HOME notice silenced.

    On a CPU-only machine with ``CUDA_HOME`` set, importing ``torch.utils.cpp_extension`` logs "No CUDA
    runtime is found, using CUDA_HOME=..." - true and irrelevant to CPU kernels, and a raw log line in
    the middle of the user's output. Only that import is silenced; later messages still show.
    """
    import sys

    if "torch.utils.cpp_extension" in sys.modules:
        return
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        log.setLevel(level)


#: The process's compiled kernels (see :class:`FusedKernels`).
KERNELS = FusedKernels()
_run = KERNELS.run


def _qdq_into(x: Tensor, scale: Tensor, qmin: int, qmax: int, out: Tensor) -> Tensor:
    return out.copy_(_qdq_reference(x, scale, qmin, qmax))


def _ste_into(grad: Tensor, x: Tensor, amax: Tensor, out: Tensor) -> Tensor:
    return out.copy_(_ste_reference(grad, x, amax))


def _count_refs(bucket: list, probe: bool) -> Any:
    """The first buffer of ``bucket`` that nothing outside the bucket references (``probe``: the reference
    counts of the first buffer, taken along the same code path - the baseline of a free buffer)."""
    for buf in bucket:
        counts = (sys.getrefcount(buf), buf._use_count(), torch._C._storage_Use_Count(buf.untyped_storage()._cdata))
        if probe:
            return counts
        if counts == OutputBuffers.free_counts:
            return buf
    return None


class OutputBuffers:
    """Reused output tensors for large fake-quant results on the CPU, when no gradient is recorded.

    Why: glibc hands out every allocation above 32 MiB as fresh pages from the kernel, and smaller
    ones too whenever freeing them trimmed the top of the heap; writing fresh pages costs more page
    faults than the fake quantization itself: ResNet-50 at batch 16 spends ~25 ms per 51 MB
    activation in a fresh output and ~4 ms writing the same result into a buffer it already owns
    (fake-quant inference 1.16x float before, 1.04-1.06x after; QAT step 1.23x before, 1.03-1.09x). A buffer is handed out again only when nothing outside this pool references it - not the
    Python tensor, not the tensor inside torch (autograd saving it for a backward pass), not its
    storage (a view) - so a result anyone keeps is never overwritten. At most two buffers per shape and :attr:`max_bytes` in all; CUDA has its own
    caching allocator and is left to it. ``TRTQUANT_REUSE_BUFFERS=0`` turns this off; :meth:`clear`
    returns the memory.
    """

    min_bytes = 1 << 20
    max_bytes = 1 << 30
    per_shape = 2
    free_counts: Optional[tuple] = None

    def __init__(self) -> None:
        self._buckets: dict = {}
        self._bytes = 0
        self._enabled: Optional[bool] = None  # None: from the settings

    @property
    def enabled(self) -> bool:
        e = self._enabled
        if e is None:
            from .settings import get_settings

            e = get_settings().reuse_buffers and hasattr(torch._C, "_storage_Use_Count") and hasattr(
                torch.Tensor, "_use_count")
        return e

    @enabled.setter
    def enabled(self, value: Optional[bool]) -> None:
        self._enabled = value

    def acquire(self, like: Tensor) -> Optional[Tensor]:
        """A buffer shaped and strided as ``like`` that nobody else holds, or None (then allocate as usual)."""
        nbytes = like.numel() * like.element_size()
        if nbytes < self.min_bytes or like.device.type != "cpu" or not self.enabled:
            return None
        if OutputBuffers.free_counts is None:
            OutputBuffers.free_counts = _count_refs([torch.empty(1)], probe=True)
        key = (tuple(like.shape), like.stride(), like.dtype)
        bucket = self._buckets.setdefault(key, [])
        buf = _count_refs(bucket, probe=False)
        if buf is not None:
            if buf.requires_grad:  # a custom op's result once, so autograd gave it a grad_fn in place: drop the graph
                i = next(i for i, b in enumerate(bucket) if b is buf)
                buf = bucket[i] = buf.detach()
            return buf
        if len(bucket) >= self.per_shape or self._bytes + nbytes > self.max_bytes:
            return None
        buf = torch.empty_like(like)
        bucket.append(buf)
        self._bytes += nbytes
        return buf

    def clear(self) -> None:
        """Drop every pooled buffer (results still referenced elsewhere stay valid)."""
        self._buckets.clear()
        self._bytes = 0


#: The process's reusable fake-quant outputs (see :class:`OutputBuffers`).
BUFFERS = OutputBuffers()


def _qdq_forward(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    if x.dtype != torch.float32:
        return _qdq_forward(x.float(), scale, qmin, qmax).to(x.dtype)
    if not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)) and not torch.compiler.is_compiling():
        out = BUFFERS.acquire(x)
        if out is not None:
            return _run("qdq_into", _qdq_into, x.numel(), x, scale, qmin, qmax, out)
    return _run("qdq", _qdq_reference, x.numel(), x, scale, qmin, qmax)


def _ste(grad: Tensor, x: Tensor, amax: Tensor) -> Tensor:
    # The gradient is consumed by the next backward step and dropped: a large one reuses a free buffer.
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling() and grad.dtype == x.dtype:
        out = BUFFERS.acquire(grad)
        if out is not None:
            return _run("ste_into", _ste_into, x.numel(), grad, x, amax, out)
    return _run("ste", _ste_reference, x.numel(), grad, x, amax)


@torch.library.custom_op("trtquant::fake_quant", mutates_args=())
def _fake_quant_op(x: Tensor, amax: Tensor, qmin: int, qmax: int, bound: int) -> Tensor:
    return _qdq_forward(x, amax_to_scale(amax, bound), qmin, qmax)


@_fake_quant_op.register_fake
def _(x: Tensor, amax: Tensor, qmin: int, qmax: int, bound: int) -> Tensor:
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output) -> None:
    x, amax, qmin, qmax, bound = inputs
    ctx.save_for_backward(x, amax)
    ctx.qmin, ctx.qmax, ctx.bound = qmin, qmax, bound


def _backward(ctx, grad_out: Tensor):
    x, amax = ctx.saved_tensors
    grad_x = grad_amax = None
    amax32 = amax.to(torch.float32)
    if ctx.needs_input_grad[0]:
        # Straight-through estimator: gradient 1 inside [-amax, amax], 0 where the value was clipped.
        grad_x = _ste(grad_out, x, amax32.to(x.dtype))
    if ctx.needs_input_grad[1]:
        # LSQ-style gradient of the dequantized value with respect to amax.
        scale = amax_to_scale(amax, ctx.bound)
        xs = x.float() / scale
        q = torch.round(xs)
        inside = (q >= ctx.qmin) & (q <= ctx.qmax)
        dq = torch.where(inside, q - xs, q.clamp(ctx.qmin, ctx.qmax)) / ctx.bound
        g = grad_out.float() * dq
        if amax.dim() == 0:
            grad_amax = g.sum()
        else:
            dims = [d for d in range(g.dim()) if amax.shape[d] == 1 and g.shape[d] != 1] if amax.dim() == g.dim() else list(range(g.dim()))
            grad_amax = g.sum(dim=dims, keepdim=True).reshape(amax.shape)
        grad_amax = grad_amax.to(amax.dtype)
    return grad_x, grad_amax, None, None, None


_fake_quant_op.register_autograd(_backward, setup_context=_setup_context)


def fake_quant(
    x: Tensor, amax: Tensor, num_bits: int = 8, unsigned: bool = False, narrow_range: bool = False
) -> Tensor:
    """Quantize-dequantize ``x`` with ``amax`` (0-d for per-tensor, broadcastable for per-channel)."""
    qmin, qmax, bound = quant_bounds(num_bits, unsigned, narrow_range)
    if not isinstance(amax, Tensor):
        amax = torch.tensor(float(amax), device=x.device)
    return _fake_quant_op(x, amax, qmin, qmax, bound)


def quantize(
    x: Tensor, amax: Tensor, num_bits: int = 8, unsigned: bool = False, narrow_range: bool = False
) -> Tuple[Tensor, Tensor]:
    """Integer codes (as float tensor, like pytorch-quantization) and the float32 scale."""
    qmin, qmax, bound = quant_bounds(num_bits, unsigned, narrow_range)
    if not isinstance(amax, Tensor):
        amax = torch.tensor(float(amax), device=x.device)
    scale = amax_to_scale(amax, bound)
    return torch.div(x.float(), scale).round_().clamp_(qmin, qmax), scale


_FP16_MAX = 65504.0
_TINY = 1.0 / (1 << 24)


def _check_compat_args(inputs: Tensor, amax: Tensor, unsigned: bool) -> Tensor:
    """pytorch-quantization's argument checks; returns amax as a float tensor on the input's device."""
    if not isinstance(amax, Tensor):
        amax = torch.tensor(float(amax), device=inputs.device)
    if unsigned and inputs.numel() and bool(inputs.min() < 0):
        raise TypeError("Negative values encountered in unsigned quantization: quantize signed (unsigned=False) "
                        "or feed non-negative values (e.g. a ReLU output)")
    if amax.numel() and bool(amax.min() < 0):
        raise ValueError(f"Negative values in amax (min {float(amax.min()):g}); amax is a magnitude and must be >= 0")
    return amax


def _zero_tiny_amax(out: Tensor, amax: Tensor) -> Tensor:
    """amax at or below FP16's resolution (2^-24) quantizes everything to 0, as pytorch-quantization does."""
    tiny = amax.detach() <= _TINY
    if bool(tiny.any()):
        out = torch.where(tiny.to(out.device), torch.zeros_like(out), out)
    return out


class _FakeTensorQuantFunction(torch.autograd.Function):
    """pytorch-quantization's ``fake_tensor_quant.apply(inputs, amax, num_bits, unsigned, narrow_range)``.

    Same arguments, checks and straight-through gradient as the original; the arithmetic is trtquant's
    (x / scale rounded, times scale: TensorRT's and ONNX Runtime's), which can differ from the original's
    x * (bound / amax) in the last bit of a dequantized value.
    """

    @staticmethod
    def forward(ctx, inputs: Tensor, amax: Tensor, num_bits: int = 8, unsigned: bool = False, narrow_range: bool = True):
        amax = _check_compat_args(inputs, amax, unsigned)
        ctx.save_for_backward(inputs, amax)
        with torch.no_grad():
            return _zero_tiny_amax(fake_quant(inputs, amax, num_bits, unsigned, narrow_range), amax)

    @staticmethod
    def backward(ctx, grad_outputs: Tensor):
        inputs, amax = ctx.saved_tensors
        mask = inputs.abs() <= amax.to(inputs.dtype)
        return grad_outputs * mask.to(grad_outputs.dtype), None, None, None, None


class _TensorQuantFunction(torch.autograd.Function):
    """pytorch-quantization's ``tensor_quant.apply(inputs, amax, ...)`` -> (codes, scale) with STE.

    ``scale`` is codes per unit (bound / amax); an FP16 input whose scale would overflow FP16 raises
    ValueError, as in the original.
    """

    @staticmethod
    def forward(ctx, inputs: Tensor, amax: Tensor, num_bits: int = 8, unsigned: bool = False, narrow_range: bool = True):
        amax = _check_compat_args(inputs, amax, unsigned)
        ctx.save_for_backward(inputs, amax)
        codes, scale = quantize(inputs, amax, num_bits, unsigned, narrow_range)
        inv = 1.0 / scale
        if inputs.dtype == torch.half and bool(inv.max() > _FP16_MAX):
            raise ValueError(f"scale is too large for FP16 with amax={amax.tolist()}: bound/amax exceeds {_FP16_MAX}; "
                             "use a larger amax or quantize in float32")
        codes = _zero_tiny_amax(codes, amax)
        inv = torch.where(amax.to(inv.device) <= _TINY, torch.ones_like(inv), inv)
        if inputs.dtype in (torch.half, torch.bfloat16):
            codes = codes.to(inputs.dtype)
        return codes, inv.to(inputs.dtype)

    @staticmethod
    def backward(ctx, grad_outputs: Tensor, grad_scale: Optional[Tensor]):
        inputs, amax = ctx.saved_tensors
        mask = inputs.abs() <= amax.to(inputs.dtype)
        return grad_outputs * mask.to(grad_outputs.dtype), None, None, None, None


fake_tensor_quant = _FakeTensorQuantFunction.apply
tensor_quant = _TensorQuantFunction.apply


# -- formats beyond INT8: FP8 and pytorch-quantization's clip ------------------------------------------

#: (exponent bits, mantissa bits) -> the torch dtype whose rounding defines the format.
_FP8_DTYPES = {(4, 3): torch.float8_e4m3fn, (5, 2): torch.float8_e5m2}
_FP8_MAX = {(4, 3): 448.0, (5, 2): 57344.0}


def fp8_round(x: Tensor, fmt: Tuple[int, int] = (4, 3)) -> Tensor:
    """Round to the nearest FP8 value (ties to even), saturating at the format's largest finite value.

    Saturation matches TensorRT's and CUDA's ``satfinite`` conversion; a plain ``.to(float8)`` would
    turn out-of-range values into NaN (E4M3) or inf (E5M2).
    """
    if fmt not in _FP8_DTYPES:
        raise ValueError(f"unknown FP8 format {fmt!r}; known: {sorted(_FP8_DTYPES)}")
    m = _FP8_MAX[fmt]
    xf = x.float()
    return xf.clamp(-m, m).to(_FP8_DTYPES[fmt]).to(torch.float32).to(x.dtype)


class _FakeFp8Function(torch.autograd.Function):
    """x -> fp8_round(x / s) * s with s = amax / bound (float32), straight-through inside [-amax, amax].

    Division by the float32 scale, as TensorRT (``castToFp8(clip(x / s))``) and ONNX's QuantizeLinear
    compute it, so the exported FP8 Q/DQ reproduces these values bit for bit.
    """

    @staticmethod
    def forward(ctx, x: Tensor, amax: Optional[Tensor], fmt: Tuple[int, int]):
        bound = _FP8_MAX[fmt]
        if amax is None:
            out = fp8_round(x, fmt)
            amax_t = torch.tensor(bound, device=x.device)
        else:
            amax_t = amax.detach().to(torch.float32)
            scale = amax_to_scale(amax_t, bound)
            out = (fp8_round(x.float() / scale, fmt) * scale).to(x.dtype)
        # Values below FP16's resolution become exactly 0 (no inf/NaN from a huge scale on a tiny amax).
        out = torch.where(x.abs() < _TINY, torch.zeros_like(out), out)
        ctx.save_for_backward(x, amax_t)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, amax = ctx.saved_tensors
        return torch.where(x.abs() <= amax.to(x.dtype), grad, torch.zeros_like(grad)), None, None


def fake_fp8(x: Tensor, amax: Optional[Tensor], fmt: Tuple[int, int] = (4, 3)) -> Tensor:
    """Fake-quantize to FP8 ``fmt`` ((4, 3) E4M3, (5, 2) E5M2) with amax mapped to the format's max.

    ``amax`` None rounds ``x`` unscaled. Per-tensor or broadcastable per-channel amax; the gradient is
    the straight-through estimator clipped at amax.
    """
    if fmt not in _FP8_DTYPES:
        raise ValueError(f"unknown FP8 format {fmt!r}; known: {sorted(_FP8_DTYPES)}")
    if amax is not None and not isinstance(amax, Tensor):
        amax = torch.tensor(float(amax), device=x.device)
    return _FakeFp8Function.apply(x, amax, fmt)


class ClipFunction(torch.autograd.Function):
    """min(max(x, lo), hi) with broadcast ranges; PACT gradients (arXiv:1805.06085) for a learned range.

    pytorch-quantization's ``nn.functional.ClipFunction``: the input's gradient passes strictly inside
    (lo, hi); a learned scalar bound gets the summed gradient of the values it clipped.
    """

    @staticmethod
    def forward(ctx, input: Tensor, clip_value_min: Tensor, clip_value_max: Tensor) -> Tensor:
        lo = torch.as_tensor(clip_value_min, dtype=input.dtype, device=input.device)
        hi = torch.as_tensor(clip_value_max, dtype=input.dtype, device=input.device)
        ctx.save_for_backward(input, lo, hi)
        ctx.min_grad = isinstance(clip_value_min, Tensor) and clip_value_min.requires_grad
        ctx.max_grad = isinstance(clip_value_max, Tensor) and clip_value_max.requires_grad
        return torch.max(torch.min(input, hi), lo)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, lo, hi = ctx.saved_tensors
        above_lo = (x > lo).to(grad.dtype)
        below_hi = (x < hi).to(grad.dtype)
        grad_in = grad * above_lo * below_hi
        if (ctx.min_grad or ctx.max_grad) and (lo.numel() != 1 or hi.numel() != 1):
            raise ValueError(f"a learnable clip min/max can only be scalar, got min of size {tuple(lo.shape)} and max "
                             f"of size {tuple(hi.shape)}")
        g_lo = (grad * (1.0 - above_lo)).sum().reshape(lo.shape).to(lo.dtype) if ctx.min_grad else None
        g_hi = (grad * (1.0 - below_hi)).sum().reshape(hi.shape).to(hi.dtype) if ctx.max_grad else None
        return grad_in, g_lo, g_hi


clip = ClipFunction.apply


class Clip(torch.nn.Module):
    """Clamp to [clip_value_min, clip_value_max]; either bound can be a learned scalar Parameter.

    pytorch-quantization's ``nn.Clip``; a quantizer made with ``learn_amax=True`` learns its range
    through one (``quantizer.clip``).
    """

    def __init__(self, clip_value_min: Any, clip_value_max: Any, learn_min: bool = False, learn_max: bool = False):
        super().__init__()
        self.clip_value_min = self._bound(clip_value_min, learn_min, "clip_value_min")
        self.clip_value_max = self._bound(clip_value_max, learn_max, "clip_value_max")

    @staticmethod
    def _bound(value: Any, learn: bool, what: str) -> Any:
        if not learn:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # As pytorch-quantization: a learned bound starts from a Python number, not a tensor.
            raise ValueError(f"{what} must be scalar (a Python float) for initializing a learnable range, "
                             f"got {type(value).__name__}")
        return torch.nn.Parameter(torch.tensor(float(value)))

    def forward(self, inputs: Tensor) -> Tensor:
        return clip(inputs, self.clip_value_min, self.clip_value_max)
