"""Strategies of the Davila et al. (2024) comparison: LP-FT, gradual unfreezing, discriminative
LRs, L1-SP/L2-SP and Auto-RGN. Each is a small object over the same hooks as the depth strategies."""

from __future__ import annotations

import torch
from torch import nn

from medtune.models._norm import norm_param_ids
from medtune.strategies._registry import register_strategy
from medtune.strategies.base import (EpochContext, Phase, Strategy, check_float_param, check_int_param, freeze_all,
                                     set_blocks_trainable)
from medtune.strategies.depth import Full, Linear

__all__ = ["LPFT", "GradualLF", "GradualFL", "Discriminative", "L2SP", "L1SP", "AutoRGN"]

@register_strategy("lp_ft")
class LPFT(Strategy):
    """Linear probe to convergence, then fine-tune everything from the probed head (Kumar et al. 2022).

    Phase 1 (``lp``) trains the head on the frozen backbone for ``lp_epochs`` (default: the run's
    epochs) with early stopping on validation; phase 2 (``ft``) starts from phase 1's best weights
    and trains everything at ``ft_lr_scale`` × lr (default 0.1).
    """

    defaults = {"lp_epochs": 0, "ft_lr_scale": 0.1}

    def validate(self) -> None:
        check_int_param(self, "lp_epochs")
        check_float_param(self, "ft_lr_scale", include_min=False)

    def phases(self) -> list[Phase]:
        return [Phase(strategy=Linear(), name="lp", epochs=self.params["lp_epochs"] or None),
                Phase(strategy=Full(), name="ft", lr_scale=float(self.params["ft_lr_scale"]))]

    def depth(self, num_blocks: int) -> int:
        return num_blocks - 1


class _Gradual(Strategy):
    """Unfreeze one more block every ``interval`` epochs, starting from the head only.

    The optimiser gains each newly unfrozen block as a named group (``add_param_group``), so the
    state of the blocks already training is kept.
    """

    defaults = {"interval": 1}
    top_down: bool = True

    def validate(self) -> None:
        check_int_param(self, "interval", min_val=1)

    def unfrozen_blocks(self, epoch: int, num_blocks: int) -> list[int]:
        """Indices of the trainable blocks during ``epoch`` (the head always trains)."""
        head = num_blocks - 1
        count = min(epoch // self.params["interval"], head)
        order = list(range(head - 1, -1, -1)) if self.top_down else list(range(head))
        return sorted(order[:count] + [head])

    def set_trainable(self, blocks) -> None:
        freeze_all(blocks)
        set_blocks_trainable(blocks, [blocks.head_idx])

    def on_epoch_start(self, epoch: int, ctx: EpochContext) -> None:
        blocks = ctx.blocks
        for idx in self.unfrozen_blocks(epoch, len(blocks)):
            params = blocks.parameters(idx)
            if params and not params[0].requires_grad:
                set_blocks_trainable(blocks, [idx])
                ctx.optimizer.add_param_group({"params": params, "name": blocks[idx].name, "lr_scale": 1.0,
                                               "weight_decay": ctx.weight_decay, "lr": ctx.optimizer.param_groups[0]["lr"]})

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
    """Regularisation towards the starting point w0 (Li et al. 2018).

    The loss gains ``alpha * Omega(w - w0)`` over the backbone and ``beta/2 * ||w_head||^2`` on the
    head; the optimiser applies no weight decay (the head's decay is the beta term). w0 is kept
    once (a detached copy taken in ``set_trainable``), not copied per step.
    """

    defaults = {"alpha": 0.01, "beta": 0.01}

    def validate(self) -> None:
        check_float_param(self, "alpha")
        check_float_param(self, "beta")

    def set_trainable(self, blocks) -> None:
        super().set_trainable(blocks)
        head = set(id(p) for p in blocks.parameters(blocks.head_idx))
        self._backbone = [p for p in blocks.model.parameters() if id(p) not in head]
        self._w0 = [p.detach().clone() for p in self._backbone]
        self._head = blocks.parameters(blocks.head_idx)

    def param_groups(self, blocks, lr: float, weight_decay: float) -> list[dict]:
        groups = super().param_groups(blocks, lr, 0.0)
        for g in groups:
            g["weight_decay"] = 0.0
        return groups

    def distance(self, diffs: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def extra_loss(self, model: nn.Module) -> torch.Tensor:
        diffs = [p - w0 for p, w0 in zip(self._backbone, self._w0)]
        head = torch.stack([p.pow(2).sum() for p in self._head]).sum()
        return self.params["alpha"] * self.distance(diffs) + 0.5 * self.params["beta"] * head

    def depth(self, num_blocks: int) -> int:
        return num_blocks - 1


@register_strategy("l2_sp")
class L2SP(_StartingPoint):
    """Fine-tune everything with (alpha/2)||w - w0||² on the backbone and (beta/2)||w_head||² (L2-SP)."""

    def distance(self, diffs: list[torch.Tensor]) -> torch.Tensor:
        return 0.5 * torch.stack([d.pow(2).sum() for d in diffs]).sum()


@register_strategy("l1_sp")
class L1SP(_StartingPoint):
    """Fine-tune everything with alpha||w - w0||₁ on the backbone and (beta/2)||w_head||² (L1-SP)."""

    def distance(self, diffs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([d.abs().sum() for d in diffs]).sum()


@register_strategy("auto_rgn")
class AutoRGN(Strategy):
    """Per-tensor LR scaled by the relative gradient norm (Lee et al. 2023, official algorithm).

    At the start of every epoch, on ``num_batches`` training mini-batches: RGN_i = mean over the
    batches of ||grad θ_i||₂ / ||θ_i||₂ for every non-normalisation tensor; w_i = RGN_i / max_j RGN_j;
    the optimiser is rebuilt with one group per tensor at lr · w_i (as the reference does), and
    normalisation parameters are left out of it. The per-block mean w_i per epoch is recorded in
    the run's ``extras["auto_rgn"]``.
    """

    defaults = {"num_batches": 5}

    def validate(self) -> None:
        check_int_param(self, "num_batches", min_val=1)

    def param_groups(self, blocks, lr: float, weight_decay: float) -> list[dict]:
        norm = norm_param_ids(blocks.model)
        return [{**g, "params": [p for p in g["params"] if id(p) not in norm]}
                for g in super().param_groups(blocks, lr, weight_decay)]

    @staticmethod
    def relative_gradient_norms(model: nn.Module, params: list[nn.Parameter], batches, loss_fn) -> torch.Tensor:
        """mean over batches of ||g_i|| / ||θ_i|| for each tensor in ``params`` (tensor of shape (len(params),)).

        Buffers (BatchNorm running statistics) are restored afterwards so probing changes nothing.
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
