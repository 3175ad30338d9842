"""Strategies of the Davila et al. (2024) comparison: LP-FT, gradual unfreezing, discriminative
LRs, L1-SP/L2-SP and Auto-RGN. Each is a small object over the same hooks as the depth strategies."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from medtune._checks import check_choice
from medtune.errors import ConfigError
from medtune.models._norm import norm_param_ids
from medtune.strategies._registry import register_strategy
from medtune.strategies.base import (EpochContext, Phase, Strategy, check_float_param, check_int_param, freeze_all,
                                     set_blocks_trainable)
from medtune.strategies.depth import Full, Linear

__all__ = ["LPFT", "GradualLF", "GradualFL", "Discriminative", "L2SP", "L1SP", "AutoRGN"]

#: Optimisers a phase may ask for (SGD uses the run's momentum).
OPTIMIZERS = ("sgd", "adamw")


class _FullInEvalMode(Full):
    """``full`` with the whole network in eval mode while it trains (LP-FT's phase 2; not registered)."""

    def trains_in_eval_mode(self) -> bool:
        return True


@register_strategy("lp_ft")
class LPFT(Strategy):
    """Linear probe to convergence, then fine-tune everything from the probed head (Kumar et al. 2022).

    Phase 1 (``lp``) is :class:`~medtune.strategies.depth.Linear`: logistic regression on the frozen
    features with C chosen on validation, or, for a deeper head (VGG's fc6–fc8), epochs to
    convergence (``lp_epochs`` caps them; 0 keeps Linear's cap). Phase 2 (``ft``) starts from
    phase 1's weights and trains everything at ``ft_lr_scale`` × lr (default 0.1: Kumar et al.
    found LP-FT's best LR smaller than fine-tuning's) with ``ft_optimizer``: ``sgd`` (default, as
    their code: SGD, the run's momentum, no weight decay, cosine schedule) or ``adamw`` (the run's
    weight decay).

    ``ft_mode=eval`` (the default) keeps the whole network in eval mode during phase 2: every
    BatchNorm normalises with, and keeps, the running statistics the probe was fitted under, and
    dropout is off. That is the variant Kumar et al.'s README runs LP-FT with
    (``lp_then_ft_valmode_experiments``, which sets ``use_net_val_mode: True``, so
    ``baseline_train.train`` calls ``net.eval()`` instead of ``net.train()``). ``ft_mode=train``
    trains phase 2 as ``full`` does (``model.train()``, BatchNorm by the run's ``bn_mode`` rule), their
    ``lp_then_ft_trainmode_experiments``.
    """

    defaults = {"lp_epochs": 0, "ft_lr_scale": 0.1, "ft_optimizer": "sgd", "ft_mode": "eval"}
    revision = 1  # 1: phase 2 in eval mode, the probe at max_iter 200

    def validate(self) -> None:
        check_int_param(self, "lp_epochs")
        check_float_param(self, "ft_lr_scale", include_min=False)
        check_choice(self.params["ft_optimizer"], "ft_optimizer", OPTIMIZERS, owner=f"strategy {self.name!r}")
        check_choice(self.params["ft_mode"], "ft_mode", ("eval", "train"), owner=f"strategy {self.name!r}")

    def phases(self) -> list[Phase]:
        probe = Linear(**({"max_epochs": self.params["lp_epochs"]} if self.params["lp_epochs"] else {}))
        sgd = self.params["ft_optimizer"] == "sgd"
        fine_tune = _FullInEvalMode() if self.params["ft_mode"] == "eval" else Full()
        return [dataclasses.replace(probe.phases()[0], name="lp"),
                Phase(strategy=fine_tune, name="ft", lr_scale=float(self.params["ft_lr_scale"]),
                      optimizer=self.params["ft_optimizer"], weight_decay=0.0 if sgd else None)]

    def depth(self, num_blocks: int) -> int:
        return num_blocks - 1


class _Gradual(Strategy):
    """Gradual unfreezing: start from the head alone, unfreeze block by block, then train everything.

    Every block is unfrozen within the first ``unfreeze_share`` of the phase's epochs (default 0.5,
    the first half; at least one epoch is left for the whole network): with E epochs and H non-head
    blocks, all blocks train from epoch U = min(ceil(share·E), E-1), and at epoch e < U the first
    ceil(H·e/U) blocks of the order are unfrozen (e = 0: the head alone). With U ≥ H this is one
    block per epoch, as ULMFiT. No epoch before U can be kept as the best and early stopping counts
    only from U, so the run's weights always come from the whole network trained.

    The optimiser gains each newly unfrozen block as a named group (``add_param_group``), so the
    state of the blocks already training is kept.
    """

    defaults = {"unfreeze_share": 0.5}
    top_down: bool = True

    def validate(self) -> None:
        check_float_param(self, "unfreeze_share", include_min=False, max_val=1.0)

    def all_unfrozen_epoch(self, num_epochs: int) -> int:
        """U: the first epoch (0-based) at which every block trains."""
        if num_epochs <= 1:
            return 0
        return min(max(1, math.ceil(self.params["unfreeze_share"] * num_epochs)), num_epochs - 1)

    def unfrozen_blocks(self, epoch: int, num_blocks: int, num_epochs: int) -> list[int]:
        """Indices of the trainable blocks during ``epoch`` (the head always trains)."""
        head = num_blocks - 1
        full_at = self.all_unfrozen_epoch(num_epochs)
        count = head if epoch >= full_at else math.ceil(head * epoch / full_at)
        order = list(range(head - 1, -1, -1)) if self.top_down else list(range(head))
        return sorted(order[:count] + [head])

    def set_trainable(self, blocks) -> None:
        freeze_all(blocks)
        set_blocks_trainable(blocks, [blocks.head_idx])

    def on_epoch_start(self, epoch: int, ctx: EpochContext) -> None:
        blocks = ctx.blocks
        for idx in self.unfrozen_blocks(epoch, len(blocks), ctx.num_epochs):
            params = [p for p in blocks.parameters(idx) if not p.requires_grad]
            if params:
                set_blocks_trainable(blocks, [idx])
                ctx.optimizer.add_param_group({"params": params, "name": blocks[idx].name, "lr_scale": 1.0,
                                               "weight_decay": ctx.weight_decay, "lr": ctx.optimizer.param_groups[0]["lr"]})

    def selectable_from(self, num_epochs: int) -> int:
        return self.all_unfrozen_epoch(num_epochs)

    def frozen_prefix_is_fixed(self) -> bool:
        return False

    def depth(self, num_blocks: int) -> int:
        return num_blocks - 1


@register_strategy("gradual_lf")
class GradualLF(_Gradual):
    """Gradual unfreezing from the last block to the first (ULMFiT; Davila's G-LF)."""

    top_down = True


@register_strategy("gradual_fl")
class GradualFL(_Gradual):
    """Gradual unfreezing from the first block to the last, the head training throughout (Davila's G-FL)."""

    top_down = False


@register_strategy("discriminative")
class Discriminative(Strategy):
    """Everything trains; block i from the top (head = 0) gets lr / factor**i (ULMFiT, factor 2.6)."""

    defaults = {"factor": 2.6}

    def validate(self) -> None:
        check_float_param(self, "factor", min_val=1.0)

    def param_groups(self, blocks, lr: float, weight_decay: float) -> list[dict]:
        groups = super().param_groups(blocks, lr, weight_decay)
        names = [b.name for b in blocks]
        for g in groups:
            g["lr_scale"] = 1.0 / self.params["factor"] ** (blocks.head_idx - names.index(g["name"]))
        return groups

    def depth(self, num_blocks: int) -> int:
        return num_blocks - 1


class _StartingPoint(Strategy):
    """Regularisation towards the starting point w0 (Li, Grandvalet & Davoine 2018).

    The loss gains ``alpha * Omega(w - w0)`` over every *pretrained* parameter and
    ``beta/2 * ||w_new||^2`` over the *new* classifier layer only (``get_classifier()``: the layer
    created for the task, e.g. VGG's fc8; VGG's and AlexNet's fc6 and fc7 are pretrained, so they sit
    under alpha with the rest, although the block partition counts them in the head block). As Li et
    al.'s official code (``model/network_base.py`` of holyseven/TransferLearningClassification,
    ``weight_decay_mode`` 1, its default), ``tensors=weights`` (the default) regularises the
    convolution and linear kernels only (the TF-slim ``weights`` variables: tensors of two or more
    dimensions), not biases or normalisation parameters; ``tensors=all`` regularises every tensor (their
    mode 101). Their ``tf.nn.l2_loss`` is ``sum(x**2) / 2``, hence the halves. The optimiser applies no
    weight decay (the new layer's decay is the beta term). w0 is kept once (a detached copy taken in
    ``set_trainable``), not copied per step. ``optimizer=sgd`` (the default, as Li et al. and TLlib:
    SGD with the run's momentum, so alpha keeps its meaning) or ``adamw`` (which rescales the
    penalty's gradient per coordinate).
    """

    defaults = {"alpha": 0.01, "beta": 0.01, "optimizer": "sgd", "tensors": "weights"}
    revision = 1  # 1: beta on the new classifier only, kernels only

    def validate(self) -> None:
        check_float_param(self, "alpha")
        check_float_param(self, "beta")
        check_choice(self.params["optimizer"], "optimizer", OPTIMIZERS, owner=f"strategy {self.name!r}")
        check_choice(self.params["tensors"], "tensors", ("weights", "all"), owner=f"strategy {self.name!r}")

    def phases(self) -> list[Phase]:
        return [Phase(strategy=self, name=self.name, optimizer=self.params["optimizer"], weight_decay=0.0)]

    def set_trainable(self, blocks) -> None:
        super().set_trainable(blocks)
        regularised = ((lambda p: p.dim() >= 2) if self.params["tensors"] == "weights" else (lambda p: True))
        new = {id(p) for p in blocks.model.get_classifier().parameters()}
        self._pretrained = [p for p in blocks.model.parameters() if id(p) not in new and regularised(p)]
        self._w0 = [p.detach().clone() for p in self._pretrained]
        self._new = [p for p in blocks.model.get_classifier().parameters() if regularised(p)]

    def penalised(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(the parameters pulled towards w0 under alpha, the new layer's parameters under beta), after
        :meth:`set_trainable`."""
        return list(self._pretrained), list(self._new)

    def param_groups(self, blocks, lr: float, weight_decay: float) -> list[dict]:
        return super().param_groups(blocks, lr, 0.0)

    def distance(self, diffs: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def extra_loss(self, model: nn.Module) -> torch.Tensor:
        alpha, beta = self.params["alpha"], self.params["beta"]
        total = torch.zeros((), device=self._new[0].device if self._new else None)
        if alpha and self._pretrained:  # a zero term is skipped, not computed (VGG: 134M parameters)
            total = total + alpha * self.distance([p - w0 for p, w0 in zip(self._pretrained, self._w0)])
        if beta and self._new:
            total = total + 0.5 * beta * torch.stack([p.pow(2).sum() for p in self._new]).sum()
        return total

    def depth(self, num_blocks: int) -> int:
        return num_blocks - 1


@register_strategy("l2_sp")
class L2SP(_StartingPoint):
    """Fine-tune everything with (alpha/2)||w - w0||² on the pretrained weights and (beta/2)||w_new||² on the
    new classifier layer (L2-SP)."""

    def distance(self, diffs: list[torch.Tensor]) -> torch.Tensor:
        return 0.5 * torch.stack([d.pow(2).sum() for d in diffs]).sum()


@register_strategy("l1_sp")
class L1SP(_StartingPoint):
    """Fine-tune everything with alpha||w - w0||₁ on the pretrained weights and (beta/2)||w_new||² on the new
    classifier layer (L1-SP; the official code's ``weight_decay_mode`` 4)."""

    def distance(self, diffs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([d.abs().sum() for d in diffs]).sum()


@register_strategy("auto_rgn")
class AutoRGN(Strategy):
    """Per-tensor LR scaled by the relative gradient norm (Lee et al. 2023, official algorithm).

    At the start of every epoch, on ``num_batches`` training mini-batches: RGN_i = mean over the
    batches of ||grad θ_i||₂ / ||θ_i||₂ for every tensor that is not a normalisation parameter;
    w_i = RGN_i / max_j RGN_j; the optimiser is rebuilt with one group per tensor at lr · w_i, as the
    reference rebuilds Adam each epoch. ``schedule=constant`` (the default) keeps that LR for the
    whole epoch, as the reference (``optim.Adam(params_weights, lr=lr)`` each epoch, no scheduler,
    no warm-up); ``schedule=run`` multiplies w_i by the run's cosine schedule (with its warm-up)
    instead, as medtune did before.

    Which tensors are normalisation parameters: the official code (``main.py`` of
    anniesch/surgical-finetuning) filters by name, leaving out every parameter with ``bn`` in its
    name. On its ResNets that is every BatchNorm but the shortcut ones (``downsample.1``), which
    stay in with an RGN weight; medtune decides by module type (the parameters of every
    normalisation layer, :func:`medtune.models._norm.norm_param_ids`), so no name convention of a
    timm or torchvision backbone lets one through, the shortcut BatchNorms included.

    As the official code, normalisation parameters are frozen (``requires_grad=False``, outside the
    optimiser) and every BatchNorm runs in eval mode, while probing and training, so the running
    statistics never move. ``tune_norm=true`` is medtune's extension: normalisation parameters
    train too, with RGN weights of their own, and their layers follow the run's ``bn_mode`` rule.
    The probe passes are part of the epoch's timed training. The per-block mean w_i per epoch is
    recorded in the run's ``extras["auto_rgn"]``.
    """

    defaults = {"num_batches": 5, "tune_norm": False, "schedule": "constant"}
    revision = 1  # 1: a constant LR per epoch

    def validate(self) -> None:
        check_int_param(self, "num_batches", min_val=1)
        check_choice(self.params["schedule"], "schedule", ("constant", "run"), owner=f"strategy {self.name!r}")
        if not isinstance(self.params["tune_norm"], bool):
            raise ConfigError(f"The 'tune_norm' parameter of strategy 'auto_rgn' must be true or false. "
                              f"Got {self.params['tune_norm']!r}.")

    def phases(self) -> list[Phase]:
        return [Phase(strategy=self, name=self.name,
                      schedule="constant" if self.params["schedule"] == "constant" else None)]

    def set_trainable(self, blocks) -> None:
        super().set_trainable(blocks)
        if not self.params["tune_norm"]:
            norm = norm_param_ids(blocks.model)
            for p in blocks.model.parameters():
                if id(p) in norm:
                    p.requires_grad_(False)

    @staticmethod
    def relative_gradient_norms(model: nn.Module, params: list[nn.Parameter], batches, loss_fn) -> torch.Tensor:
        """mean over batches of ||g_i|| / ||θ_i|| for each tensor in ``params`` (tensor of shape (len(params),)).

        Buffers (BatchNorm running statistics) are restored afterwards, so probing changes nothing
        even where a BatchNorm runs in train mode (``tune_norm``).
        """
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        sums = torch.zeros(len(params), dtype=torch.float64)
        count = 0
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            with torch.no_grad():
                for i, p in enumerate(params):
                    g = p.grad if p.grad is not None else torch.zeros_like(p)
                    sums[i] += float(g.norm() / p.norm().clamp_min(1e-12))
            count += 1
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buf, saved in buffers:
                buf.copy_(saved)
        return sums / max(count, 1)

    def on_epoch_start(self, epoch: int, ctx: EpochContext) -> None:
        blocks = ctx.blocks
        groups = self.param_groups(blocks, ctx.lr, ctx.weight_decay)
        params = [p for g in groups for p in g["params"]]
        block_of = {id(p): g["name"] for g in groups for p in g["params"]}
        rgn = self.relative_gradient_norms(ctx.model, params, ctx.batches(self.params["num_batches"]), ctx.loss_fn)
        weights = rgn / rgn.max().clamp_min(1e-30)
        names = {id(p): n for n, p in blocks.model.named_parameters()}
        ctx.optimizer = ctx.build_optimizer([
            {"params": [p], "name": names[id(p)], "lr_scale": float(w), "weight_decay": ctx.weight_decay}
            for p, w in zip(params, weights)])
        per_block: dict[str, list[float]] = {}
        for p, w in zip(params, weights):
            per_block.setdefault(block_of[id(p)], []).append(float(w))
        ctx.record.setdefault("auto_rgn", []).append(
            {"epoch": epoch, "block_weights": {b: sum(v) / len(v) for b, v in per_block.items()}})

    def depth(self, num_blocks: int) -> int:
        return num_blocks - 1
