"""Parameter-efficient strategies beside the depth strategies: BitFit, norm tuning, LoRA, the kNN probe.

Each trains (or fits) a small set of parameters spread over every block, where the depth strategies
train whole blocks. Dutt et al. (MIDL 2024) compare 17 such methods on medical images; MedMNIST+
(Doerrich et al. 2024) adds the kNN probe beside the linear probe. Every strategy here writes the
number of parameters it trains per block to ``extras["trainable_per_block"]``.
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import torch
from torch import nn

from medtune._checks import check_choice
from medtune.errors import ConfigError
from medtune.models._norm import norm_param_ids
from medtune.strategies._registry import register_strategy
from medtune.strategies.base import (EpochContext, SolveContext, Strategy, check_float_param, check_int_param,
                                     freeze_all, set_blocks_trainable)

__all__ = ["BitFit", "NormTuning", "LoRA", "KNNProbe", "KNNHead", "trainable_per_block"]


def trainable_per_block(blocks) -> dict[str, int]:
    """{block name: number of trainable parameters} of a partition (every block, zeros included)."""
    return {block.name: int(sum(p.numel() for p in blocks.parameters(i) if p.requires_grad))
            for i, block in enumerate(blocks)}


class _Sparse(Strategy):
    """A strategy that trains a chosen subset of every block's parameters plus the whole head block."""

    def chosen(self, blocks) -> list[nn.Parameter]:
        raise NotImplementedError

    def set_trainable(self, blocks) -> None:
        freeze_all(blocks)
        for p in self.chosen(blocks):
            p.requires_grad_(True)
        set_blocks_trainable(blocks, [blocks.head_idx])

    def on_epoch_start(self, epoch: int, ctx: EpochContext) -> None:
        if epoch == 0:
            ctx.record["trainable_per_block"] = trainable_per_block(ctx.blocks)


@register_strategy("bitfit")
class BitFit(_Sparse):
    """BitFit (Ben Zaken et al. 2022): every bias (convolution, linear, normalisation β) plus the head block.

    The bias of a BatchNorm makes its layer trainable, so with the default ``bn_mode: eval`` it runs in
    train mode and its running statistics follow the target data (medtune's rule for a trained norm
    layer); ``bn_mode`` does not change that.
    """

    def chosen(self, blocks) -> list[nn.Parameter]:
        return [p for name, p in blocks.model.named_parameters() if name.rsplit(".", 1)[-1] == "bias"]


@register_strategy("norm")
class NormTuning(_Sparse):
    """Norm tuning: the affine parameters (γ, β) of every normalisation layer plus the head block.

    ``stats`` (the main parameter): ``train`` (default) re-estimates the BatchNorm running statistics on
    the target data (the layers train, so they run in train mode); ``frozen`` keeps the pretrained
    statistics (every BatchNorm in eval mode) and trains only the affine parameters.
    """

    main_param = "stats"
    show_default_main = False
    defaults = {"stats": "train"}

    def validate(self) -> None:
        check_choice(self.params["stats"], "stats", ("train", "frozen"), owner=f"strategy {self.name!r}")

    def chosen(self, blocks) -> list[nn.Parameter]:
        ids = norm_param_ids(blocks.model)
        return [p for p in blocks.model.parameters() if id(p) in ids]

    def freezes_batch_stats(self) -> bool:
        return self.params["stats"] == "frozen"


def _same_padding_conv_compatible(module: nn.Module) -> None:
    """Let peft build adapters for timm's ``Conv2dSame`` (TF "same" padding, used by the tf_* models):
    peft makes ``lora_A`` with ``type(base)(..., padding_mode=...)``, an argument Conv2dSame does not
    take. The module's class becomes a subclass that accepts (and ignores) it; its forward is unchanged,
    so ``lora_A`` pads the same way as the base convolution and the merged kernel equals B·A."""
    from timm.layers import Conv2dSame

    if type(module) is Conv2dSame:
        module.__class__ = _Conv2dSamePeft


def _conv2d_same_peft():
    from timm.layers import Conv2dSame

    class Conv2dSamePeft(Conv2dSame):
        """timm's Conv2dSame taking ``padding_mode`` (only "zeros", which is what it does)."""

        def __init__(self, *args, padding_mode: str = "zeros", **kwargs) -> None:
            super().__init__(*args, **kwargs)

    return Conv2dSamePeft


_Conv2dSamePeft = _conv2d_same_peft()


@register_strategy("lora")
class LoRA(Strategy):
    """LoRA (Hu et al. 2022) via HuggingFace peft: low-rank adapters on frozen layers, the head trained fully.

    The adapters sit beside the frozen convolutions and/or linear layers outside the head block.
    Parameters: ``r`` (rank, 8), ``alpha`` (scaling alpha / r, 8: peft's defaults), ``dropout`` (on the
    adapter's input, 0), ``modules``: ``conv``, ``linear`` or ``both`` (default) — which layer types get
    adapters. Grouped (depthwise) convolutions get none: peft needs the rank divisible by the groups and
    cannot merge them. After training the adapters are merged into the weights
    (:meth:`finalize_model`), so the stored run is the plain architecture — its BatchNorm buffers
    included (peft's ``save_pretrained`` leaves them out, peft issue #1732) — and ``predict``,
    ``export`` and the UAP audit see the merged model. Frozen BatchNorm layers follow ``bn_mode``
    (default eval: the pretrained statistics; ``train`` re-estimates them, and the stored run keeps them).
    """

    defaults = {"r": 8, "alpha": 8.0, "dropout": 0.0, "modules": "both"}

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self._lora = None  # the peft LoraModel while the adapters are in place

    def validate(self) -> None:
        check_int_param(self, "r", min_val=1)
        check_float_param(self, "alpha", include_min=False)
        check_float_param(self, "dropout", max_val=0.99)
        check_choice(self.params["modules"], "modules", ("conv", "linear", "both"), owner=f"strategy {self.name!r}")
        if importlib.util.find_spec("peft") is None:  # checked when the config is built, before any training
            raise ConfigError("Strategy 'lora' needs HuggingFace peft: pip install 'medtune[peft]'.")

    def target_modules(self, backbone: nn.Module) -> list[str]:
        """Names (relative to the backbone) of the layers that get adapters: convolutions (groups 1)
        and/or linear layers, outside the head block."""
        from medtune.models import get_blocks

        blocks = get_blocks(backbone)
        head = {id(p) for p in blocks.parameters(blocks.head_idx)}
        kinds = {"conv": (nn.Conv2d,), "linear": (nn.Linear,), "both": (nn.Conv2d, nn.Linear)}[self.params["modules"]]
        return [name for name, m in backbone.named_modules()
                if isinstance(m, kinds) and getattr(m, "groups", 1) == 1
                and not any(id(p) in head for p in m.parameters(recurse=False))]

    def prepare_model(self, model: nn.Module) -> None:
        try:
            from peft import LoraConfig
            from peft.tuners.lora import LoraModel
        except ImportError:
            raise ConfigError("Strategy 'lora' needs HuggingFace peft: pip install 'medtune[peft]'.") from None
        backbone = model.backbone
        targets = self.target_modules(backbone)
        if not targets:
            raise ConfigError(f"Strategy {self.spec!r}: {type(backbone).__name__} has no "
                              f"{self.params['modules']} layer outside the head to adapt; choose modules=both.")
        modules = dict(backbone.named_modules())
        for name in targets:
            _same_padding_conv_compatible(modules[name])
        config = LoraConfig(r=int(self.params["r"]), lora_alpha=float(self.params["alpha"]),
                            lora_dropout=float(self.params["dropout"]), target_modules=targets, bias="none")
        self._lora = LoraModel(backbone, config, "default")  # adapters injected in place into ``backbone``

    def set_trainable(self, blocks) -> None:
        freeze_all(blocks)
        for name, p in blocks.model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.requires_grad_(True)
        set_blocks_trainable(blocks, [blocks.head_idx])

    def on_epoch_start(self, epoch: int, ctx: EpochContext) -> None:
        if epoch == 0:
            ctx.record["trainable_per_block"] = trainable_per_block(ctx.blocks)
            ctx.record["lora"] = {"targets": len(self.target_modules_of(ctx.blocks.model)),
                                  "adapter_params": int(sum(p.numel() for n, p in ctx.blocks.model.named_parameters()
                                                            if ".lora_" in n))}

    @staticmethod
    def target_modules_of(backbone: nn.Module) -> list[str]:
        """Names of the layers that hold adapters now."""
        from peft.tuners.lora import LoraLayer

        return [name for name, m in backbone.named_modules() if isinstance(m, LoraLayer)]

    def finalize_model(self, model: nn.Module) -> None:
        if self._lora is None:
            return
        from timm.layers import Conv2dSame

        self._lora.merge_and_unload()  # W ← W + (alpha / r) · B·A, each adapted layer replaced by its base layer
        self._lora = None
        for m in model.modules():
            if type(m) is _Conv2dSamePeft:
                m.__class__ = Conv2dSame


class KNNHead(nn.Module):
    """The kNN probe's classifier: the training features and labels as buffers, cosine similarity,
    the ``k`` nearest training images vote with equal weight.

    Outputs log-probabilities (``log`` of the vote shares, floored at -1e4 so a class without votes gets
    probability exactly 0 under softmax and the loss stays finite); multi-label: the log-odds of each
    label's share, clamped to ±1e4. The votes carry no gradient to the input.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, *, k: int, num_classes: int,
                 multilabel: bool) -> None:
        super().__init__()
        self.k, self.num_classes, self.multilabel = int(k), int(num_classes), bool(multilabel)
        self.register_buffer("train_features", nn.functional.normalize(features.float(), dim=1))
        self.register_buffer("train_labels", labels.float() if multilabel else labels.long())
        self.register_buffer("num_neighbors", torch.tensor(self.k, dtype=torch.long))  # k travels with the weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sims = nn.functional.normalize(x.float().flatten(1), dim=1) @ self.train_features.T
        k = min(self.k, self.train_features.shape[0])
        idx = sims.topk(k, dim=1).indices
        # zero times the similarities: the output stays attached to the input with a zero gradient, so a
        # gradient attack (the UAP audit) runs and finds nothing to follow instead of failing
        anchor = 0.0 * sims.sum(1, keepdim=True)
        if self.multilabel:
            share = self.train_labels[idx].mean(1)
            logits = torch.log(share) - torch.log1p(-share)
            return logits.clamp(-1e4, 1e4) + anchor
        votes = nn.functional.one_hot(self.train_labels[idx], self.num_classes).float().sum(1)
        return torch.log(votes / k).clamp_min(-1e4) + anchor

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """The vote shares (N, K): what scikit-learn's ``KNeighborsClassifier.predict_proba`` returns."""
        out = self.forward(x)
        return torch.sigmoid(out) if self.multilabel else torch.softmax(out, 1)


def _replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> bool:
    """Put ``new`` wherever ``old`` is a child inside ``root``; True if found."""
    found = False
    for parent in root.modules():
        for name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, name, new)
                found = True
    return found


@register_strategy("knn")
class KNNProbe(Strategy):
    """kNN probe (MedMNIST+, Doerrich et al. 2024): votes of the k nearest training images, frozen features.

    The ``k`` (11) nearest training images by cosine similarity of the pooled features; class
    probabilities are their vote shares.
    Solved like the linear probe, on the inputs of the backbone's classifier (the cached frozen
    features): the classifier is replaced by a :class:`KNNHead` that holds the training features, so
    the stored run predicts, is evaluated and reloads (``predict``, the audit) like any other. Nothing
    is trained: ``trainable_params`` is 0; ``lr`` and ``weight_decay`` are unused. The UAP audit of a kNN
    run is not informative: the votes give no gradient, so a gradient-based UAP stays zero.
    """

    main_param = "k"
    defaults = {"k": 11}

    def validate(self) -> None:
        check_int_param(self, "k", min_val=1)

    def set_trainable(self, blocks) -> None:
        freeze_all(blocks)
        # the classifier stands in for the head to be fitted, so the frozen prefix is cut before it as
        # for the linear probe; it is replaced by the kNN head, which has no parameters
        for p in blocks.model.get_classifier().parameters():
            p.requires_grad_(True)

    def ignores_optimiser(self, blocks) -> bool:
        return True

    def solve(self, ctx: SolveContext) -> dict:
        x_train, y_train = ctx.classifier_inputs("train")
        t0 = time.perf_counter()
        backbone = ctx.blocks.model
        old = backbone.get_classifier()
        head = KNNHead(x_train, y_train, k=int(self.params["k"]), num_classes=ctx.num_classes,
                       multilabel=ctx.task == "multilabel").to(next(iter(old.parameters()), x_train).device)
        if not _replace_module(backbone, old, head):
            raise ConfigError(f"Strategy 'knn' cannot find the classifier of {type(backbone).__name__} to replace.")
        _replace_module(ctx.net, old, head)  # the suffix after a cached prefix holds the same module
        ctx.record["trainable_per_block"] = {block.name: 0 for block in ctx.blocks}
        ctx.record["knn"] = {"k": int(self.params["k"]), "metric": "cosine", "num_train": int(len(x_train)),
                             "fit_seconds": time.perf_counter() - t0}
        return {"k": int(self.params["k"])}

    @classmethod
    def restore_model(cls, backbone: nn.Module, state: dict) -> None:
        features, labels = state.get(_head_key(backbone, "train_features")), state.get(_head_key(backbone, "train_labels"))
        if features is None or labels is None:
            return  # not a kNN head's weights: load_state_dict names what is missing
        multilabel = labels.dim() == 2
        num_classes = int(getattr(backbone, "num_classes", 0)) or int(labels.max()) + 1
        k = state.get(_head_key(backbone, "num_neighbors"))
        head = KNNHead(features, labels, k=int(k) if k is not None else 11, num_classes=num_classes,
                       multilabel=multilabel)
        _replace_module(backbone, backbone.get_classifier(), head)

    def depth(self, num_blocks: int) -> int:
        return 0


def _head_key(backbone: nn.Module, buffer: str) -> str:
    classifier = backbone.get_classifier()
    for name, module in backbone.named_modules():
        if module is classifier:
            return f"{name}.{buffer}"
    return buffer
