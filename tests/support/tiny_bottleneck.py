"""A small classifier whose answers are robust enough for top-1 agreement to mean something.

A randomly initialised network answers near-ties: int8 features already flip some of its top-1
answers. This one is torchvision's resnet18 at 32x32 with 4 classes, its BatchNorm statistics
taken on the built-in photos and its classifier fitted (a few seconds) to the colour cast of
tinted photos: each image is a photo at half contrast plus one of four colour casts, and the class
is the cast. Held-out images are tinted photos of sources the fit never saw.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from partitioner.bottleneck import augment, split_by_group
from partitioner.models import ModelSpec, load_model
from partitioner.photos import builtin_photos

SHAPE = (1, 3, 32, 32)
SOURCES = 10  # built-in photos; crop i comes from photo i % SOURCES
_TINTS = torch.tensor([[1.5, 0, 0], [0, 1.5, 0], [0, 0, 1.5], [-1.0, -1.0, -1.0]])


def tinted(x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` at half contrast plus a random cast per image, and the cast's class."""
    y = torch.randint(0, len(_TINTS), (len(x),), generator=torch.Generator().manual_seed(seed))
    return x * 0.5 + _TINTS[y][:, :, None, None], y


def images() -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Tinted built-in photos (50), their classes, and the photo each comes from."""
    x, y = tinted(builtin_photos(SHAPE, 50), 3)
    return x, y, [i % SOURCES for i in range(len(x))]


def split() -> tuple[list[int], list[int]]:
    """Training and held-out indices of :func:`images` (3 of the 10 photos held out)."""
    return split_by_group(50, [i % SOURCES for i in range(50)], 0.3)


@functools.cache
def classifier() -> nn.Module:
    """The fitted resnet18 (eval mode); deterministic, built once per process (do not modify it)."""
    torch.manual_seed(0)
    model = load_model(ModelSpec("rn", "resnet18", input_shape=SHAPE, num_classes=4, seed=0))
    x = builtin_photos(SHAPE, 50)
    train_idx, _ = split()
    xt, yt = tinted(augment(x[train_idx], 3, seed=1), 2)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the calibration batch
    model.train()
    with torch.no_grad():
        model(xt)
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1  # as built: the module (and its fingerprint) is a plain resnet18 again
    body = nn.Sequential(*list(model.children())[:-1])
    with torch.no_grad():
        pooled = body(xt).flatten(1)
    opt = torch.optim.Adam(model.fc.parameters(), lr=0.05, weight_decay=0.05)
    for _ in range(100):
        loss = F.cross_entropy(model.fc(pooled), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def train_artifacts(directory, cut: str, *, augment_copies: int, max_steps: int, budget_s: float):
    """Train a bottleneck for :func:`classifier` at ``cut`` on the training images and save, in ``directory``,
    the classifier's weights (``model.safetensors``) and the bottleneck's artifacts (``bottleneck/``).
    Returns the artifacts' directory."""
    from pathlib import Path

    from safetensors.torch import save_file

    from partitioner import bottleneck as bn
    from partitioner.graph import trace
    from partitioner.models import fingerprint

    directory = Path(directory)
    model = classifier()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    x, _, _ = images()
    train_idx, _ = split()
    graph = trace(model, x[:1])
    head, tail = graph.split(cut)
    trained = bn.train(
        head,
        tail,
        bn.augment(x[train_idx], augment_copies, seed=1),
        bn.BottleneckConfig(channels=64),
        bn.TrainConfig(rate_weight=0.02, max_steps=max_steps, budget_s=budget_s),
        cut=(graph.cut(cut).index, cut),
    )
    base = {"fingerprint": fingerprint(model), "source": "resnet18", "input_shape": list(SHAPE)}
    bn.save(trained, directory / "bottleneck", base)
    return directory / "bottleneck"
