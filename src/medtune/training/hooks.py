"""The training loop's contract: what a strategy's hooks receive, a run's phases, and the callback
protocol. Strategies (``medtune.strategies``) implement against these; the loop only knows them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["EpochContext", "SolveContext", "Phase", "Callback", "StopTraining", "RungReached"]


class StopTraining(Exception):
    """Raised by a callback to end the current phase after this epoch (fastai's cancel exceptions)."""


class RungReached(Exception):
    """Raised by :func:`medtune.training.loop.fit` called with ``pause_at``: the run has trained that many
    epochs and its checkpoint is saved (successive halving pauses it there; a later ``fit`` continues it).

    Attributes:
        epochs: epochs trained so far (history rows, every phase counted).
        history: the run's history rows so far (their ``val_*`` metrics rank it at the rung).
    """

    def __init__(self, epochs: int, history: list[dict]) -> None:
        super().__init__(f"paused after epoch {epochs}")
        self.epochs, self.history = epochs, history


@runtime_checkable
class Callback(Protocol):
    """An observer of the loop: it logs, checkpoints or stops early (by raising :class:`StopTraining`);
    it never changes which parameters train (that is the strategy's job)."""

    def on_epoch_end(self, record: dict) -> None:
        """Called after every epoch with its history row (metrics, LR, seconds)."""


@dataclass
class EpochContext:
    """What :meth:`Strategy.on_epoch_start` may look at and change.

    Attributes:
        model: the wrapped model being trained (input in [0, 1]).
        blocks: the backbone's block partition.
        optimizer: the current optimiser; a strategy may add groups or replace it.
        lr: base learning rate of the phase.
        weight_decay: base weight decay.
        batches: a callable ``batches(num_batches) -> iterator of (x, y)`` over training data
            (x float in [0, 1] on the device), for strategies that probe gradients.
        loss_fn: ``loss_fn(logits, y) -> Tensor``.
        build_optimizer: ``build_optimizer(param_groups) -> Optimizer`` with the run's settings.
        record: dict the strategy may write findings into (stored with the run under ``extras``).
        num_epochs: the phase's epoch budget.
    """

    model: nn.Module
    blocks: Any
    optimizer: torch.optim.Optimizer
    lr: float
    weight_decay: float
    batches: Any
    loss_fn: Any
    build_optimizer: Any
    record: dict = field(default_factory=dict)
    num_epochs: int = 1


@dataclass
class SolveContext:
    """What :meth:`Strategy.solve` may use.

    Attributes:
        net: the network the phase trains (the suffix after a cached frozen prefix, or the model).
        blocks: the backbone's block partition.
        task: ``binary``, ``multiclass`` or ``multilabel``.
        num_classes: outputs of the head.
        monitor: the validation metric that selects (``auc``, ``loss``, ...).
        classifier_inputs: ``classifier_inputs(split) -> (X, y)``: the inputs of the backbone's
            classifier (``get_classifier()``) on ``train`` or ``val``, X float (N, D) on the CPU,
            y the labels (N,) or (N, K) for multi-label; computed in eval mode.
        record: dict the strategy may write findings into (stored under ``extras``).
        class_weight: the run's loss weights (``class_weight: balanced``), None for an unweighted loss.
    """

    net: nn.Module
    blocks: Any
    task: str
    num_classes: int
    monitor: str
    classifier_inputs: Any
    record: dict = field(default_factory=dict)
    class_weight: list[float] | None = None


@dataclass(frozen=True)
class Phase:
    """One phase of a run: the strategy that drives it, its LR scale, epoch budget and optimiser.

    Every phase starts from the previous phase's best weights. ``None`` fields take the run's
    settings: ``epochs`` the RunConfig field named by ``budget_field`` (``epochs``, or e.g.
    ``scratch_epochs``; 0 there means ``budget_scale`` × ``epochs``), ``patience`` and ``monitor`` the run's
    early stopping, ``optimizer`` the run's optimiser (``adamw`` or ``sgd``, SGD with the run's
    momentum) and ``weight_decay`` the run's decay. ``schedule`` is ``None`` for the run's cosine
    schedule (with its warm-up) or ``constant``: every step at the phase's LR (× each group's
    ``lr_scale``).
    """

    strategy: Any  # the medtune.strategies.Strategy that drives the phase
    name: str
    lr_scale: float = 1.0
    epochs: int | None = None
    budget_field: str = "epochs"
    budget_scale: int = 1
    patience: int | None = None
    monitor: str | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    schedule: str | None = None
