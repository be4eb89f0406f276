"""CLI checkpoints: the model spec, how it was quantized, and its state dict, in one safe file.

Each CLI step (quantize -> calibrate -> export ...) rebuilds the same quantized architecture from
the spec and loads the state dict, so files hold tensors and plain data only (weights_only load).
"""

from __future__ import annotations

import importlib
import io
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..calib_cache import atomic_write_bytes
from ..convert import quantize
from ..errors import CheckpointError

FORMAT = "trtquant-checkpoint-v1"


def build_model(spec: str, weights: Optional[str] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """A recipe name from models/ or an importable ``module:function`` -> (float model, info)."""
    from .. import models

    if ":" in spec:
        mod_name, _, fn_name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import model constructor '{spec}': {e}") from None
        model = fn()
        if weights:
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return model.eval(), {"input_shape": None, "real_weights": bool(weights)}
    recipe = models.get(spec)
    model, real = recipe.create(weights=weights)
    return model, {"input_shape": list(recipe.input_shape), "real_weights": real}


def save(path: str, spec: str, weights: Optional[str], include: Optional[List[str]], exclude: Optional[List[str]],
         model: nn.Module, extra: Optional[Dict[str, Any]] = None) -> Path:
    payload = {"format": FORMAT, "spec": spec, "weights": weights, "include": include, "exclude": exclude,
               "state_dict": model.state_dict(), "extra": extra or {}}
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def load(path: str) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild the quantized model a checkpoint describes."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint; create one with 'trtquant quantize'") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable trtquant checkpoint ({e})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a trtquant CLI checkpoint (made by 'trtquant quantize')")
    model, info = build_model(payload["spec"], payload.get("weights"))
    quantize(model, include=payload.get("include"), exclude=payload.get("exclude"))
    from ..checkpoint import load_state_dict

    load_state_dict(model, payload["state_dict"], strict=True)
    info.update(payload)
    return model, info
