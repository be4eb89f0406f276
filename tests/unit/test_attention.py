"""The attention rules, each on a minimal block: QuantMultiheadAttention, matmul/einsum roles and the moved scale,
scaled_dot_product_attention routing, run-time attention (Swin's fx-wrapped function, untraceable HF modules),
and the transformer residual rule. With every quantizer off, each rewrite computes the float function."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import trtquant
from trtquant.nn.attention import QuantMultiheadAttention
from trtquant.placement import attention as A
from trtquant.placement.fx_pass import placement_report
from trtquant.quantizer import TensorQuantizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _transformers import HFStyleLayer  # noqa: E402


def _all_off(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, TensorQuantizer):
            m.disable()
    return model


def _rules(model: nn.Module) -> dict:
    return {e["quantizer"]: e["rule"] for e in placement_report(model)["quantizers"] if e["enabled"]}


@pytest.mark.parametrize("batch_first", [True, False])
def test_quant_mha_is_nn_mha_with_quantizers_off(batch_first):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    q = _all_off(QuantMultiheadAttention.from_float(copy.deepcopy(ref)))
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    mem = torch.randn(2, 7, 16) if batch_first else torch.randn(7, 2, 16)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, -2:] = True
    one = x[0] if batch_first else x[:, 0]
    cases = [((x, x, x), {}), ((x, mem, mem), {}), ((x, x, x), {"attn_mask": causal}),
             ((x, x, x), {"key_padding_mask": pad, "average_attn_weights": False}),
             ((x, x, x), {"attn_mask": torch.randn(5, 5)}), ((one, one, one), {})]
    with torch.no_grad():
        for args, kw in cases:
            (a, wa), (b, wb) = ref(*args, **kw), q(*args, **kw)
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(wb, wa, atol=1e-6, rtol=1e-5)


def test_encoder_layer_fast_path_is_not_taken_under_no_grad():
    """PyTorch's fused encoder path reads the float weights; the quantized path must run (and calibrate)."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 1,
                                enable_nested_tensor=False).eval()
    trtquant.quantize(enc)
    with torch.no_grad():
        trtquant.calibrate(enc, [torch.randn(2, 6, 16)], method="max", progress=False)
    attn = enc.layers[0].self_attn
    assert isinstance(attn, QuantMultiheadAttention) and isinstance(attn.out_proj, nn.Linear)
    for name in ("input_quantizer", "weight_quantizer", "q_bmm_quantizer", "k_bmm_quantizer", "softmax_quantizer",
                 "v_bmm_quantizer"):
        assert getattr(attn, name).amax is not None, name
    assert float(attn.softmax_quantizer.amax) <= 1.0  # max calibration of probabilities
    assert attn.out_proj.input_quantizer.amax is not None


@pytest.mark.parametrize("eq, transpose", [
    ("bhid,bhjd->bhij", True), ("B G H I D, B G H J D -> B G H I J", True), ("bhij,bhjd->bhid", False),
    ("ij,jk->ik", False), ("bid,bjd->bij", True),
    ("bhid,bhjd->bhji", None), ("bid,bjd->bd", None), ("bii,bij->bij", None), ("bhid,bhjd", None),
])
def test_einsum_as_matmul(eq, transpose):
    assert A.einsum_as_matmul(eq) is transpose


class EinsumAttention(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        p = torch.einsum("bhid,bhjd->bhij", q * 0.25, k).softmax(-1)
        return torch.einsum("bhij,bhjd->bhid", p, v).squeeze(1)


@pytest.mark.parametrize("block, rules", [
    (lambda: HFStyleLayer(16, 2), (A.RULE_QK, A.RULE_PV)),
    (lambda: HFStyleLayer(16, 2, sdpa=True), (A.RULE_SDPA,)),
    (EinsumAttention, (A.RULE_QK, A.RULE_PV)),
])
def test_traced_attention_roles_and_float_equivalence(block, rules):
    torch.manual_seed(0)
    ref = block().eval()
    q = trtquant.quantize(copy.deepcopy(ref))
    placed = _rules(q)
    bmm = {n: r for n, r in placed.items() if r in (A.RULE_QK, A.RULE_PV, A.RULE_SDPA)}
    assert sorted(n.rsplit(".", 1)[-1] for n in bmm) == sorted(
        ["q_bmm_quantizer", "k_bmm_quantizer", "softmax_quantizer", "v_bmm_quantizer"])
    assert set(bmm.values()) == set(rules)
    if A.RULE_QK in rules:  # Q·Kᵀ inputs are Q and Kᵀ, P·V inputs the softmax output and V, whatever the order
        assert placed[next(n for n in bmm if n.endswith("q_bmm_quantizer"))] == A.RULE_QK
        assert placed[next(n for n in bmm if n.endswith("softmax_quantizer"))] == A.RULE_PV
    x = torch.randn(2, 5, 16)
    with torch.no_grad():  # the scale moved before Q·Kᵀ, einsum as MatMul: the same function
        torch.testing.assert_close(_all_off(q)(x), ref(x), atol=1e-5, rtol=1e-5)


def test_hf_scale_moves_before_the_first_matmul():
    """``matmul(q, kᵀ) / c`` becomes ``matmul(Q(q / c), Q(kᵀ))``: TensorRT wants Q scaled before Q·Kᵀ."""
    import operator

    from trtquant.placement.fx_pass import trace_quantized

    q = trtquant.quantize(nn.Sequential(HFStyleLayer(16, 2)).eval())
    graph = trace_quantized(q[0])
    quantized_q = next(n for n in graph.nodes if n.op == "call_module" and n.target == "q_bmm_quantizer")
    assert quantized_q.args[0].target is operator.truediv
    scores = next(n for n in graph.nodes if n.op == "call_function" and n.target is torch.matmul)
    assert all(u.target is not operator.truediv for u in scores.users)


def test_swin_attention_in_a_wrapped_function_is_quantized_at_run_time():
    tv = pytest.importorskip("torchvision.models.swin_transformer")
    torch.manual_seed(0)
    ref = tv.ShiftedWindowAttention(16, [4, 4], [2, 2], 2).eval()
    model = nn.Sequential(ref)
    q = trtquant.quantize(copy.deepcopy(model))
    placed = _rules(q)
    assert placed["0.qkv.input_quantizer"] == A.RULE_ROUTED and placed["0.proj.weight_quantizer"] == A.RULE_ROUTED
    assert sum(r == A.RULE_FUNCTIONAL for r in placed.values()) == 4
    x = torch.randn(2, 8, 8, 16)
    trtquant.calibrate(q, [x], method="max", progress=False)
    attn = q[0]
    for name in ("qkv.input_quantizer", "proj.input_quantizer", "q_bmm_quantizer", "softmax_quantizer"):
        assert attn.get_submodule(name).amax is not None, name
    assert float(attn.softmax_quantizer.amax) <= 1.0  # P·V got the softmax output, not K
    with torch.no_grad():
        torch.testing.assert_close(_all_off(q)(x), model(x), atol=1e-5, rtol=1e-5)


def test_untraceable_attention_module_is_quantized_at_run_time():
    class SelfAttention(HFStyleLayer):  # branches on a shape: torch.fx cannot trace it
        def forward(self, x):
            if x.shape[1] > 1:
                return super().forward(x)
            return x

    torch.manual_seed(0)
    ref = nn.Sequential(SelfAttention(16, 2)).eval()
    q = trtquant.quantize(copy.deepcopy(ref))
    assert sum(r == A.RULE_FUNCTIONAL for r in _rules(q).values()) == 4
    x = torch.randn(2, 5, 16)
    trtquant.calibrate(q, [x], method="max", progress=False)
    assert q[0].v_bmm_quantizer.amax is not None and float(q[0].softmax_quantizer.amax) <= 1.0
    with torch.no_grad():
        torch.testing.assert_close(_all_off(q)(x), ref(x), atol=1e-5, rtol=1e-5)


def test_transformer_residual_add_gets_no_identity_quantizer():
    """A Linear branch is not a Conv+Add fusion: no quantizer on the residual stream (ops.RESIDUAL_SOURCES)."""
    q = trtquant.quantize(HFStyleLayer(16, 2).eval())
    assert not [n for n, r in _rules(q).items() if "residual" in r]


def test_overrides_reach_the_quantizers_placement_adds():
    """QuantConfig overrides by module name apply to attention, functional-call and residual quantizers too."""
    from trtquant.config import QuantConfig
    from trtquant.descriptor import QuantDescriptor

    special = QuantDescriptor(num_bits=8, calib_method="max", unsigned=False, narrow_range=True)
    cfg = QuantConfig(overrides={"1": {"input": special}})
    q = trtquant.quantize(nn.Sequential(HFStyleLayer(16, 2), HFStyleLayer(16, 2)).eval(), cfg)
    for block, expect in (("0", False), ("1", True)):
        for name in ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer"):
            assert q.get_submodule(f"{block}.{name}").quant_desc.narrow_range is expect, (block, name)
