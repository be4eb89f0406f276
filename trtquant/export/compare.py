"""compare(): ONNX Runtime (CPU) against the PyTorch fake-quant model on the same inputs."""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..outputs import flatten_outputs
from .parity import (
    TeacherForcedReport, cosine, layer_noise, relative_l2, teacher_forced as teacher_forced_parity, with_relative_noise,
)

TARGET_KEY = "trtquant.target"  # metadata export_onnx writes: which runtime the graph is for


@dataclass
class OutputComparison:
    """ONNX Runtime against PyTorch on one output leaf, next to PyTorch against itself under input noise."""

    name: str  # the output leaf (trtquant.outputs.flatten_outputs): 'output', 'out', 'aux', '1.boxes'
    max_abs_error: float
    rel_l2: float
    cosine: float
    top1_agreement: Optional[float]  # for [N, C] logits; None otherwise
    onnx_name: Optional[str] = None  # the ONNX graph output it was paired with
    # The chaos floor: the fake-quant model's own change when its input and every activation
    # quantizer's input move by ``input_noise`` (relative; parity.layer_noise). A quantized network
    # amplifies every rounding flip, so ONNX Runtime (another summation order at every layer) can
    # only be expected to match PyTorch about as closely as PyTorch matches itself here.
    noise_rel_l2: Optional[float] = None
    noise_cosine: Optional[float] = None


@dataclass
class Comparison:
    outputs: List[OutputComparison]
    num_samples: int
    graph_optimization: str
    int8_conv_fraction: Optional[float] = None
    notes: List[str] = field(default_factory=list)
    input_noise: Optional[float] = None  # relative input noise of the chaos floor; None: not measured
    teacher_forced: Optional[TeacherForcedReport] = None  # per-Q-node code parity (compare(teacher_forced=True))

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        if self.teacher_forced is not None:
            d["teacher_forced"] = self.teacher_forced.to_dict()
        return d

    def format_table(self) -> str:
        head = ("| output | max abs err | rel L2 | cosine | top-1 agree | noise rel L2 | noise cosine |\n"
                "|---|---|---|---|---|---|---|")
        rows = [
            f"| {o.name} | {o.max_abs_error:.4g} | {o.rel_l2:.3e} | {o.cosine:.6f} | "
            f"{'-' if o.top1_agreement is None else f'{100 * o.top1_agreement:.2f}%'} | "
            f"{'-' if o.noise_rel_l2 is None else f'{o.noise_rel_l2:.3e}'} | "
            f"{'-' if o.noise_cosine is None else f'{o.noise_cosine:.6f}'} |"
            for o in self.outputs
        ]
        notes = list(self.notes)
        if self.input_noise is not None:
            notes.insert(0, f"noise columns: the PyTorch model against itself under {self.input_noise:g} relative noise "
                            "at its input and every activation quantizer's input (the chaos floor ONNX Runtime "
                            "is judged against)")
        if self.teacher_forced is not None:
            tf = self.teacher_forced
            notes.append(tf.summary())
            notes.extend(f"  {n.node} ({n.quantizer or 'graph grid'}): {n.mismatched}/{n.codes} codes differ, "
                         f"up to {n.max_diff}" for n in tf.worst(3) if n.mismatched)
        return "\n".join([head, *rows, *(f"\n{n}" for n in notes)])


def ort_session(onnx_path: Union[str, os.PathLike], optimize: bool = False, threads: Optional[int] = None,
                optimized_model_path: Optional[str] = None) -> Any:
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
            optimize: bool = False, batch_size: Optional[int] = None, int8_kernels: bool = True,
            teacher_forced: bool = False, input_noise: Optional[float] = 1e-6, noise_seed: int = 0) -> Comparison:
    """Run ``inputs`` (a tensor, or batches of tensors/tuples) through both and compare every output.

    Outputs of any structure (a tensor, tuples, dicts such as segmentation models' ``out``/``aux``,
    namedtuples, nested) are flattened with :func:`trtquant.outputs.flatten_outputs` and reported per
    leaf; ONNX output ``i`` is leaf ``i``, the order torch.onnx writes them.

    A graph exported with target='onnxruntime' is compared with the ONNX Runtime flavour of
    ``model`` (what it computes). ``int8_kernels`` also reports how many Conv layers ONNX Runtime's
    optimized graph runs as INT8 kernels (one extra optimized session).

    Args:
        teacher_forced: also check every activation QuantizeLinear on ONNX Runtime's own float input
            (first batch; :func:`trtquant.export.parity.teacher_forced`): the check that fails on a
            wrong scale even where end-to-end numbers cannot tell it from chaos.
        input_noise: measure the chaos floor: each output's rel L2 and cosine between the PyTorch
            model on the inputs and the model with this much relative Gaussian noise added to the
            inputs and to every activation quantizer's input (:func:`~trtquant.export.parity.layer_noise`,
            seeded by ``noise_seed``); None skips it (one extra PyTorch pass).
    """
    sess = ort_session(onnx_path, optimize=optimize)
    notes: List[str] = []
    batches = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    if not batches:
        raise ValueError("compare needs at least one batch of inputs")
    if onnx_target(sess) == "onnxruntime":
        # That graph computes what the ONNX Runtime flavour of the model computes (unsigned post-ReLU
        # quantizers, folded BatchNorm, int32 biases), not the TensorRT fake quant: compare with it.
        from .ort_flavor import ort_flavor_

        first = batches[0] if isinstance(batches[0], (tuple, list)) else (batches[0],)
        model = ort_flavor_(copy.deepcopy(model), tuple(first[: len(sess.get_inputs())]))
        notes.append("reference: the ONNX Runtime flavour of the model (export target 'onnxruntime')")
        from .ort_graph import FLOAT_OPS_KEY, WEIGHTS_KEY, host_weight_dtype

        meta = sess.get_modelmeta().custom_metadata_map
        if meta.get(FLOAT_OPS_KEY):
            notes.append(f"ops ONNX Runtime has no INT8 kernel for, kept float between a DQ and a Q: "
                         f"{meta[FLOAT_OPS_KEY].replace(',', ', ')}")
        weights = meta.get(WEIGHTS_KEY, "int8")
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
    leaves: List[str] = []
    refs: List[List[np.ndarray]] = [[] for _ in out_names]
    outs: List[List[np.ndarray]] = [[] for _ in out_names]
    noisy: List[List[Tensor]] = [[] for _ in out_names]
    model = model.eval()
    n = 0
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    first_args: Tuple[Tensor, ...] = ()
    for b, batch in enumerate(batches):
        args = batch if isinstance(batch, (tuple, list)) else (batch,)
        args = tuple(args[: len(in_names)])
        first_args = first_args or args
        with torch.no_grad():
            named = flatten_outputs(model(*[a.to(device) for a in args]))
            if input_noise is not None:
                shaken = [with_relative_noise(a, input_noise, seed=1000 * noise_seed + b)
                          if a.is_floating_point() else a for a in args]
                with layer_noise(model, input_noise, seed=1000 * noise_seed + b):
                    shaken_out = model(*[a.to(device) for a in shaken])
                for i, (_, t) in enumerate(flatten_outputs(shaken_out)[: len(out_names)]):
                    noisy[i].append(t.detach().float().cpu())
        if not leaves:
            leaves = [name for name, _ in named]
            _check_outputs(leaves, out_names, onnx_path)
        feed = {k: a.detach().cpu().numpy() for k, a in zip(in_names, args)}
        got = sess.run(out_names, feed)
        for i in range(len(out_names)):
            refs[i].append(named[i][1].detach().float().cpu().numpy())
            outs[i].append(np.asarray(got[i], dtype=np.float32))
        n += int(args[0].shape[0])
    result = []
    for i, onnx_name in enumerate(out_names):
        ref = np.concatenate(refs[i])
        res = metrics(leaves[i], ref, np.concatenate(outs[i]))
        res.onnx_name = onnx_name
        if input_noise is not None:
            shaken_out, clean = torch.cat(noisy[i]), torch.from_numpy(ref)
            res.noise_rel_l2, res.noise_cosine = relative_l2(shaken_out, clean), cosine(shaken_out, clean)
        result.append(res)
    report = teacher_forced_parity(model, onnx_path, first_args) if teacher_forced else None
    return Comparison(result, n, "ORT_ENABLE_ALL" if optimize else "ORT_DISABLE_ALL",
                      None if not fraction else fraction[0] / fraction[1], notes, input_noise, report)


def _check_outputs(leaves: List[str], out_names: List[str], onnx_path: Union[str, os.PathLike]) -> None:
    """The model's output leaves and the graph's outputs must pair one to one."""
    if len(leaves) != len(out_names):
        raise ValueError(f"{onnx_path}: the graph has {len(out_names)} output(s) ({', '.join(out_names)}) but the model "
                         f"returns {len(leaves)} tensor(s) ({', '.join(leaves)}); compare the model the graph was "
                         "exported from")


def onnx_target(sess: Any) -> Optional[str]:
    """The ``target`` export_onnx wrote into a session's model ('tensorrt' / 'onnxruntime'), else None."""
    return sess.get_modelmeta().custom_metadata_map.get(TARGET_KEY)


def optimized_graph(onnx_path: Union[str, os.PathLike], threads: Optional[int] = None) -> Any:
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
