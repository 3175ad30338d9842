"""Learning-rate schedules: pure functions of the step (no hidden scheduler state).

``cosine`` is medtune's default (per step, linear warm-up, down to 1% of the peak). The other two are
the MedMNIST papers' schedules, so their presets train as their code does:

- ``cosine_epoch``: timm's ``CosineLRScheduler(optimizer, t_initial=epochs, cycle_limit=1, t_in_epochs=True)``
  (``lr_min`` 0, no warm-up) stepped after each epoch with ``scheduler.step(epoch=epoch)``, as MedMNIST+'s
  ``train.py`` (Doerrich et al. 2025) does: epoch ``e`` trains at the value for ``t = max(e - 1, 0)``.
- ``multistep``: ``torch.optim.lr_scheduler.MultiStepLR(milestones=[0.5 * epochs, 0.75 * epochs],
  gamma=0.1)`` stepped after each epoch, as MedMNIST v2's ``train_and_eval_pytorch.py`` (Yang et al.
  2023): epoch ``e`` trains at ``lr · 0.1^(number of milestones ≤ e)``.
"""

from __future__ import annotations

import math

__all__ = ["SCHEDULES", "lr_at"]

SCHEDULES: tuple[str, ...] = ("cosine", "cosine_epoch", "multistep")
MULTISTEP_MILESTONES = (0.5, 0.75)  # shares of the epochs (MedMNIST v2: milestones = [0.5 * E, 0.75 * E])
MULTISTEP_GAMMA = 0.1


def lr_at(step: int, *, total_steps: int, warmup_steps: int, base_lr: float, min_ratio: float = 0.01,
          schedule: str = "cosine", steps_per_epoch: int = 1) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of a phase of ``total_steps`` steps.

    Args:
        step: the step within the phase.
        total_steps: the phase's steps (its epochs × ``steps_per_epoch``).
        warmup_steps: linear warm-up steps (``cosine`` and ``cosine_epoch``; ``multistep`` has none).
        base_lr: the peak learning rate.
        min_ratio: ``cosine``'s floor as a share of ``base_lr``.
        schedule: one of :data:`SCHEDULES`.
        steps_per_epoch: optimiser steps per epoch (the epoch-wise schedules change at epoch ends).
    """
    if warmup_steps > 0 and step < warmup_steps and schedule != "multistep":
        return base_lr * (step + 1) / warmup_steps
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    epochs = max(1, round(total_steps / max(1, steps_per_epoch)))
    epoch = step // max(1, steps_per_epoch)
    if schedule == "cosine_epoch":
        t = max(epoch - 1, 0)  # the scheduler is stepped with epoch=e after epoch e has trained
        return 0.5 * base_lr * (1 + math.cos(math.pi * min(t, epochs) / epochs))
    if schedule == "multistep":
        passed = sum(1 for m in MULTISTEP_MILESTONES if m * epochs <= epoch)
        return base_lr * MULTISTEP_GAMMA ** passed
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}.")
