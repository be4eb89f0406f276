"""load_state_dict(): ``model.load_state_dict`` with mismatches explained per module, and common causes named."""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from .errors import CheckpointError
from .quantizer import TensorQuantizer

_LEGACY = ("._input_quantizer.", "._weight_quantizer.")
_MAX_MODULES, _MAX_KEYS = 12, 6  # report size limits


def _strip(state_dict: Mapping[str, object], prefix: Optional[str]) -> Dict[str, object]:
    if not prefix:
        return dict(state_dict)
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def _canonical(key: str) -> str:
    for old in _LEGACY:
        key = key.replace(old, "." + old[2:])
    return key


def _locate(modules: Dict[str, nn.Module], key: str) -> Tuple[str, str]:
    """(``path (Type)`` of the deepest existing module that owns ``key``, the rest of the key)."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:i])
        if path in modules:
            return f"{path} ({type(modules[path]).__name__})", ".".join(parts[i:])
    path = ".".join(parts[:-1])
    if not path:
        return f"<root> ({type(modules['']).__name__})", key
    return f"{path} (not in model)", parts[-1]


def _hints(model: nn.Module, ckpt_keys: List[str], missing: List[str], unexpected: List[str]) -> List[str]:
    model_keys, hints = list(model.state_dict()), []
    if any("_packed_params" in k for k in ckpt_keys):
        hints.append("keys with '_packed_params' come from a torch.ao quantized model (after convert()); its packed "
                     "int8 weights cannot be loaded: load the float checkpoint instead, then quantize and calibrate")
    for prefix in ("module.", "_orig_mod."):
        if ckpt_keys and all(k.startswith(prefix) for k in ckpt_keys) and not any(k.startswith(prefix) for k in model_keys):
            who = "DataParallel/DistributedDataParallel" if prefix == "module." else "torch.compile"
            hints.append(f"every checkpoint key starts with '{prefix}' (saved from {who}): pass strip_prefix='{prefix}'")
    if any("_quantizer." in k for k in unexpected):
        if not any(isinstance(m, TensorQuantizer) for m in model.modules()):
            hints.append("the checkpoint has quantizer state (amax) but the model has no quantizers: call "
                         "trtquant.quantize(model) before loading (pytorch-quantization's _input_quantizer/"
                         "_weight_quantizer names are mapped by the quantized layers)")
        else:
            hints.append("quantizer keys for layers that are not quantized in this model: quantize it with the same "
                         "include/exclude/config as the model that was saved")
    return hints


def _report(model: nn.Module, ckpt_keys: List[str], missing: List[str], unexpected: List[str],
            shapes: List[Tuple[str, tuple, tuple]], errors: List[str]) -> str:
    modules = dict(model.named_modules())
    groups: Dict[str, List[str]] = defaultdict(list)
    for kind, keys in (("missing", missing), ("unexpected", unexpected)):
        for k in keys:
            label, leaf = _locate(modules, k)
            groups[label].append(f"{kind} {leaf}")
    for k, got, want in shapes:
        label, leaf = _locate(modules, k)
        groups[label].append(f"shape {leaf}: checkpoint {got} vs model {want}")
    counts = [f"{n} {what}" for n, what in ((len(missing), "missing"), (len(unexpected), "unexpected"),
                                            (len(shapes), "shape-mismatched"), (len(errors), "invalid")) if n]
    lines = [f"checkpoint does not match {type(model).__name__}: {', '.join(counts)} key(s)"]
    lines += [f"hint: {h}" for h in _hints(model, ckpt_keys, missing, unexpected)]
    for path in list(groups)[:_MAX_MODULES]:
        items = groups[path]
        more = f", ... {len(items) - _MAX_KEYS} more" if len(items) > _MAX_KEYS else ""
        lines.append(f"  {path}: {', '.join(items[:_MAX_KEYS])}{more}")
    if len(groups) > _MAX_MODULES:
        lines.append(f"  ... and {len(groups) - _MAX_MODULES} more module(s)")
    lines += [f"  error: {e}" for e in errors]
    return "\n".join(lines)


_BIASABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def _add_missing_biases(model: nn.Module, sd: Mapping[str, object]) -> None:
    """Give a bias-free Conv/Linear the bias the checkpoint holds for it: bias correction (``trtquant.ptq``)
    creates one, so a corrected model's state dict must load into a freshly built one."""
    modules = dict(model.named_modules())
    for k, v in sd.items():
        key = _canonical(k)
        if not key.endswith(".bias") or not isinstance(v, torch.Tensor) or v.dim() != 1:
            continue
        m = modules.get(key[: -len(".bias")])
        if isinstance(m, _BIASABLE) and m.bias is None:
            out = m.weight.shape[1] * m.groups if isinstance(m, nn.modules.conv._ConvTransposeNd) else m.weight.shape[0]
            if v.numel() == out:
                m.bias = nn.Parameter(torch.zeros(out, dtype=m.weight.dtype, device=m.weight.device))


def load_state_dict(model: nn.Module, state_dict: Mapping[str, object], strict: bool = True,
                    strip_prefix: Optional[str] = None) -> _IncompatibleKeys:
    """Load ``state_dict`` into ``model``; on a real mismatch raise CheckpointError naming keys and modules.

    Args:
        strict: missing or unexpected keys are errors (shape mismatches and invalid amax always are).
        strip_prefix: remove this prefix from the keys first (e.g. ``"module."`` from DataParallel).

    Shapes are checked before anything is loaded; missing/unexpected keys are known only after the
    layers have read their entries, so with ``strict=True`` the model may already hold the matching
    part when the error is raised (as with torch's own ``load_state_dict``).
    """
    sd = _strip(state_dict, strip_prefix)
    _add_missing_biases(model, sd)
    own = model.state_dict()
    shapes = []
    for k, v in sd.items():
        target = own.get(_canonical(k))
        if isinstance(v, torch.Tensor) and isinstance(target, torch.Tensor) and v.shape != target.shape:
            if k.endswith("._amax") and v.numel() == target.numel():
                continue  # per-channel amax as (C,) or (C, 1, 1, 1): the quantizer accepts both
            shapes.append((k, tuple(v.shape), tuple(target.shape)))
    if shapes:
        raise CheckpointError(_report(model, list(sd), [], [], shapes, []))
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # invalid amax, or a layer's own check
        errors = [line.strip() for line in str(e).splitlines()[1:] if line.strip()] or [str(e)]
        raise CheckpointError(_report(model, list(sd), [], [], [], errors)) from None
    if strict and (result.missing_keys or result.unexpected_keys):
        raise CheckpointError(_report(model, list(sd), result.missing_keys, result.unexpected_keys, [], []))
    return result
