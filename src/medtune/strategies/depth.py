"""Strategies that differ only in which parameters train: scratch, linear, full, top_k, layers_k, surgical."""

from __future__ import annotations

import time

import torch
from torch import nn

from medtune._checks import check_choice
from medtune.errors import ConfigError
from medtune.strategies._registry import register_strategy
from medtune.strategies.base import (Phase, SolveContext, Strategy, check_float_param, check_int_param, freeze_all,
                                     set_blocks_trainable)
from medtune.strategies.probing import c_grid, fit_logistic_head_reusing
from medtune.training.metrics import MONITOR_METRICS

__all__ = ["Scratch", "Linear", "Full", "TopK", "LayersK", "Surgical"]


@register_strategy("full")
class Full(Strategy):
    """Fine-tune every parameter from the pretrained weights with one LR."""

    def depth(self, num_blocks: int) -> int:
        return num_blocks - 1


@register_strategy("scratch")
class Scratch(Full):
    """Train every parameter of the same architecture from random initialisation (Tajbakhsh baseline).

    Tajbakhsh et al. trained from scratch to convergence, so the run has its own epoch budget, the
    RunConfig field ``scratch_epochs`` (0: four times ``epochs``), with the run's early stopping.
    """

    pretrained = False

    def phases(self) -> list[Phase]:
        return [Phase(strategy=self, name=self.name, budget_field="scratch_epochs", budget_scale=4)]


@register_strategy("linear")
class Linear(Strategy):
    """Linear probe: the backbone is frozen and the head is trained to convergence (Kumar et al. 2022).

    ``scope`` (the main parameter): ``head`` (default) trains the head block, which on VGG is the
    classifier fc6–fc8 as Kandel & Castelli and Davila et al. count it; ``head_only`` trains only
    the final linear layer (``linear:head_only``, the fc8-only probe on VGG; elsewhere the same as
    ``head``).

    Where what trains is one linear layer, the phase is solved, not trained by epochs: scikit-learn's
    ``LogisticRegression`` (L-BFGS; one-vs-rest for multi-label) on the frozen features, C chosen on
    the validation split from ``num_c`` log-spaced values in 1e-7 … 1e2 (``c`` > 0 fixes C) by
    ``select`` (``accuracy``, as Kumar et al.; a metric name, or ``monitor`` for the run's). As their
    code (``log_reg_sk.py``) does, the fits are warm-started along the grid, ascending, with at most
    ``max_iter`` (200, as theirs) L-BFGS iterations each at scikit-learn's tolerance (``max_iter=20``:
    medtune's cap before, cheaper on poorly conditioned features; ``max_iter=1000`` converges each C).
    The solution is written into the head (:mod:`medtune.strategies.probing`; the chosen C and the grid
    go to ``extras["linear_probe"]``). ``solver=epochs`` trains that layer with the run's optimiser
    instead. A deeper head (VGG's fc6–fc8) is trained by epochs on the cached features to
    convergence: up to ``max_epochs`` epochs, early stopping on the validation loss after
    ``patience`` epochs without improvement.
    """

    main_param = "scope"
    show_default_main = False
    defaults = {"scope": "head", "solver": "lbfgs", "c": 0.0, "num_c": 50, "max_iter": 200, "select": "accuracy",
                "max_epochs": 100, "patience": 5}
    revision = 1  # 1: max_iter 200 (was 20)

    def validate(self) -> None:
        owner = f"strategy {self.name!r}"
        check_choice(self.params["scope"], "scope", ("head", "head_only"), owner=owner)
        check_choice(self.params["solver"], "solver", ("lbfgs", "epochs"), owner=owner)
        check_choice(self.params["select"], "select", (*MONITOR_METRICS, "monitor"), owner=owner)
        check_float_param(self, "c")
        check_int_param(self, "num_c", min_val=1)
        check_int_param(self, "max_iter", min_val=1)
        check_int_param(self, "max_epochs", min_val=1)
        check_int_param(self, "patience", min_val=1)

    def phases(self) -> list[Phase]:
        return [Phase(strategy=self, name=self.name, epochs=int(self.params["max_epochs"]),
                      patience=int(self.params["patience"]), monitor="loss")]

    def set_trainable(self, blocks) -> None:
        freeze_all(blocks)
        if self.params["scope"] == "head_only":
            for p in blocks.model.get_classifier().parameters():
                p.requires_grad_(True)
        else:
            set_blocks_trainable(blocks, [blocks.head_idx])

    def ignores_optimiser(self, blocks) -> bool:
        """Solved by L-BFGS (one linear layer trains): C is chosen on validation, lr and weight decay unused."""
        if self.params["solver"] != "lbfgs" or not isinstance(blocks.model.get_classifier(), nn.Linear):
            return False
        if self.params["scope"] == "head_only":
            return True
        classifier = {id(p) for p in blocks.model.get_classifier().parameters()}
        return {id(p) for p in blocks.parameters(blocks.head_idx)} == classifier

    def solve(self, ctx: SolveContext) -> dict | None:
        classifier = ctx.blocks.model.get_classifier()
        trainable = {id(p) for p in ctx.blocks.model.parameters() if p.requires_grad}
        if (self.params["solver"] != "lbfgs" or not isinstance(classifier, nn.Linear)
                or trainable != {id(p) for p in classifier.parameters()}):
            return None  # a deeper head, or epochs asked for: the loop trains it
        x_train, y_train = ctx.classifier_inputs("train")
        x_val, y_val = ctx.classifier_inputs("val")
        cs = [float(self.params["c"])] if self.params["c"] > 0 else c_grid(int(self.params["num_c"]))
        select = ctx.monitor if self.params["select"] == "monitor" else self.params["select"]
        t0 = time.perf_counter()
        head, fit_seconds, reused = fit_logistic_head_reusing(
            x_train.numpy(), y_train.numpy(), x_val.numpy(), y_val.numpy(), task=ctx.task,
            num_classes=ctx.num_classes, select=select, cs=cs, max_iter=int(self.params["max_iter"]),
            class_weight=ctx.class_weight)
        with torch.no_grad():
            classifier.weight.copy_(torch.as_tensor(head.weight, dtype=classifier.weight.dtype))
            if classifier.bias is not None:
                classifier.bias.copy_(torch.as_tensor(head.bias, dtype=classifier.bias.dtype))
        ctx.record["linear_probe"] = {"solver": "lbfgs", "select": select, "c": head.c, "grid": head.grid,
                                      "reused": reused, "fit_seconds": fit_seconds}
        if not reused:
            return {"c": head.c}
        # an identical fit of an earlier run (another LR, LP-FT's probe): charged what that fit took
        return {"c": head.c, "charge_seconds": max(0.0, fit_seconds - (time.perf_counter() - t0))}

    def depth(self, num_blocks: int) -> int:
        return 0


@register_strategy("top_k")
class TopK(Strategy):
    """Fine-tune the top ``k`` blocks and the head (Kandel & Castelli 2020); ``k=0`` is the head only.

    With blocks ``stem, stage_1..stage_S, head``, k ranges over 0 … S+1 (S+1 = every block).
    """

    main_param = "k"
    defaults = {"k": 1}

    def validate(self) -> None:
        check_int_param(self, "k")

    def check_blocks(self, blocks) -> None:
        max_k = len(blocks) - 1
        if self.params["k"] > max_k:
            names = ", ".join(b.name for b in blocks)
            unit = "blocks" if self.granularity == "block" else "layers"
            raise ConfigError(
                f"{self.name} k={self.params['k']} is out of range for this model, which has {len(blocks)} "
                f"{unit} ({names if len(blocks) <= 12 else names[:120] + ', ...'}); use k in 0..{max_k}."
            )

    @classmethod
    def expand(cls, value: str, num_units: int) -> list[int]:
        """k = 1 … num_units - 2: k = 0 is ``linear`` and k = num_units - 1 is ``full``, run on their own."""
        return list(range(1, max(num_units - 1, 1)))

    def set_trainable(self, blocks) -> None:
        self.check_blocks(blocks)
        freeze_all(blocks)
        head = blocks.head_idx
        set_blocks_trainable(blocks, range(head - self.params["k"], head + 1))

    def depth(self, num_blocks: int) -> int:
        return int(self.params["k"])


@register_strategy("layers_k")
class LayersK(TopK):
    """Fine-tune the top ``k`` layers and the head (Tajbakhsh et al. 2016: k grows from the last layer down)."""

    granularity = "layer"

    @classmethod
    def expand(cls, value: str, num_units: int) -> list[int]:
        """Every depth, k = 0 (the last layer alone) … num_units - 1 (every layer): Tajbakhsh et al.'s
        sweep, which no separate ``linear`` or ``full`` run stands in for in their comparison."""
        return list(range(num_units))


@register_strategy("surgical")
class Surgical(Strategy):
    """Fine-tune one block (and the head) only (Lee et al. 2023, surgical fine-tuning).

    ``block`` is a block index (0 = stem) or a block name such as ``stage_2``. ``bn=eval`` (the
    default, as the official configuration, which never calls ``model.train()``) runs every
    BatchNorm in eval mode, the tuned block's included (its affine parameters still train);
    ``bn=train`` follows the run's ``bn_mode`` rule (a trainable BatchNorm uses batch statistics).
    """

    main_param = "block"
    defaults = {"block": 0, "bn": "eval"}

    def validate(self) -> None:
        check_choice(self.params["bn"], "bn", ("eval", "train"), owner=f"strategy {self.name!r}")
        block = self.params["block"]
        if isinstance(block, bool) or not isinstance(block, (int, str)) or (isinstance(block, int) and block < 0):
            raise ConfigError(
                f"The 'block' parameter of strategy 'surgical' must be a block index >= 0 or a block name. Got {block!r}."
            )

    def _index(self, blocks) -> int:
        block = self.params["block"]
        names = [b.name for b in blocks]
        if isinstance(block, str):
            if block not in names:
                raise ConfigError(f"surgical block {block!r} is not a block of this model; blocks: {', '.join(names)}.")
            return names.index(block)
        if block >= blocks.head_idx:
            raise ConfigError(
                f"surgical block={block} is out of range: this model has {len(blocks) - 1} non-head blocks "
                f"({', '.join(names[:-1])}); use 0..{blocks.head_idx - 1}."
            )
        return block

    def check_blocks(self, blocks) -> None:
        self._index(blocks)

    @classmethod
    def expand(cls, value: str, num_units: int) -> list[int]:
        return list(range(num_units - 1))

    def set_trainable(self, blocks) -> None:
        freeze_all(blocks)
        set_blocks_trainable(blocks, [self._index(blocks), blocks.head_idx])

    def freezes_batch_stats(self) -> bool:
        return self.params["bn"] == "eval"


@register_strategy("deft")
class MaskStrategy(Strategy):
    """Fine-tune the blocks (or layers) a DEFT mask selects, plus the head (Vrbančič & Podgorelec 2020).

    ``mask`` is a string of 0/1, one per non-head unit from input to output (``deft:0011``);
    ``granularity`` is ``block`` or ``layer``.
    """

    main_param = "mask"
    defaults = {"mask": "", "granularity": "block"}

    def validate(self) -> None:
        mask, gran = self.params["mask"], self.params["granularity"]
        if not isinstance(mask, str) or not mask or set(mask) - {"0", "1"}:
            raise ConfigError(f"The 'mask' parameter of strategy 'deft' must be a string of 0/1 (one per non-head "
                              f"block, input to output), e.g. 'deft:00111'. Got {mask!r}.")
        if gran not in ("block", "layer"):
            raise ConfigError(f"The 'granularity' parameter of strategy 'deft' must be block or layer. Got {gran!r}.")
        self.granularity = gran

    def check_blocks(self, blocks) -> None:
        if len(self.params["mask"]) != blocks.head_idx:
            raise ConfigError(f"deft mask {self.params['mask']!r} has {len(self.params['mask'])} bits but this model "
                              f"has {blocks.head_idx} non-head {self.granularity}s; give one bit per {self.granularity}.")

    def set_trainable(self, blocks) -> None:
        self.check_blocks(blocks)
        freeze_all(blocks)
        set_blocks_trainable(blocks, [i for i, bit in enumerate(self.params["mask"]) if bit == "1"] + [blocks.head_idx])

    def depth(self, num_blocks: int) -> int:
        return self.params["mask"].count("1")
