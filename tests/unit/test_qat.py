"""QAT: prepare_qat, learned amax (gets gradients, moves, lowers the loss), parameter groups without
weight decay for amax, frozen BatchNorm statistics, and one DDP step on CPU (gloo, 2 processes)."""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trtquant
from trtquant.errors import QuantizerNotCalibratedError
from trtquant.qat import (
    amax_param_groups, amax_parameters, clamp_learned_amax, freeze_bn_stats, prepare_qat, unfreeze_bn_stats,
)
from trtquant.states import get_state, set_state

import _qref as R


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def _data(n=2, seed=0, batch=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(n)]


def _calibrated(seed=0):
    torch.manual_seed(seed)
    m = trtquant.quantize(ConvNet()).eval()
    trtquant.calibrate(m, _data(), method="max", progress=False)
    return m


def test_prepare_qat_learns_activation_amax_only_and_keeps_state_dict_keys():
    m = _calibrated()
    keys = set(m.state_dict())
    prepare_qat(m, learn_amax=True)
    assert m.training and get_state(m) == "qat"
    assert m.conv.input_quantizer.learn_amax and m.fc.input_quantizer.learn_amax
    assert not m.conv.weight_quantizer.learn_amax and not m.fc.weight_quantizer.learn_amax
    assert set(m.state_dict()) == keys  # same '_amax' keys: checkpoints load either way
    assert {id(p) for p in amax_parameters(m)} == {id(m.conv.input_quantizer._amax), id(m.fc.input_quantizer._amax)}
    # and back: a plain quantized model loads the QAT checkpoint
    fresh = trtquant.quantize(ConvNet()).eval()
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.fc.input_quantizer.amax, m.fc.input_quantizer.amax.detach())


def test_prepare_qat_names_uncalibrated_quantizers():
    m = trtquant.quantize(ConvNet())
    with pytest.raises(QuantizerNotCalibratedError, match=r"conv\.input_quantizer"):
        prepare_qat(m)


def test_param_groups_separate_lr_and_no_weight_decay_for_amax():
    m = _calibrated()
    prepare_qat(m, learn_amax=True)
    groups = amax_param_groups(m, lr=0.1, amax_lr=0.01, weight_decay=0.5, momentum=0.0)
    by_name = {g["name"]: g for g in groups}
    assert by_name["amax"]["lr"] == 0.01 and by_name["amax"]["weight_decay"] == 0.0
    assert by_name["weights"]["weight_decay"] == 0.5
    assert by_name["no_decay"]["weight_decay"] == 0.0  # BN weight/bias, Linear bias
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters())  # each trainable parameter exactly once
    assert id(m.bn.weight) in {id(p) for p in by_name["no_decay"]["params"]}
    assert id(m.fc.bias) in {id(p) for p in by_name["no_decay"]["params"]}

    # One SGD step: amax moves by exactly -amax_lr * grad (no decay term), weights get decay.
    opt = torch.optim.SGD(groups)
    loss = m(_data(1, seed=3)[0]).square().mean()
    loss.backward()
    a = m.fc.input_quantizer._amax
    assert a.grad is not None and float(a.grad) != 0.0
    before, grad = a.detach().clone(), a.grad.clone()
    w_before, w_grad = m.fc.weight.detach().clone(), m.fc.weight.grad.clone()
    opt.step()
    assert torch.allclose(a.detach(), before - 0.01 * grad)
    assert torch.allclose(m.fc.weight.detach(), w_before - 0.1 * (w_grad + 0.5 * w_before))


def test_learned_amax_moves_and_loss_decreases_on_a_toy_problem():
    """A Linear whose input amax starts far too small (heavy clipping): learning amax alone recovers."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 16))
    student = trtquant.quantize(copy.deepcopy(teacher), placement=None)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(64, 16, generator=g) for _ in range(4)]
    trtquant.calibrate(student, xs, method="max", progress=False)
    q = student[0].input_quantizer
    q.amax = 0.4  # |x| ~ N(0, 1): most of the range is clipped
    for p in student.parameters():
        p.requires_grad_(False)  # only amax trains
    student.train()
    prepare_qat(student, learn_amax=True)
    opt = torch.optim.Adam(amax_param_groups(student, lr=0.0, amax_lr=0.05))
    losses = []
    for step in range(60):
        x = xs[step % len(xs)]
        loss = F.mse_loss(student(x), teacher(x))
        opt.zero_grad()
        loss.backward()
        assert q._amax.grad is not None
        opt.step()
        clamp_learned_amax(student)
        losses.append(float(loss.detach()))
    assert float(q.amax.detach()) > 1.0  # moved well away from the clipping value
    assert losses[-1] < 0.2 * losses[0]


def test_freeze_bn_stats_survives_train_and_unfreezes():
    m = _calibrated()
    prepare_qat(m)
    assert freeze_bn_stats(m) == 1
    m.train()  # would normally turn BN back to batch statistics
    mean = m.bn.running_mean.clone()
    m(_data(1, seed=4)[0] * 3 + 1)
    assert torch.equal(m.bn.running_mean, mean)
    assert unfreeze_bn_stats(m) == 1
    m.train()
    m(_data(1, seed=4)[0] * 3 + 1)
    assert not torch.equal(m.bn.running_mean, mean)


QUANTIZERS = {"conv.input_quantizer", "conv.weight_quantizer", "fc.input_quantizer", "fc.weight_quantizer"}


def _reference_forward(m: ConvNet, x: torch.Tensor) -> torch.Tensor:
    """ConvNet's eval forward with every quantizer replaced by the numpy reference (trtquant's amax only)."""
    qs = trtquant.quantizers(m)
    assert {n for n, q in qs.items() if q.is_enabled and q._if_quant} == QUANTIZERS

    def amax(name):
        return qs[name].amax.detach()

    h = F.conv2d(R.fake_quant(x, amax("conv.input_quantizer")),
                 R.fake_quant(m.conv.weight.detach(), amax("conv.weight_quantizer")), None, padding=1)
    h = F.batch_norm(h, m.bn.running_mean, m.bn.running_var, m.bn.weight.detach(), m.bn.bias.detach(), False, 0.0,
                     m.bn.eps)
    h = torch.relu(h).mean(dim=(2, 3))
    return F.linear(R.fake_quant(h, amax("fc.input_quantizer")),
                    R.fake_quant(m.fc.weight.detach(), amax("fc.weight_quantizer")), m.fc.bias.detach())


def test_qat_then_validate_roundtrip():
    """QAT steps move the learned amax by exactly -lr * grad; the validated model then computes the quantized
    network from the definition (numpy reference), and a fresh model loading the checkpoint computes the same."""
    m = _calibrated()
    x_val = _data(1)[0]
    with torch.no_grad():
        assert torch.equal(m(x_val), _reference_forward(m, x_val))  # calibrated, before QAT
    prepare_qat(m, learn_amax=True)
    opt = torch.optim.SGD(amax_param_groups(m, lr=1e-2, amax_lr=1e-2))
    amax0 = {n: q.amax.detach().clone() for n, q in trtquant.quantizers(m).items()}
    for x in _data(2, seed=5):
        loss = m(x).square().mean()
        opt.zero_grad()
        loss.backward()
        a = m.fc.input_quantizer._amax
        assert a.grad is not None and float(a.grad) != 0.0
        before, grad = a.detach().clone(), a.grad.clone()
        opt.step()
        assert torch.allclose(a.detach(), before - 1e-2 * grad, rtol=0, atol=1e-7)
    amax1 = {n: q.amax.detach().clone() for n, q in trtquant.quantizers(m).items()}
    assert amax1["fc.input_quantizer"] != amax0["fc.input_quantizer"]
    assert torch.equal(amax1["conv.weight_quantizer"], amax0["conv.weight_quantizer"])  # weights: as calibrated
    m.eval()
    set_state(m, "validate")
    with torch.no_grad():
        out = m(x_val)
        ref = _reference_forward(m, x_val)
    # Same float ops on the same quantized tensors: equal (allow float noise far below one fc-input step).
    step = float(R.scale_of(amax1["fc.input_quantizer"]))
    assert torch.allclose(out, ref, rtol=0, atol=1e-6), (float((out - ref).abs().max()), step)
    float_m = copy.deepcopy(m)
    set_state(float_m, "float")
    with torch.no_grad():
        assert float((float_m(x_val) - out).abs().max()) > 1e-4  # quantization does change the output

    fresh = trtquant.quantize(ConvNet()).eval()
    fresh.load_state_dict(m.state_dict())
    set_state(fresh, "validate")
    with torch.no_grad():
        assert torch.equal(fresh(x_val), out)


# -- DDP -------------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial weights on every rank
        model = trtquant.quantize(ConvNet()).eval()
        # Each rank calibrates on its own data; collect_statistics merges across ranks.
        trtquant.calibrate(model, _data(2, seed=10 + rank), method="max", progress=False)
        prepare_qat(model, learn_amax=True)
        amax0 = {n: float(p.detach()) for n, p in model.named_parameters() if n.endswith("_amax")}
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(amax_param_groups(ddp, lr=0.05, amax_lr=0.05, weight_decay=1e-3))
        x = _data(1, seed=20 + rank)[0]  # different data per rank
        loss = ddp(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save({"state": state, "amax0": amax0}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_step_keeps_amax_and_weights_identical_across_ranks():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_ddp_worker, args=(2, init_file, tmp), nprocs=2, join=True)
        r0 = torch.load(os.path.join(tmp, "rank0.pt"))
        r1 = torch.load(os.path.join(tmp, "rank1.pt"))
    s0, s1 = r0["state"], r1["state"]
    assert s0.keys() == s1.keys()
    # BatchNorm running stats are per rank after a step (DDP re-broadcasts rank 0's buffers at the next
    # forward; SyncBatchNorm shares them); every parameter and every amax must be identical.
    checked = [k for k in s0 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert any(k.endswith("input_quantizer._amax") for k in checked)
    assert any(k.endswith("weight_quantizer._amax") for k in checked)
    for k in checked:
        assert torch.equal(s0[k], s1[k]), k
    # calibration merged across ranks: identical starting amax; and the step moved the learned ones
    assert r0["amax0"] == r1["amax0"]
    moved = [k for k, v in r0["amax0"].items() if float(s0[k]) != v]
    assert moved, "no learned amax changed in the DDP step"


def test_quantizers_reading_one_tensor_learn_one_amax():
    """ResNet-18: a block input is read by conv1's and the residual (or downsample) quantizer; after
    prepare_qat they share one amax Parameter, train together, and the state dict keeps both keys."""
    torchvision = pytest.importorskip("torchvision")
    from trtquant.qat import amax_param_groups, amax_parameters

    torch.manual_seed(0)
    model = trtquant.quantize(torchvision.models.resnet18().eval())
    trtquant.calibrate(model, [torch.randn(2, 3, 64, 64)], method="max", progress=False)
    keys = set(model.state_dict())
    untied = copy.deepcopy(model)
    prepare_qat(model, learn_amax=True)
    prepare_qat(untied, learn_amax=True, tie_shared_amax=False)
    b = model.layer1[1]
    assert b.conv1.input_quantizer._amax is b.residual_quantizer._amax
    assert model.layer2[0].conv1.input_quantizer._amax is model.layer2[0].downsample[0].input_quantizer._amax
    assert untied.layer1[1].conv1.input_quantizer._amax is not untied.layer1[1].residual_quantizer._amax
    assert len(amax_parameters(model)) < len(amax_parameters(untied))
    opt = torch.optim.SGD(amax_param_groups(model, lr=0.1), lr=0.1)  # no parameter listed twice
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    opt.step()
    assert torch.equal(b.conv1.input_quantizer.amax, b.residual_quantizer.amax)
    assert set(model.state_dict()) == keys
    fresh = prepare_qat(copy.deepcopy(untied), learn_amax=True)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.layer1[1].residual_quantizer.amax, b.residual_quantizer.amax)
