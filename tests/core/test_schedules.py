"""The MedMNIST papers' schedules equal the schedulers their code steps; zero-padding as MedMNIST+."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medtune.data._decode import ZERO_PAD_FILL, resize_image
from medtune.training.schedules import lr_at


def _epoch_lrs(scheduler_step, optimizer, epochs: int) -> list[float]:
    out = []
    for epoch in range(epochs):
        out.append(optimizer.param_groups[0]["lr"])  # the LR the epoch trains at
        scheduler_step(epoch)
    return out


def test_cosine_epoch_equals_timm_cosine_stepped_as_medmnist_plus():
    from timm.scheduler import CosineLRScheduler

    epochs, steps = 12, 3
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = CosineLRScheduler(opt, t_initial=epochs, cycle_limit=1, t_in_epochs=True)  # MedMNIST+ train.py:87
    theirs = _epoch_lrs(lambda e: sched.step(epoch=e), opt, epochs)  # train.py:138
    ours = [lr_at(e * steps + b, total_steps=epochs * steps, warmup_steps=0, base_lr=1e-4, schedule="cosine_epoch",
                  steps_per_epoch=steps) for e in range(epochs) for b in range(steps)]
    assert np.allclose(ours, np.repeat(theirs, steps), rtol=1e-12, atol=0)


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_multistep_equals_torch_multisteplr_as_medmnist_v2():
    epochs = 8
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[0.5 * epochs, 0.75 * epochs], gamma=0.1)
    theirs = _epoch_lrs(lambda _e: sched.step(), opt, epochs)
    ours = [lr_at(e * 2, total_steps=epochs * 2, warmup_steps=0, base_lr=1e-3, schedule="multistep",
                  steps_per_epoch=2) for e in range(epochs)]
    assert np.allclose(ours, theirs, rtol=1e-12, atol=0)


def test_zero_pad_centres_without_scaling_on_the_mean_colour():
    rgb = np.random.default_rng(0).integers(0, 256, (28, 28, 3)).astype(np.uint8)
    out = resize_image(rgb, 224, "zero_pad")
    # MedMNIST+ train.py:285-292: total = 224 - 28, left = top = total // 2, the rest right / bottom
    assert torch.equal(out[:, 98:126, 98:126], torch.from_numpy(rgb).permute(2, 0, 1))
    assert (out[:, :98] == torch.tensor(ZERO_PAD_FILL, dtype=torch.uint8).view(3, 1, 1)).all()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    assert ((out[:, 0:1, 0:1] / 255 - mean).abs() < 0.5 / 255 + 1e-7).all()  # zero after ImageNet normalisation


@pytest.mark.parametrize("size", [56, 224])
def test_nearest_is_an_integer_upsampling(size):
    rgb = np.random.default_rng(0).integers(0, 256, (28, 28, 3)).astype(np.uint8)
    out = resize_image(rgb, size, "nearest")
    f = size // 28
    assert torch.equal(out, torch.from_numpy(rgb).permute(2, 0, 1).repeat_interleave(f, 1).repeat_interleave(f, 2))
