"""Tiny models and a synthetic task on which a universal perturbation must exist.

The task: three classes of 16×16 noisy grey images; class k has colour channel k raised by a
random margin δ and the other two lowered by δ/2. Adding a constant to one channel moves every
image towards that class, so one input-agnostic direction fools most images of the other classes,
while a random direction of the same L2 norm spreads its energy over 768 pixels and barely moves
any channel mean.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

NUM_CLASSES = 3
IMG_SIZE = 16


class Normalize(nn.Module):
    """Per-channel (x - mean) / std inside the model, as medtune models do."""

    def __init__(self, mean: float = 0.5, std: float = 0.25) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((1, 3, 1, 1), mean))
        self.register_buffer("std", torch.full((1, 3, 1, 1), std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class TinyCNN(nn.Module):
    """Normalize -> conv -> ReLU -> conv -> ReLU -> global pool -> linear; ~700 parameters."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(
            Normalize(),
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _balanced_labels(num: int, seed: int) -> tuple[torch.Generator, torch.Tensor]:
    """A seeded generator and ``num`` shuffled labels, the classes as equally often as possible."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num) % NUM_CLASSES
    return g, labels[torch.randperm(num, generator=g)]


def make_colour_task(
    num: int, *, seed: int, size: int = IMG_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (num, 3, size, size) and int64 labels (num,) of the channel-dominance task."""
    g, labels = _balanced_labels(num, seed)
    delta = 0.02 + 0.06 * torch.rand(num, generator=g)
    offset = -0.5 * delta[:, None].repeat(1, 3)
    offset[torch.arange(num), labels] = delta
    x = 0.5 + 0.1 * torch.randn(num, 3, size, size, generator=g) + offset[:, :, None, None]
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels.long()


def train_tiny_cnn(
    images: torch.Tensor, labels: torch.Tensor, *, seed: int, steps: int = 150
) -> TinyCNN:
    torch.manual_seed(seed)  # tests may seed globally; library code never does
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    x = images.float() / 255
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def colour_task() -> dict:
    """A trained TinyCNN with its train and test split of the colour task."""
    torch.set_num_threads(1)
    train_x, train_y = make_colour_task(240, seed=1)
    test_x, test_y = make_colour_task(150, seed=2)
    model = train_tiny_cnn(train_x, train_y, seed=0)
    with torch.no_grad():
        acc = (model(test_x.float() / 255).argmax(1) == test_y).float().mean().item()
    return {
        "model": model,
        "train_x": train_x,
        "train_y": train_y,
        "test_x": test_x,
        "test_y": test_y,
        "test_accuracy": acc,
    }


def make_grey_task(
    num: int, *, seed: int, size: int = IMG_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey uint8 images (R = G = B) whose class is the brightness band 0.35 / 0.5 / 0.65, and labels."""
    g, labels = _balanced_labels(num, seed)
    level = 0.35 + 0.15 * labels.float() + 0.03 * torch.randn(num, generator=g)
    x = level[:, None, None, None] + 0.08 * torch.randn(num, 1, size, size, generator=g)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return images, labels.long()


@pytest.fixture(scope="session")
def grey_task() -> dict:
    """A TinyCNN trained on the grey brightness task, with its splits."""
    torch.set_num_threads(1)
    train_x, train_y = make_grey_task(180, seed=3)
    test_x, test_y = make_grey_task(90, seed=4)
    model = train_tiny_cnn(train_x, train_y, seed=0, steps=100)
    return {"model": model, "train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


class ChannelMeanModel(nn.Module):
    """Logits = 100 · per-channel mean: the prediction is the brightest channel, known by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(100.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x.mean(dim=(2, 3))


class ConstantModel(nn.Module):
    """Ignores its input and always predicts class 0."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.arange(num_classes, 0, -1).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], -1) + 0.0 * x.sum(dim=(1, 2, 3))[:, None]


def constant_images(colours: list[tuple[float, float, float]], size: int = 4) -> torch.Tensor:
    """Float images (N, 3, size, size), each filled with one RGB colour."""
    return torch.tensor(colours).float()[:, :, None, None].expand(-1, -1, size, size).contiguous()


@pytest.fixture(scope="session")
def helpers():
    """The model classes and data makers above, for tests (test modules don't import conftest)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        TinyCNN=TinyCNN,
        ChannelMeanModel=ChannelMeanModel,
        ConstantModel=ConstantModel,
        make_colour_task=make_colour_task,
        train_tiny_cnn=train_tiny_cnn,
        constant_images=constant_images,
    )
