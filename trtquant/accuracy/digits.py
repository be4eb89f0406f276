"""scikit-learn's bundled digits as a real (if small) image task, and a ResNet-style CNN for it.

Data: 1797 8x8 grey images of 0-9, scaled to [0, 1], normalised with the training mean/std, and
upsampled to 32x32 with ``F.interpolate`` (bilinear); a fixed stratified split (30 % test, seed 0).
Model: stem Conv-BN-ReLU, three residual basic blocks (the second and third downsample with a 1x1
Conv-BN shortcut), global average pool, Linear - residual Adds, BatchNorm and a pool, so quantizer
placement matters as it does in a real ResNet. Training takes well under a minute on 2 CPU cores;
the weights are cached in :func:`trtquant.accuracy.cache_dir` under a name that encodes the recipe,
so a changed recipe never loads stale weights.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..calib_cache import atomic_write_bytes
from . import cache_dir

logger = logging.getLogger(__name__)

NUM_CLASSES = 10


@dataclass
class DigitsData:
    x_train: Tensor  # (N, 1, size, size) float32, normalised
    y_train: Tensor  # (N,) int64
    x_test: Tensor
    y_test: Tensor

    def calib_batches(self, n: int = 256, batch_size: int = 64) -> List[Tensor]:
        """The first ``n`` training images (shuffled once by the split) in batches: calibration data."""
        x = self.x_train[:n]
        return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]


def load_digits_data(size: int = 32, test_size: float = 0.3, seed: int = 0) -> DigitsData:
    """Digits as tensors, upsampled to ``size`` x ``size``; the split is fixed by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    x = torch.from_numpy(ds.images.astype("float32") / 16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    y = torch.from_numpy(ds.target.astype("int64"))
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=test_size, random_state=seed,
                                           stratify=y.numpy())
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean, std = x[idx_train].mean(), x[idx_train].std()
    x = (x - mean) / std
    return DigitsData(x[idx_train].contiguous(), y[idx_train], x[idx_test].contiguous(), y[idx_test])


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class DigitsResNet(nn.Module):
    """A small ResNet: ``stem`` (conv1/bn1), ``layer1..3`` basic blocks, ``avgpool``, ``fc``."""

    def __init__(self, widths: Tuple[int, int, int] = (16, 32, 64), num_classes: int = NUM_CLASSES):
        super().__init__()
        w1, w2, w3 = widths
        self.conv1 = nn.Conv2d(1, w1, 3, stride=2, padding=1, bias=False)  # 32x32 -> 16x16
        self.bn1 = nn.BatchNorm2d(w1)
        self.relu = nn.ReLU()
        self.layer1 = BasicBlock(w1, w1)
        self.layer2 = BasicBlock(w1, w2, stride=2)
        self.layer3 = BasicBlock(w2, w3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@dataclass(frozen=True)
class Recipe:
    widths: Tuple[int, int, int] = (16, 32, 64)
    epochs: int = 8
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    shift: int = 2  # random translation augmentation, pixels at 32x32
    seed: int = 0
    size: int = 32
    arch: str = "resnet-s2-v1"  # bump when DigitsResNet or the data pipeline changes: a new cache key

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def random_shift(x: Tensor, shift: int, g: torch.Generator) -> Tensor:
    """Translate each image by up to ``shift`` pixels (zero-padded by the normalised background)."""
    if shift <= 0:
        return x
    n, _, h, w = x.shape
    bg = float(x.amin())
    padded = F.pad(x, (shift, shift, shift, shift), value=bg)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=g)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h))  # (n, h)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w))  # (n, w)
    idx_n = torch.arange(n).view(n, 1, 1)
    return padded[idx_n, 0, rows.view(n, h, 1), cols.view(n, 1, w)].unsqueeze(1)


def train_epochs(model: nn.Module, data: DigitsData, epochs: int, optimizer: torch.optim.Optimizer,
                 batch_size: int = 64, shift: int = 2, seed: int = 0,
                 scheduler: Optional[object] = None, after_step: Optional[Callable[[], None]] = None) -> List[float]:
    """Plain cross-entropy training; returns the mean loss of each epoch. The model must be in train mode."""
    g = torch.Generator().manual_seed(seed)
    losses = []
    n = len(data.y_train)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        total, count = 0.0, 0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) < 2:
                continue
            x = random_shift(data.x_train[idx], shift, g)
            loss = F.cross_entropy(model(x), data.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            if scheduler is not None:
                scheduler.step()  # type: ignore[attr-defined]
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        losses.append(total / max(count, 1))
    return losses


def train_digits(recipe: Recipe = Recipe(), data: Optional[DigitsData] = None) -> nn.Module:
    """Train a DigitsResNet from scratch with ``recipe`` (AdamW, one-cycle schedule)."""
    data = data or load_digits_data(recipe.size, seed=recipe.seed)
    torch.manual_seed(recipe.seed)
    model = DigitsResNet(recipe.widths)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps = recipe.epochs * ((len(data.y_train) + recipe.batch_size - 1) // recipe.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps, pct_start=0.25)
    model.train()
    train_epochs(model, data, recipe.epochs, opt, recipe.batch_size, recipe.shift, recipe.seed, scheduler=sched)
    return model.eval()


def model_path(recipe: Recipe = Recipe(), directory: Optional[os.PathLike] = None) -> Path:
    return Path(directory or cache_dir()) / f"digits_resnet-{recipe.key()}.pt"


def get_digits_model(recipe: Recipe = Recipe(), data: Optional[DigitsData] = None, directory: Optional[os.PathLike] = None,
                     retrain: bool = False) -> nn.Module:
    """The trained float model in eval mode: loaded from the cache, or trained (and cached) when absent."""
    path = model_path(recipe, directory)
    model: nn.Module = DigitsResNet(recipe.widths)
    if path.is_file() and not retrain:
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        except Exception as e:  # a truncated or foreign file: train again
            logger.warning("%s is not a usable checkpoint (%s); training again", path, e)
    t = time.perf_counter()
    model = train_digits(recipe, data)
    logger.info("trained the digits model in %.1f s", time.perf_counter() - t)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:  # a read-only cache directory costs a retrain next time, nothing else
        logger.warning("could not cache the digits model at %s: %s", path, e)
    return model


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """Arg-max class of every image (the model is called as it is: set eval/validate first)."""
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * float((predict(model, x, batch_size) == y).float().mean())


def ort_accuracy(onnx_path: os.PathLike, x: Tensor, y: Tensor, batch_size: int = 512, optimize: bool = True) -> float:
    """Top-1 accuracy (percent) of an exported model in ONNX Runtime CPU, graph optimisations on by default."""
    import numpy as np

    from ..export.compare import ort_session

    sess = ort_session(onnx_path, optimize=optimize)
    name = sess.get_inputs()[0].name
    preds = [np.asarray(sess.run(None, {name: x[i:i + batch_size].numpy()})[0]).argmax(1) for i in range(0, len(x), batch_size)]
    return 100.0 * float((torch.from_numpy(np.concatenate(preds)) == y).float().mean())
