"""compare(): ONNX Runtime (CPU) against the PyTorch fake-quant model on the same inputs."""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Union

import numpy as np
import torch
from torch import nn

TARGET_KEY = "trtquant.target"  # metadata export_onnx writes: which runtime the graph is for


@dataclass
class OutputComparison:
    name: str
    max_abs_error: float
    rel_l2: float
    cosine: float
    top1_agreement: Optional[float]  # for [N, C] logits; None otherwise


@dataclass
class Comparison:
    outputs: List[OutputComparison]
    num_samples: int
    graph_optimization: str
    int8_conv_fraction: Optional[float] = None
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def format_table(self) -> str:
        head = "| output | max abs err | rel L2 | cosine | top-1 agree |\n|---|---|---|---|---|"
        rows = [
            f"| {o.name} | {o.max_abs_error:.4g} | {o.rel_l2:.3e} | {o.cosine:.6f} | "
            f"{'-' if o.top1_agreement is None else f'{100 * o.top1_agreement:.2f}%'} |"
            for o in self.outputs
        ]
        return "\n".join([head, *rows, *(f"\n{n}" for n in self.notes)])


def ort_session(onnx_path: Union[str, os.PathLike], optimize: bool = False, threads: Optional[int] = None,
                optimized_model_path: Optional[str] = None):
    """A CPU InferenceSession; ``optimize=False`` runs Q/DQ literally (parity), True lets ORT fuse INT8 kernels."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads:
        so.intra_op_num_threads = threads
    if optimized_model_path:
        so.optimized_model_filepath = str(optimized_model_path)
    return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])


def metrics(name: str, ref: np.ndarray, out: np.ndarray) -> OutputComparison:
    r = ref.astype(np.float64).ravel()
    o = out.astype(np.float64).ravel()
    diff = o - r
    denom = np.linalg.norm(r)
    rel = float(np.linalg.norm(diff) / denom) if denom > 0 else float(np.linalg.norm(diff))
    cos_den = np.linalg.norm(r) * np.linalg.norm(o)
    cos = float(r @ o / cos_den) if cos_den > 0 else 1.0
    top1 = None
    if ref.ndim == 2 and ref.shape[1] > 1:
        top1 = float((ref.argmax(1) == out.argmax(1)).mean())
    return OutputComparison(name, float(np.abs(diff).max()) if diff.size else 0.0, rel, cos, top1)


def compare(model: nn.Module, onnx_path: Union[str, os.PathLike], inputs: Union[torch.Tensor, Iterable[Any]],
            optimize: bool = False, batch_size: Optional[int] = None, int8_kernels: bool = True) -> Comparison:
    """Run ``inputs`` (a tensor, or batches of tensors/tuples) through both and compare every output.

    A graph exported with target='onnxruntime' is compared with the ONNX Runtime flavour of
    ``model`` (what it computes). ``int8_kernels`` also reports how many Conv layers ONNX Runtime's
    optimized graph runs as INT8 kernels (one extra optimized session).
    """
    sess = ort_session(onnx_path, optimize=optimize)
    notes: List[str] = []
    if onnx_target(sess) == "onnxruntime":
        # That graph computes what the ONNX Runtime flavour of the model computes (unsigned post-ReLU
        # quantizers, folded BatchNorm, int32 biases), not the TensorRT fake quant: compare with it.
        from .ort_flavor import ort_flavor_

        model = ort_flavor_(copy.deepcopy(model))
        notes.append("reference: the ONNX Runtime flavour of the model (export target 'onnxruntime')")
        from .ort_graph import WEIGHTS_KEY, host_weight_dtype

        weights = sess.get_modelmeta().custom_metadata_map.get(WEIGHTS_KEY, "int8")
        if optimize and weights == "int8" and host_weight_dtype() == "uint8":
            notes.append("int8 weights on an x86-64 CPU without VNNI: ONNX Runtime's u8s8 kernels saturate "
                         "int16 pair sums here, so fused results drift; export with ort_weights='uint8' (or "
                         "'auto') for exact kernels on this CPU")
    fraction = None
    if int8_kernels:
        fraction = int8_kernel_fraction(onnx_path)
        if fraction is not None:
            notes.append(f"Conv layers ONNX Runtime runs as INT8 kernels (optimized graph): {fraction[0]}/{fraction[1]}")
    in_names = [i.name for i in sess.get_inputs()]
    out_names = [o.name for o in sess.get_outputs()]
    batches = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    refs: List[List[np.ndarray]] = [[] for _ in out_names]
    outs: List[List[np.ndarray]] = [[] for _ in out_names]
    model = model.eval()
    n = 0
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for batch in batches:
        args = batch if isinstance(batch, (tuple, list)) else (batch,)
        args = tuple(args[: len(in_names)])
        with torch.no_grad():
            ref = model(*[a.to(device) for a in args])
        ref_t = ref if isinstance(ref, (tuple, list)) else (ref,)
        feed = {k: a.detach().cpu().numpy() for k, a in zip(in_names, args)}
        got = sess.run(out_names, feed)
        for i in range(len(out_names)):
            refs[i].append(ref_t[i].detach().float().cpu().numpy())
            outs[i].append(np.asarray(got[i], dtype=np.float32))
        n += int(args[0].shape[0])
    result = [metrics(name, np.concatenate(refs[i]), np.concatenate(outs[i])) for i, name in enumerate(out_names)]
    return Comparison(result, n, "ORT_ENABLE_ALL" if optimize else "ORT_DISABLE_ALL",
                      None if not fraction else fraction[0] / fraction[1], notes)


def onnx_target(sess) -> Optional[str]:
    """The ``target`` export_onnx wrote into a session's model ('tensorrt' / 'onnxruntime'), else None."""
    return sess.get_modelmeta().custom_metadata_map.get(TARGET_KEY)


def optimized_graph(onnx_path: Union[str, os.PathLike], threads: Optional[int] = None):
    """The graph ONNX Runtime's CPU provider actually runs (ORT_ENABLE_ALL), as an onnx.ModelProto."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as d:
        opt = os.path.join(d, "optimized.onnx")
        ort_session(onnx_path, optimize=True, threads=threads, optimized_model_path=opt)
        return onnx.load(opt)


def int8_kernel_fraction(onnx_path: Union[str, os.PathLike]) -> Optional[tuple]:
    """(Conv layers ONNX Runtime's CPU provider runs as INT8 kernels, all Conv layers), None without convs."""
    from .ort_graph import int8_conv_fraction

    n_int8, n_conv = int8_conv_fraction(optimized_graph(onnx_path))
    return (n_int8, n_conv) if n_conv else None
