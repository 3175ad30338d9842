"""The Strategy base class: small objects the one training loop asks a few questions.

The loop never branches on a strategy's name. A strategy says which parameters train
(:meth:`Strategy.set_trainable`), how they are grouped for the optimiser and at which LR scale
(:meth:`Strategy.param_groups`), what changes at the start of an epoch
(:meth:`Strategy.on_epoch_start`), and what extra loss term it adds (:meth:`Strategy.extra_loss`).
Multi-phase strategies (LP-FT) return their phases from :meth:`Strategy.phases`. Three narrower
hooks serve the methods that need them: :meth:`Strategy.solve` (the linear probe's convex fit,
used by ``linear`` and LP-FT), :meth:`Strategy.selectable_from` (gradual unfreezing: no best
epoch and no early stop before every block has trained), :meth:`Strategy.freezes_batch_stats`
(surgical fine-tuning: every BatchNorm in eval mode, as the official code) and
:meth:`Strategy.trains_in_eval_mode` (LP-FT's fine-tuning phase: the whole network in eval mode, as
Kumar et al.'s ``use_net_val_mode``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from medtune._checks import check_scalar
from medtune.errors import ConfigError
from medtune.strategies.spec import format_strategy_spec
from medtune.training.hooks import EpochContext, Phase, SolveContext

__all__ = ["Strategy", "Phase", "EpochContext", "SolveContext", "freeze_all", "set_blocks_trainable"]


def freeze_all(blocks) -> None:
    """Set ``requires_grad=False`` on every backbone parameter."""
    for p in blocks.model.parameters():
        p.requires_grad_(False)


def set_blocks_trainable(blocks, indices, trainable: bool = True) -> None:
    """Set ``requires_grad`` on the parameters of the blocks at ``indices``."""
    for idx in indices:
        for p in blocks.parameters(idx):
            p.requires_grad_(trainable)


def _coerce(value: Any, default: Any) -> Any:
    """Convert a spec string to the type of the parameter's default ('2' -> 2 for an int default).

    A string that does not convert is kept as is, for ``validate`` to accept or reject by name.
    """
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        return value
    try:
        if isinstance(default, bool):
            return {"true": True, "false": False, "1": True, "0": False}[value.lower()]
        return type(default)(value)
    except (KeyError, ValueError):
        return value


class Strategy:
    """Base class. Subclasses declare ``params`` (name → default) and override hooks as needed.

    Class attributes:
        name: registry name (set by ``register_strategy``).
        main_param: the parameter a bare spec value sets (``top_k:2`` → ``k=2``).
        show_default_main: whether the spec shows the main parameter at its default value
            (``top_k:1``); False where the bare name is the canonical text (``linear``).
        pretrained: False for strategies that must start from random init (``scratch``).
        granularity: ``block`` or ``layer``, the partition the strategy works on.
        defaults: parameter defaults.
        revision: bumped when the strategy's default behaviour changes, so the run ids of its runs
            change with it (0: the ids stores have always had).
    """

    name: ClassVar[str] = "base"
    main_param: ClassVar[str | None] = None
    show_default_main: ClassVar[bool] = True
    pretrained: ClassVar[bool] = True
    granularity: ClassVar[str] = "block"
    defaults: ClassVar[dict[str, Any]] = {}
    revision: ClassVar[int] = 0

    def __init__(self, **params: Any) -> None:
        unknown = set(params) - set(self.defaults)
        if unknown:
            valid = ", ".join(sorted(self.defaults)) or "none"
            raise ConfigError(
                f"Strategy {self.name!r} got unknown parameter(s) {', '.join(sorted(unknown))}; valid: {valid}."
            )
        self.params = {**self.defaults, **{k: _coerce(v, self.defaults[k]) for k, v in params.items()}}
        self.validate()

    # -- description ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Check ``self.params``; raise ConfigError with the parameter's name on bad values."""

    @property
    def spec(self) -> str:
        """Display spec, e.g. ``top_k:2``; only parameters that differ from defaults are shown,
        except the main parameter, which is always shown unless ``show_default_main`` is False."""
        shown = {k: v for k, v in self.params.items()
                 if (k == self.main_param and self.show_default_main) or v != self.defaults.get(k)}
        return format_strategy_spec(self.name, shown, self.main_param)

    def depth(self, num_blocks: int) -> int | None:
        """Number of trainable non-head blocks, for depth plots; None when not a depth strategy."""
        return None

    def check_blocks(self, blocks) -> None:
        """Validate parameters that depend on the backbone (e.g. k against the block count)."""

    @classmethod
    def expand(cls, value: str, num_units: int) -> list[Any]:
        """Values of ``main_param`` that ``'all'`` expands to for a backbone with ``num_units``."""
        raise ConfigError(f"Strategy {cls.name!r} does not support ':all'.")

    # -- hooks -----------------------------------------------------------------------------------
    def phases(self) -> list[Phase]:
        """The phases of a run; most strategies have one."""
        return [Phase(strategy=self, name=self.name)]

    def set_trainable(self, blocks) -> None:
        """Set ``requires_grad`` on the backbone's parameters (default: everything trains)."""
        for p in blocks.model.parameters():
            p.requires_grad_(True)

    def param_groups(self, blocks, lr: float, weight_decay: float) -> list[dict]:
        """Optimiser groups of the trainable parameters, one per block, each named.

        Returns dicts with ``params``, ``name``, ``lr_scale`` and ``weight_decay``; the loop sets
        ``lr = lr_at(step) * lr_scale`` every step.
        """
        groups = []
        for idx, block in enumerate(blocks):
            params = [p for p in blocks.parameters(idx) if p.requires_grad]
            if params:
                groups.append({"params": params, "name": block.name, "lr_scale": 1.0, "weight_decay": weight_decay})
        return groups

    def on_epoch_start(self, epoch: int, ctx: EpochContext) -> None:
        """Called before each epoch of the phase (epoch counts from 0 within the phase)."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """An extra term added to the task loss, or None."""
        return None

    def frozen_prefix_is_fixed(self) -> bool:
        """True when the set of frozen parameters never changes during the phase."""
        return True

    def solve(self, ctx: SolveContext) -> dict | None:
        """Train the phase without epochs (a convex fit of the head), or return None to train epochs.

        Called once at the start of the phase, after :meth:`set_trainable`. A strategy that solves
        writes the weights into ``ctx.net`` and returns a dict of plain values for the history row
        (e.g. the chosen regularisation); the phase then ends with those weights.
        """
        return None

    def ignores_optimiser(self, blocks) -> bool:
        """True when no phase uses the run's ``lr`` or ``weight_decay`` on ``blocks`` (a solved linear
        probe): a sweep then runs one cell of those axes, not one run per value that would repeat it."""
        return False

    def selectable_from(self, num_epochs: int) -> int:
        """First epoch (0-based, within the phase) whose weights may be kept as the phase's best and
        from which early stopping counts; earlier epochs are trained and logged only."""
        return 0

    def freezes_batch_stats(self) -> bool:
        """True when every batch-statistics layer (BatchNorm) runs in eval mode, trainable or not."""
        return False

    def trains_in_eval_mode(self) -> bool:
        """True when the whole network stays in eval mode while it trains (``model.eval()``: BatchNorm
        uses and keeps its running statistics, dropout is off), whatever the run's ``bn_mode``."""
        return False

    # -- model surgery (parameter-efficient strategies) -----------------------------------------
    def prepare_model(self, model: nn.Module) -> None:
        """Change the model before its block partition is taken (LoRA adds its adapters here).
        Called once per run, under the run's seeded RNG; the default changes nothing."""

    def finalize_model(self, model: nn.Module) -> None:
        """After training, before the weights are stored: leave the plain architecture with the
        trained weights (LoRA merges its adapters), so predict, export and the audit load it as any
        run. The default changes nothing."""

    @classmethod
    def restore_model(cls, backbone: nn.Module, state: dict) -> None:
        """Before stored weights ``state`` are loaded into a fresh ``backbone`` of the run's architecture:
        rebuild what the strategy put in place of the original modules (the kNN probe's head)."""

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the strategy mid-run (tensors and plain values only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


def check_int_param(strategy: Strategy, key: str, *, min_val: int = 0) -> None:
    check_scalar(strategy.params[key], key, int, min_val=min_val, owner=f"strategy {strategy.name!r}")


def check_float_param(strategy: Strategy, key: str, *, min_val: float = 0.0, include_min: bool = True,
                      max_val: float | None = None) -> None:
    check_scalar(strategy.params[key], key, (float, int), min_val=min_val, include_min=include_min,
                 max_val=max_val, owner=f"strategy {strategy.name!r}")
