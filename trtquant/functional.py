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
    scale = amax32 / bound
    return torch.where(amax32 > 0, scale, torch.ones_like(scale))


def _qdq_reference(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """The definition, one op at a time: round(x / scale) saturated, times scale, with +0.0 for code 0."""
    q = torch.round(x / scale).clamp(qmin, qmax)
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


class _FakeTensorQuantFunction(torch.autograd.Function):
    """pytorch-quantization's ``fake_tensor_quant.apply(inputs, amax, num_bits, unsigned, narrow_range)``."""

    @staticmethod
    def forward(ctx, inputs: Tensor, amax: Tensor, num_bits: int = 8, unsigned: bool = False, narrow_range: bool = True):
        ctx.save_for_backward(inputs, amax)
        with torch.no_grad():
            return fake_quant(inputs, amax, num_bits, unsigned, narrow_range)

    @staticmethod
    def backward(ctx, grad_outputs: Tensor):
        inputs, amax = ctx.saved_tensors
        mask = inputs.abs() <= amax.to(inputs.dtype)
        return grad_outputs * mask.to(grad_outputs.dtype), None, None, None, None


class _TensorQuantFunction(torch.autograd.Function):
    """pytorch-quantization's ``tensor_quant.apply(inputs, amax, ...)`` -> (codes, scale) with STE."""

    @staticmethod
    def forward(ctx, inputs: Tensor, amax: Tensor, num_bits: int = 8, unsigned: bool = False, narrow_range: bool = True):
        ctx.save_for_backward(inputs, amax)
        codes, scale = quantize(inputs, amax, num_bits, unsigned, narrow_range)
        # pytorch-quantization returns the scale as codes-per-unit (bound / amax).
        return codes, 1.0 / scale

    @staticmethod
    def backward(ctx, grad_outputs: Tensor, grad_scale: Optional[Tensor]):
        inputs, amax = ctx.saved_tensors
        mask = inputs.abs() <= amax.to(inputs.dtype)
        return grad_outputs * mask.to(grad_outputs.dtype), None, None, None, None


fake_tensor_quant = _FakeTensorQuantFunction.apply
tensor_quant = _TensorQuantFunction.apply
