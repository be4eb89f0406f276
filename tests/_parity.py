"""Shared helpers of the export flow tests: BN re-estimation, calibrated torchvision models, ONNX probes.

Building and calibrating a torchvision model is the expensive part of the export tests, so
:func:`calibrated` and :func:`exported` cache their results for the whole pytest process (the
calibrated model is shared: tests must not modify it - export deep-copies it).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Sequence, Set, Tuple

import numpy as np
import torch
from torch import nn

import trtquant
from trtquant.export import parity
from trtquant.graph.dag import residual_split
from trtquant.graph.index import GraphIndex
from trtquant.graph.onnx_dag import OnnxDag

_TMP = Path(tempfile.mkdtemp(prefix="trtquant-flows-"))
atexit.register(shutil.rmtree, _TMP, True)

#: Input size per model: 64x64 everywhere except Inception v3, whose stem needs >= 75x75.
SIZES = {"resnet18": 64, "resnet50": 64, "mobilenet_v2": 64, "inception_v3": 96}


def image_batches(n_batches: int, batch: int, size: int, seed: int) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(n_batches)]


def reestimate_bn(model: nn.Module, batches: Sequence[torch.Tensor]) -> nn.Module:
    """Replace every BatchNorm's running statistics by the cumulative average over ``batches``.

    A random-init network with default BN statistics (mean 0, var 1) is chaotic: activations grow or
    vanish layer by layer and single rounding flips get amplified to different top-1 classes. BN
    statistics estimated on the calibration data make it a well-conditioned network.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average
    was_training = model.training
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    model.train(was_training)
    return model.eval()


def float_model(name: str) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    if name == "inception_v3":
        return torchvision.models.inception_v3(aux_logits=False, init_weights=False).eval()
    return getattr(torchvision.models, name)().eval()


def calib_batches(name: str) -> List[torch.Tensor]:
    """Calibration (and BN re-estimation) data: 16 images for ResNet-18 (the parity model), 8 elsewhere."""
    return image_batches(2, 8 if name == "resnet18" else 4, SIZES[name], seed=1)


@functools.lru_cache(maxsize=None)
def calibrated(name: str, method: str = "max") -> nn.Module:
    """torchvision ``name``, random init, BN re-estimated on the calibration data, quantized, calibrated."""
    model = float_model(name)
    data = calib_batches(name)
    reestimate_bn(model, data)
    trtquant.quantize(model)
    trtquant.calibrate(model, data, method=method, progress=False)
    return model.eval()


@functools.lru_cache(maxsize=None)
def exported(name: str, exporter: str, method: str = "max") -> Path:
    """The fp32 Q/DQ ONNX of :func:`calibrated` (dynamic batch), written once per process."""
    from trtquant.export.onnx import export_onnx

    model = calibrated(name, method)
    size = SIZES[name]
    path = _TMP / f"{name}-{method}-{exporter}.onnx"
    export_onnx(model, torch.zeros(1, 3, size, size), path, exporter=exporter, dtype="fp32")
    return path


# ---- ONNX probing ---------------------------------------------------------------------------------

def index(model) -> GraphIndex:
    """The shared graph model (producers, consumers, constants) of an ONNX model."""
    return GraphIndex(model)


class _Constants(Mapping):
    """Constant tensors of a graph by name, as :meth:`GraphIndex.const` resolves them (initializers,
    Constant nodes, and constants seen through Identity/Cast/Transpose/Reshape/...)."""

    def __init__(self, g: GraphIndex) -> None:
        self._g = g

    def __getitem__(self, name: str) -> np.ndarray:
        value = self._g.const(name)
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return (t for t in dict.fromkeys([*self._g.initializers, *self._g.producer]) if self._g.const(t) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def qdq_probe_outputs(model, qnodes) -> Tuple[Dict[str, int], Dict[str, list]]:
    """Extra outputs exposing each Q's float input, codes and DQ outputs: :func:`trtquant.export.parity.qdq_probe_outputs`."""
    return parity.qdq_probe_outputs(model, qnodes)


def probe_values(model, extra: Dict[str, int], probe_path, x: torch.Tensor) -> Dict[str, np.ndarray]:
    """Run ``model`` with ``extra`` exposed as outputs (ONNX Runtime, optimisations off) on ``x``:
    every output by name, plus ``"input"``."""
    return parity.run_with_outputs(model, extra, {"input": x.numpy()}, probe_path)


def constants(model) -> Mapping[str, np.ndarray]:
    """Constant tensors by name (initializers, Constant-node outputs, constants through passthrough ops)."""
    return _Constants(index(model))


# The probes live in the library (trtquant.export.parity); these names stay for the flow tests.
activation_quantize_nodes = parity.activation_quantize_nodes
with_extra_outputs = parity.with_extra_outputs
amax_for_scale = parity.amax_for_scale
relative_l2 = parity.relative_l2
with_relative_noise = parity.with_relative_noise


# ---- graph structure --------------------------------------------------------------------------

def producers(model) -> Dict[str, object]:
    g = index(model)
    return {t: g.nodes[i] for t, i in g.producer.items()}


def conv_distances(model, tensor: str, g: "GraphIndex | None" = None) -> Dict[str, int]:
    """For every ancestor tensor of ``tensor``: the fewest Conv nodes on a path from it to ``tensor``.

    Constant inputs (weights, scales, zero points) are not followed.
    """
    g = g or index(model)
    best: Dict[str, int] = {tensor: 0}
    frontier = [tensor]
    while frontier:
        nxt = []
        for t in frontier:
            node = g.producer_of(t)
            if node is None:
                continue
            step = 1 if node.op_type == "Conv" else 0
            # A Conv's data input only (not its weight/bias); other ops: every non-constant input.
            ins = [node.input[0]] if node.op_type == "Conv" else [i for i in node.input if i and g.const(i) is None]
            for i in ins:
                d = best[t] + step
                if i not in best or d < best[i]:
                    best[i] = d
                    nxt.append(i)
        frontier = nxt
    return best


def identity_input(model, add) -> Tuple[int, Tuple[int, int]]:
    """Index of the residual Add input that is the identity, by the shared rule
    (:func:`trtquant.graph.dag.residual_split`, the one placement and the checker use).

    Returns (index, (convs on input 0's path, convs on input 1's path)) - the Conv counts back to the
    inputs' common ancestor, for the caller's structural assertions.
    """
    g = index(model)
    split = residual_split(OnnxDag(g), g.producer[add.output[0]])
    assert split is not None, f"{add.name}: not a residual Add by the shared rule"
    d0, d1 = conv_distances(model, add.input[0], g), conv_distances(model, add.input[1], g)
    common: Set[str] = set(d0) & set(d1)
    assert common, f"{add.name}: the two Add inputs share no ancestor"
    lca = min(common, key=lambda t: (d0[t] + d1[t], t))
    return split.identity, (d0[lca], d1[lca])


def residual_adds(model) -> list:
    """Add nodes with two computed (non-constant) inputs."""
    g = index(model)
    return [n for n in g.nodes
            if n.op_type == "Add" and len(n.input) == 2 and all(g.const(i) is None for i in n.input)]
