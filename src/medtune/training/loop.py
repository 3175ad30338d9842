"""The one training loop every strategy runs through.

``fit`` runs a strategy's phases; each phase is set up once (:func:`_start_phase`) and trains epochs
(:func:`train_one_epoch`, :func:`evaluate`) or is solved. The loop never branches on a strategy's
name: it asks the hooks of :mod:`medtune.training.hooks`. A :class:`Checkpoint` after every epoch makes
an interrupted run resume to the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import os
import pickle
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medtune._tensors import precision_name, resolve_amp_dtype, to_float
from medtune.data.augment import augment_batch
from medtune.data.base import ImageSet
from medtune.data.diskcache import DiskImages
from medtune.errors import StoreError, TrainingError
from medtune.models._norm import BATCH_STAT_LAYERS
from medtune.training.hooks import Callback, EpochContext, RungReached, SolveContext, StopTraining
from medtune.training.imbalance import balanced_order, class_weights
from medtune.training.cache import (FeaturesDoNotFit, build_chain, cache_unusable_reason, cached_features,
                                    frozen_prefix_length)
from medtune.training.metrics import compute_metrics, higher_is_better
from medtune.training.schedules import lr_at

__all__ = ["fit", "train_one_epoch", "evaluate", "predict_proba", "lr_at", "FitResult", "Checkpoint",
           "set_train_mode", "StopTraining"]


@dataclass
class FitResult:
    """What :func:`fit` returns; ``model`` holds the best weights.

    ``train_seconds`` is what the run costs: its training epochs (the strategy's epoch-start work
    included, e.g. Auto-RGN's probe passes), a phase solved without epochs, and, where the frozen
    prefix is cached, the seconds computing the training split's prefix features took — stored with
    the features, so every run of a prefix is charged the same whatever order runs come in
    (``extras["feature_seconds"]``; the val/test extraction, ``feature_seconds_eval``, is not charged).
    """

    model: nn.Module
    history: list[dict]
    val_metrics: dict[str, float]
    test_metrics: dict[str, float]
    y_true: np.ndarray
    y_prob: np.ndarray
    train_seconds: float
    images_seen: int
    trainable_params: int
    extras: dict = field(default_factory=dict)
    val_y_true: np.ndarray | None = None  # validation labels and probabilities of the best weights,
    val_y_prob: np.ndarray | None = None  # for paired tests, calibration and thresholds chosen on validation
    precision: str = "fp32"  # what training and evaluation computed in: fp32, or autocast bf16 / fp16

    @property
    def images_per_s(self) -> float:
        return self.images_seen / self.train_seconds if self.train_seconds > 0 else float("nan")


def set_train_mode(model: nn.Module, bn_mode: str, *, all_batch_stats_frozen: bool = False,
                   eval_mode: bool = False) -> None:
    """``model.train()``, then batch-statistics layers (BatchNorm) go to eval mode (running statistics
    frozen): every one with ``all_batch_stats_frozen`` (the strategy's choice, e.g. surgical), else
    those whose parameters are all frozen unless ``bn_mode == "train"``. ``eval_mode`` (the strategy's
    choice, e.g. LP-FT's fine-tuning phase) keeps the whole network in eval mode instead: every
    BatchNorm and dropout layer, trainable or not."""
    if eval_mode:
        model.eval()
        return
    model.train()
    if bn_mode == "train" and not all_batch_stats_frozen:
        return
    for module in model.modules():
        if isinstance(module, BATCH_STAT_LAYERS):
            params = list(module.parameters(recurse=False))
            if all_batch_stats_frozen or (params and not any(p.requires_grad for p in params)):
                module.eval()


def _loss_fn(task: str, label_smoothing: float, weight: list[float] | None = None,
             device: torch.device | None = None) -> Callable:
    """The run's loss; ``weight``: per-class CE weights, or per-label BCE ``pos_weight`` (multi-label)."""
    w = None if weight is None else torch.tensor(weight, dtype=torch.float32, device=device)
    if task == "multilabel":
        bce = nn.BCEWithLogitsLoss(pos_weight=w)
        return lambda logits, y: bce(logits.float(), y.float())
    ce = nn.CrossEntropyLoss(weight=w, label_smoothing=label_smoothing)
    return lambda logits, y: ce(logits.float(), y)


def bucket_batches(order: torch.Tensor, sizes: np.ndarray | None, batch_size: int,
                   gen: torch.Generator | None = None) -> list[torch.Tensor]:
    """Index batches of ``order``; with per-image sizes (``resize: bucket``) each batch holds one size
    (the order within a size is kept) and the batches come in an order drawn from ``gen``."""
    if sizes is None:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    sz = torch.as_tensor(np.asarray(sizes))[order]
    chunks = []
    for side in torch.unique(sz).tolist():
        idx = order[sz == side]
        chunks += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    if gen is None:
        return chunks
    return [chunks[i] for i in torch.randperm(len(chunks), generator=gen).tolist()]


def fed_at_size(batch: torch.Tensor, sizes: np.ndarray | None, idx: torch.Tensor) -> torch.Tensor:
    """The batch cropped to its bucket's side (images of a bucket fill the top-left of the canvas)."""
    if sizes is None or batch.dim() != 4:
        return batch
    side = int(np.asarray(sizes)[int(idx[0])])
    return batch[..., :side, :side]


@torch.no_grad()
def predict_proba(model: nn.Module, images: torch.Tensor, *, task: str, batch_size: int = 256,
                  device: torch.device | None = None, labels: torch.Tensor | None = None,
                  loss_fn: Callable | None = None, channels_last: bool = False,
                  autocast_dtype: torch.dtype | None = None,
                  sizes: np.ndarray | None = None, progress: str | None = None) -> tuple[np.ndarray, float | None]:
    """Class probabilities for uint8 ``images`` (N, 3, H, W); also the mean loss when labels are given.
    With ``sizes`` (``resize: bucket``) each image is fed at its own side, a bucket per batch.
    ``progress`` titles a progress bar (:mod:`medtune.progress`; None: none, as in training's evaluations)."""
    from medtune.progress import progress_bar
    device = device or next(itertools.chain(model.parameters(), model.buffers())).device  # a kNN head has buffers only
    was_training = model.training
    model.eval()
    prob, loss_sum = None, 0.0
    batches = bucket_batches(torch.arange(len(images)), sizes, batch_size)
    if isinstance(images, DiskImages):  # read ahead from the decode cache while the model runs
        images.prefetch(batches)
    bar = progress_bar(len(images), progress, unit="img") if progress else None
    for idx in batches:
        x = to_float(fed_at_size(images[idx], sizes, idx), device, channels_last=channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            logits = model(x).float()
        if labels is not None and loss_fn is not None:
            loss_sum += float(loss_fn(logits, labels[idx].to(device))) * len(x)
        p = (torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, 1)).cpu()
        # one output, each batch at its images' rows (bucket batches too): appending small per-batch
        # results between large temporaries fragments the heap (see medtune.robustness._common.predict)
        if prob is None:
            prob = torch.empty((len(images), p.shape[1]), dtype=p.dtype)
        prob[idx] = p
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    model.train(was_training)
    prob = prob.numpy() if prob is not None else np.zeros((0, 0), dtype=np.float32)
    return prob, (loss_sum / len(images) if labels is not None and loss_fn is not None and len(images) else None)


def evaluate(model: nn.Module, data: ImageSet, *, batch_size: int = 256, loss_fn: Callable | None = None,
             channels_last: bool = False, autocast_dtype: torch.dtype | None = None,
             inputs: torch.Tensor | None = None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics of ``model`` on ``data``; returns (metrics, y_true, y_prob).

    ``inputs`` replaces ``data.images`` (e.g. cached prefix features, with ``model`` the suffix).
    """
    loss_fn = loss_fn or _loss_fn(data.task, 0.0)
    prob, loss = predict_proba(model, data.images if inputs is None else inputs, task=data.task,
                               batch_size=batch_size, labels=data.labels,
                               loss_fn=loss_fn, channels_last=channels_last, autocast_dtype=autocast_dtype,
                               sizes=data.sizes if inputs is None else None)
    y_true = data.labels.numpy()
    if not np.isfinite(prob).all():  # diverged weights: say so instead of failing inside scikit-learn
        raise TrainingError("training diverged: the model's outputs are NaN or infinite; lower the learning rate "
                            "or the strategy's regularisation strength.")
    return compute_metrics(y_true, prob, task=data.task, class_names=data.class_names, loss=loss), y_true, prob


# -- checkpoints ---------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """The one checkpoint format, written after every epoch and at every phase boundary.

    ``phase``/``epoch`` say where training continues. At a phase boundary (``epoch == 0`` and
    ``optimizer is None``) ``model`` holds the weights the next phase starts from; mid-phase the
    optimiser, its group layout, the trainable set, the strategy's state, the phase's best so far
    and the AMP scaler come along. Only tensors and plain values, so ``weights_only=True`` loads it.
    """

    phase: int
    epoch: int
    history: list[dict]
    trained: list[str]  # every parameter an optimiser of the run has updated (the trainable count)
    train_seconds: float
    images_seen: int
    extras: dict
    model: dict
    torch_rng: torch.Tensor
    data_rng: torch.Tensor
    optimizer: dict | None = None
    num_epochs: int | None = None  # the phase's budget (a solved phase ends after its one step)
    layout: list[dict] | None = None
    trainable: list[str] | None = None
    strategy: dict | None = None
    best: dict | None = None
    scaler: dict | None = None

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        try:
            torch.save(dataclasses.asdict(self), tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as exc:  # torch reports a failed write (ENOSPC) as RuntimeError
            tmp.unlink(missing_ok=True)
            if isinstance(exc, RuntimeError) and "write" not in str(exc).lower():
                raise
            from medtune._safepaths import disk_hint

            hint = disk_hint(exc) if isinstance(exc, OSError) else "free disk space and run the same command again"
            raise StoreError(f"Cannot write the epoch checkpoint {path} ({' '.join(str(exc).split())[:120]}); "
                             f"{hint}.") from None

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        """Read a checkpoint; an unreadable or foreign file is one StoreError naming it."""
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return cls(**data)
        except (RuntimeError, EOFError, OSError, TypeError, ValueError, KeyError, AttributeError,
                pickle.UnpicklingError) as exc:  # what torch.load raises for a truncated or foreign file
            raise StoreError(f"Epoch checkpoint {path} is unreadable ({type(exc).__name__}).") from None


def _group_layout(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[dict]:
    """The optimiser's groups as parameter names (for rebuilding the same optimiser on resume)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [{"name": g.get("name", ""), "lr_scale": g.get("lr_scale", 1.0), "weight_decay": g["weight_decay"],
             # a parameter the strategy took out of the model (the kNN probe's replaced classifier) is left out
             "params": [names[id(p)] for p in g["params"] if id(p) in names]} for g in optimizer.param_groups]


def _groups_from_layout(layout: list[dict], model: nn.Module) -> list[dict]:
    params = dict(model.named_parameters())
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": [params[n] for n in g["params"]]}
            for g in layout]


# -- the run's fixed set-up ----------------------------------------------------------------------

@dataclass
class _Setup:
    """What stays fixed for a whole run: device, precision, the splits, the loss, the optimiser factory."""

    cfg: Any
    model: nn.Module
    blocks: Any
    device: torch.device
    channels_last: bool
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    train: ImageSet
    val: ImageSet
    test: ImageSet
    train_images: torch.Tensor
    train_labels: torch.Tensor
    loss_fn: Callable
    steps_per_epoch: int
    gen: torch.Generator  # the data order and augmentation RNG
    chain: list | None  # the model as a chain of modules, for the frozen-prefix cut (None: not cacheable)
    chain_starts: list[int]  # chain indices where a new block begins
    data_fingerprint: str
    class_weight: list[float] | None = None  # the loss's weights (class_weight: balanced)
    cache_cuts: frozenset[int] = frozenset()  # frozen depths (in blocks) of the plan's other runs

    @classmethod
    def create(cls, model: nn.Module, data: ImageSet, cfg: Any, blocks, data_fingerprint: str | None = None,
               cache_cuts: frozenset[int] = frozenset()) -> _Setup:
        device = next(model.parameters()).device
        channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cuda")
        amp_dtype = resolve_amp_dtype(cfg.amp, device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        train, val, test = data.split("train"), data.split("val"), data.split("test")
        gen = torch.Generator().manual_seed(cfg.seed)
        weight = class_weights(train.labels.numpy(), data.task, data.num_classes, cfg.class_weight)
        chain, starts, fingerprint = None, [], ""
        if cfg.feature_cache != "off":
            chain = build_chain(model, to_float(train.images[:2], device))
            block_of = {id(p): i for i in range(len(blocks)) for p in blocks.parameters(i)}
            last = -1
            for i, (_, module) in enumerate(chain or []):
                ids = [block_of[id(p)] for p in module.parameters() if id(p) in block_of]
                if ids and min(ids) != last:
                    starts.append(i)
                    last = min(ids)
            # covers pixels and splits, so it identifies each split too (the run's plan computed it)
            fingerprint = data_fingerprint or data.fingerprint()
        return cls(cfg=cfg, model=model, blocks=blocks, device=device, channels_last=channels_last,
                   amp_dtype=amp_dtype, scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
                   train=train, val=val, test=test,
                   # disk-backed images stay on disk: batches are read (pinned on CUDA) as they are drawn
                   train_images=(train.images.to(device) if device.type == "cuda"
                                 and isinstance(train.images, torch.Tensor) else train.images),
                   train_labels=train.labels.to(device),
                   loss_fn=_loss_fn(data.task, cfg.label_smoothing, device=device, weight=weight), class_weight=weight,
                   steps_per_epoch=max(1, len(bucket_batches(torch.arange(len(train)), train.sizes, cfg.batch_size))),
                   gen=gen, chain=chain,
                   chain_starts=starts, data_fingerprint=fingerprint,
                   cache_cuts=frozenset(cache_cuts))

    def autocast(self) -> torch.autocast:
        """The run's precision for a forward pass: autocast to ``amp_dtype``, or disabled (float32)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None)

    def to_input(self, batch: torch.Tensor) -> torch.Tensor:
        return to_float(batch, self.device, channels_last=self.channels_last)

    def build_optimizer(self, groups: list[dict], kind: str | None = None) -> torch.optim.Optimizer:
        """An optimiser over ``groups``: ``kind`` (``adamw`` or ``sgd``), default the run's."""
        groups = [g for g in groups if g["params"]]
        if not groups:  # nothing trains yet (cannot happen with a head): keep a valid optimiser
            groups = [{"params": [], "name": "empty", "lr_scale": 1.0, "weight_decay": 0.0}]
        # foreach: one multi-tensor kernel per group instead of a Python loop over the parameters; on CPU
        # torch defaults to the loop, which costs a ResNet-18 step ~25% (benchmarks/README.md); the
        # update is bit-identical (``fused`` is ~4x faster again but rounds differently)
        if (kind or self.cfg.optimizer) == "sgd":
            return torch.optim.SGD(groups, lr=self.cfg.lr, momentum=self.cfg.momentum, foreach=True)
        if (kind or self.cfg.optimizer) == "adam":  # MedMNIST v2: torch.optim.Adam, weight decay as L2
            return torch.optim.Adam(groups, lr=self.cfg.lr, foreach=True)
        return torch.optim.AdamW(groups, lr=self.cfg.lr, foreach=True)


# -- one phase -----------------------------------------------------------------------------------

@dataclass
class _Phase:
    """A phase being trained: its strategy, optimiser, the network the batches go through (the whole
    model, or the suffix after a cached frozen prefix), the cached features and the best epoch."""

    idx: int
    name: str
    strategy: Any
    base_lr: float
    num_epochs: int
    total_steps: int
    warmup_steps: int
    optimizer_kind: str
    weight_decay: float
    patience: int
    monitor: str
    optimizer: torch.optim.Optimizer
    net: nn.Module
    feats: dict[str, torch.Tensor]
    best: dict
    epoch: int = 0
    constant_lr: bool = False

    def build_optimizer(self, run: _Setup, groups: list[dict]) -> torch.optim.Optimizer:
        return run.build_optimizer(groups, self.optimizer_kind)


def _cache_prefix(run: _Setup, phase: _Phase, log: Callable[[str], None]) -> dict[str, Any] | None:
    """Train this phase on cached features of its frozen prefix when that is exact and they fit the
    budgets; returns what the run record keeps of them (the stored extraction seconds per split, the
    same for every run of that prefix; the storage dtype, max |feature|, the cut, the bytes), or
    ``{"off": reason}`` when the phase runs uncached (the reason is also logged)."""
    cfg = run.cfg
    cut = frozen_prefix_length(run.chain, cfg.bn_mode) if run.chain is not None else 0
    reason = ("images come in several sizes (resize: bucket)" if run.train.sizes is not None else
              cache_unusable_reason(augment=cfg.augment, prefix_fixed=phase.strategy.frozen_prefix_is_fixed(),
                                    prefix_len=cut, chain_ok=run.chain is not None))
    if reason is None:
        spill = os.path.join(cfg.store, "feature-cache")
        splits = {name: (split.images, f"{run.data_fingerprint}:{name}:{cfg.bn_mode}")
                  for name, split in (("train", run.train), ("val", run.val), ("test", run.test))}
        try:
            feats = cached_features(run.chain, cut, splits, batch_size=cfg.eval_batch_size, to_input=run.to_input,
                                    storage=cfg.feature_cache, block_starts=run.chain_starts, cuts=run.cache_cuts,
                                    spill_dir=spill,
                                    precision=precision_name(run.amp_dtype), autocast=run.autocast,
                                    memory_bytes=_gib_to_bytes(cfg.feature_cache_memory_gb),
                                    disk_bytes=_gib_to_bytes(cfg.feature_cache_disk_gb))
        except FeaturesDoNotFit as exc:
            reason = f"{exc}; running uncached (raise feature_cache_memory_gb or feature_cache_disk_gb to cache it)"
    if reason is not None:
        log(f"[{phase.name}] feature cache off: {reason}")
        return {"off": reason}
    for name, features in feats.items():
        phase.feats[name] = features.values.to(run.device) if run.device.type == "cuda" else features.values
    phase.net = nn.Sequential(*[m for _, m in run.chain[cut:]])
    train = feats["train"]
    log(f"[{phase.name}] feature cache: frozen prefix of {cut} modules ({run.chain[cut - 1][0]}) "
        f"computed once ({train.seconds:.2f}s on the training split); training on "
        f"{tuple(train.values.shape[1:])} features stored in {train.dtype} (max |x| {train.max_abs:.3g})")
    return {**{name: f.seconds for name, f in feats.items()}, "dtype": train.dtype,
            "max_abs": max(f.max_abs for f in feats.values()), "cut": run.chain[cut - 1][0],
            "feature_shape": list(train.values.shape[1:]),
            "bytes": sum(f.values.numel() * f.values.element_size() for f in feats.values())}


def _gib_to_bytes(gib: float) -> int | None:
    """A budget setting in GiB as bytes (0: None, the cache's default)."""
    return max(1, int(gib * 2**30)) if gib else None


def _charge_features(state: dict, phase_name: str, cached: dict[str, Any] | None) -> None:
    """Charge a phase's feature extraction once (a resumed phase finds its charge in ``extras``) and
    record the cache's precision, cut and size under ``extras["feature_cache"][phase]``, or why the
    phase ran uncached under ``extras["feature_cache_off"][phase]``."""
    extras = state["extras"]
    charged = extras.setdefault("feature_cache", {})
    extras.setdefault("feature_seconds", 0.0)
    extras.setdefault("feature_seconds_eval", 0.0)
    if cached is not None and "off" in cached:
        extras.setdefault("feature_cache_off", {})[phase_name] = cached["off"]
        return
    if cached is None or phase_name in charged:
        return
    charged[phase_name] = cached
    extras["feature_seconds"] += cached["train"]
    extras["feature_seconds_eval"] += cached["val"] + cached["test"]
    state["train_seconds"] += cached["train"]


def _start_phase(run: _Setup, idx: int, spec, state: dict, resume: Checkpoint | None,
                 log: Callable[[str], None]) -> _Phase:
    """Set up phase ``idx``: trainable parameters, optimiser, a resumed mid-phase state, the prefix cut."""
    cfg, model, blocks = run.cfg, run.model, run.blocks
    s = spec.strategy
    base_lr = cfg.lr * spec.lr_scale
    num_epochs = spec.epochs or getattr(cfg, spec.budget_field) or spec.budget_scale * cfg.epochs
    weight_decay = cfg.weight_decay if spec.weight_decay is None else spec.weight_decay
    s.set_trainable(blocks)
    phase = _Phase(idx=idx, name=spec.name, strategy=s, base_lr=base_lr, num_epochs=num_epochs,
                   total_steps=num_epochs * run.steps_per_epoch,
                   warmup_steps=int(round(cfg.warmup_epochs * run.steps_per_epoch)),
                   optimizer_kind=spec.optimizer or cfg.optimizer, weight_decay=weight_decay,
                   patience=cfg.patience if spec.patience is None else spec.patience,
                   monitor=spec.monitor or cfg.monitor, optimizer=None, net=model, feats={},
                   best={"score": None, "state": None, "epoch": -1, "metrics": {}, "bad": 0},
                   constant_lr=spec.schedule == "constant")
    phase.optimizer = phase.build_optimizer(run, s.param_groups(blocks, base_lr, weight_decay))
    if resume is not None and resume.phase == idx and resume.optimizer is not None:
        # after set_trainable, so strategies that keep the starting point (L2-SP) keep the pretrained one
        model.load_state_dict(resume.model)
        trainable = set(resume.trainable)
        for name, p in model.named_parameters():
            p.requires_grad_(name in trainable)
        phase.optimizer = phase.build_optimizer(run, _groups_from_layout(resume.layout, model))
        phase.optimizer.load_state_dict(resume.optimizer)
        phase.num_epochs = resume.num_epochs or phase.num_epochs
        s.load_state_dict(resume.strategy)
        phase.best, phase.epoch = resume.best, resume.epoch
        torch.set_rng_state(resume.torch_rng)
        run.gen.set_state(resume.data_rng)
        if resume.scaler is not None:
            run.scaler.load_state_dict(resume.scaler)
    _log_groups(log, phase.name, phase.optimizer, model)
    _charge_features(state, phase.name, _cache_prefix(run, phase, log) if cfg.feature_cache != "off" else None)
    return phase


def _probe_batches(run: _Setup, phase: _Phase, epoch: int, num_batches: int,
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches for strategies that probe gradients at an epoch start, from their own RNG (the data
    order of training is untouched)."""
    g = torch.Generator().manual_seed(run.cfg.seed * 1_000_003 + phase.idx * 10_000 + epoch)
    order = torch.randperm(len(run.train), generator=g)
    source = phase.feats.get("train", run.train_images)
    for idx in bucket_batches(order, run.train.sizes, run.cfg.batch_size, g)[:num_batches]:
        batch = fed_at_size(source[idx.to(source.device)], run.train.sizes, idx)
        yield run.to_input(batch), run.train_labels[idx.to(run.device)]


def train_one_epoch(run: _Setup, phase: _Phase) -> tuple[float, float]:
    """One pass over the training split in the order drawn from ``run.gen``; returns (mean loss, last LR)."""
    cfg, opt, bs = run.cfg, phase.optimizer, run.cfg.batch_size
    order = (balanced_order(run.train.labels, run.train.task, run.gen) if cfg.sampler == "balanced"
             else torch.randperm(len(run.train), generator=run.gen))
    source = phase.feats.get("train", run.train_images)
    loss_sum = torch.zeros((), device=run.device)
    lr = phase.base_lr
    batches = bucket_batches(order, run.train.sizes, bs, run.gen)
    if isinstance(source, DiskImages):  # read ahead from the decode cache while the model trains
        source.prefetch(batches)
    for b, idx in enumerate(batches):
        lr = phase.base_lr if phase.constant_lr else lr_at(
            phase.epoch * run.steps_per_epoch + b, total_steps=phase.total_steps, warmup_steps=phase.warmup_steps,
            base_lr=phase.base_lr, schedule=cfg.schedule, steps_per_epoch=run.steps_per_epoch)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        x = run.to_input(fed_at_size(source[idx.to(source.device)], run.train.sizes, idx))
        if cfg.augment:  # per-sample draws from the data RNG, so a resumed run repeats them
            x = augment_batch(x, cfg.augment, run.gen)
        y = run.train_labels[idx.to(run.device)]
        with run.autocast():
            loss = run.loss_fn(phase.net(x), y)
        extra = phase.strategy.extra_loss(run.model)
        if extra is not None:
            loss = loss + extra
        opt.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(opt)
        run.scaler.update()
        loss_sum += loss.detach() * len(idx)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    # .item() syncs CPU and GPU, so the loss is read once per epoch
    mean_loss = float(loss_sum.item()) / len(run.train)
    if not math.isfinite(mean_loss):  # diverged: stop before NaN weights reach validation and the metrics
        raise TrainingError(f"training diverged: the loss became {mean_loss} in epoch {phase.epoch + 1} of phase "
                            f"{phase.name!r} (lr {phase.base_lr:g}); lower the learning rate or the strategy's "
                            "regularisation strength.")
    return mean_loss, lr


def _update_best(phase: _Phase, model: nn.Module, val_metrics: dict) -> None:
    """Keep the best epoch's weights by the phase's monitored validation metric (strict improvement;
    the validation loss stands in where the metric is undefined). Epochs before the strategy's
    ``selectable_from`` are neither kept nor counted towards early stopping."""
    if phase.epoch < phase.strategy.selectable_from(phase.num_epochs):
        return
    monitor = phase.monitor
    higher = higher_is_better(monitor)
    score = val_metrics.get(monitor, float("nan"))
    if math.isnan(score):
        score = -val_metrics["loss"] if higher else val_metrics["loss"]
    best = phase.best
    if best["score"] is None or (score > best["score"] if higher else score < best["score"]):
        phase.best = {"score": score, "state": copy.deepcopy(model.state_dict()), "epoch": phase.epoch,
                      "metrics": val_metrics, "bad": 0}
    else:
        best["bad"] += 1


def fit(model: nn.Module, data: ImageSet, strategy, cfg: Any, *, blocks, checkpoint_path: str | Path | None = None,
        callbacks: Sequence[Callback] = (), log: Callable[[str], None] | None = None,
        data_fingerprint: str | None = None, cache_cuts: Iterable[int] = (), pause_at: int | None = None) -> FitResult:
    """Train ``model`` on ``data``'s train split with ``strategy``, early-stopping on the val split.

    Args:
        model: a model taking float images in [0, 1] (``NormalizedModel``), already on its device.
        data: the ImageSet with train/val/test splits.
        strategy: a Strategy instance (its ``phases()`` are run in order).
        cfg: the run's configuration (epochs, lr, optimiser, batch size, patience, monitor, ...).
        blocks: the backbone's block partition (``medtune.models.get_blocks``) at the strategy's granularity.
        checkpoint_path: epoch checkpoint file; if it exists the run resumes from it.
        callbacks: :class:`~medtune.training.hooks.Callback` objects; they observe and may raise StopTraining.
        log: a function taking one line of text (e.g. ``print``); None is silent.
        data_fingerprint: ``data.fingerprint()`` when the run's plan has it (else computed here).
        cache_cuts: frozen depths (blocks) other runs of the plan freeze: the feature cache's pass
            stores those cuts too (a top-k sweep pays one pass).
        pause_at: stop once this many epochs (history rows, all phases) are trained and checkpointed,
            by raising :class:`~medtune.training.hooks.RungReached` (successive halving's rung). The LR
            schedule still spans the full budget, so a later ``fit`` continues as if never paused. A run
            that ends (its budget, early stopping) before then returns as usual.

    Returns:
        FitResult with the best weights loaded, history, val/test metrics and test probabilities.

    Raises:
        StoreError: the checkpoint file exists but cannot be read.
        RungReached: ``pause_at`` epochs are trained (only with a ``checkpoint_path``).
    """
    log = log or (lambda _msg: None)
    run = _Setup.create(model, data, cfg, blocks, data_fingerprint, frozenset(cache_cuts))
    state: dict[str, Any] = {"phase": 0, "history": [], "train_seconds": 0.0, "images_seen": 0, "extras": {},
                             "trained": set()}
    ckpt, resume = _open_checkpoint(checkpoint_path, run, state, log, strategy)
    for idx, spec in enumerate(strategy.phases()):
        if idx < state["phase"]:
            continue
        phase = _start_phase(run, idx, spec, state, resume, log)
        resume = None
        ctx = EpochContext(model=phase.net, blocks=blocks, optimizer=phase.optimizer, lr=phase.base_lr,
                           weight_decay=phase.weight_decay, batches=None, loss_fn=run.loss_fn,
                           build_optimizer=lambda groups, _p=phase: _p.build_optimizer(run, groups),
                           record=state["extras"], num_epochs=phase.num_epochs)
        stop = False
        while phase.epoch < phase.num_epochs and not stop:
            if pause_at is not None and len(state["history"]) >= pause_at and ckpt is not None:
                raise RungReached(len(state["history"]), state["history"])  # the checkpoint holds this point
            record = _run_epoch(run, phase, ctx, state, log)
            try:
                for cb in callbacks:
                    cb.on_epoch_end(record)
            except StopTraining:
                stop = True
            stop = stop or bool(phase.patience and phase.best["bad"] >= phase.patience)
            _save_checkpoint(ckpt, run, state, phase, idx, phase.epoch)
        if stop and phase.epoch < phase.num_epochs:
            log(f"[{phase.name}] early stop after epoch {phase.epoch} (best epoch {phase.best['epoch'] + 1})")
        if phase.best["state"] is not None:  # None only if a callback stopped before any selectable epoch
            model.load_state_dict(phase.best["state"])
        state["phase"] = idx + 1
        state["extras"].setdefault("phases", []).append(
            {"name": phase.name, "best_epoch": phase.best["epoch"], "val": phase.best["metrics"]})
        _save_checkpoint(ckpt, run, state, None, idx + 1, 0)
    return _final_result(run, state)


def _run_epoch(run: _Setup, phase: _Phase, ctx: EpochContext, state: dict, log: Callable[[str], None]) -> dict:
    """The strategy's epoch-start hook and one training epoch (or, at a phase's start, the strategy's
    solve instead), validation, the best-epoch update; the history row. The hook's work (Auto-RGN's
    probe passes) is timed as training."""
    cfg, model = run.cfg, run.model
    frozen_stats = phase.strategy.freezes_batch_stats()
    eval_mode = phase.strategy.trains_in_eval_mode()
    ctx.optimizer = phase.optimizer
    ctx.batches = lambda n, _e=phase.epoch: _probe_batches(run, phase, _e, n)
    set_train_mode(model, cfg.bn_mode, all_batch_stats_frozen=frozen_stats, eval_mode=eval_mode)
    t0 = time.perf_counter()
    phase.strategy.on_epoch_start(phase.epoch, ctx)
    phase.optimizer = ctx.optimizer
    # the hook may have unfrozen layers
    set_train_mode(model, cfg.bn_mode, all_batch_stats_frozen=frozen_stats, eval_mode=eval_mode)
    state["trained"].update(id(p) for g in phase.optimizer.param_groups for p in g["params"])
    solved = _solve(run, phase, state) if phase.epoch == 0 else None
    if solved is None:
        train_loss, lr = train_one_epoch(run, phase)
    else:  # the phase is this one step
        train_loss, lr = float("nan"), None
        phase.num_epochs = 1
    # a solve reused from an identical earlier one is charged what that solve took (order-independent time)
    seconds = time.perf_counter() - t0 + (solved.pop("charge_seconds", 0.0) if solved else 0.0)
    state["train_seconds"] += seconds
    state["images_seen"] += len(run.train)
    val_metrics, _, _ = evaluate(phase.net, run.val, batch_size=cfg.eval_batch_size, loss_fn=run.loss_fn,
                                 channels_last=run.channels_last, autocast_dtype=run.amp_dtype,
                                 inputs=phase.feats.get("val"))
    record = {"phase": phase.name, "epoch": phase.epoch, "train_loss": train_loss, "lr": lr, "seconds": seconds,
              "trainable_params": sum(p.numel() for g in phase.optimizer.param_groups for p in g["params"]),
              **(solved or {}), **{f"val_{k}": v for k, v in val_metrics.items()}}
    state["history"].append(record)
    _update_best(phase, model, val_metrics)
    log(f"[{phase.name}] {'solved' if solved is not None else 'epoch'} {phase.epoch + 1}/{phase.num_epochs} "
        f"loss {train_loss:.4f} val_{phase.monitor} {val_metrics.get(phase.monitor, float('nan')):.4f} "
        f"({seconds:.1f}s)")
    phase.epoch += 1
    return record


def _solve(run: _Setup, phase: _Phase, state: dict) -> dict | None:
    """Let the strategy solve the phase (the linear probe) on the inputs of the backbone's classifier."""
    classifier = run.blocks.model.get_classifier()

    @torch.no_grad()
    def classifier_inputs(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        data = run.train if split == "train" else run.val
        source = phase.feats.get(split, data.images)
        captured: list[torch.Tensor] = []
        hook = classifier.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().float().cpu()))
        was_training = phase.net.training
        phase.net.eval()
        sizes = data.sizes if split not in phase.feats else None
        batches = bucket_batches(torch.arange(len(source)), sizes, run.cfg.eval_batch_size)
        try:
            for idx in batches:
                with run.autocast():
                    phase.net(run.to_input(fed_at_size(source[idx], sizes, idx)))
        finally:
            hook.remove()
            phase.net.train(was_training)
        order = np.argsort(torch.cat(batches).numpy(), kind="stable")  # the identity without buckets
        return torch.cat(captured).flatten(1)[torch.as_tensor(order)], data.labels

    ctx = SolveContext(net=phase.net, blocks=run.blocks, task=run.train.task, num_classes=run.train.num_classes,
                       monitor=run.cfg.monitor, classifier_inputs=classifier_inputs, record=state["extras"],
                       class_weight=run.class_weight)
    return phase.strategy.solve(ctx)


def _save_checkpoint(path: Path | None, run: _Setup, state: dict, phase: _Phase | None, next_phase: int,
                     epoch: int) -> None:
    """Write the :class:`Checkpoint` training continues from (mid-phase when ``phase`` is given)."""
    if path is None:
        return
    model = run.model
    mid = {} if phase is None else {
        "optimizer": phase.optimizer.state_dict(), "num_epochs": phase.num_epochs,
        "layout": _group_layout(phase.optimizer, model),
        "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
        "strategy": phase.strategy.state_dict(), "best": phase.best, "scaler": run.scaler.state_dict()}
    Checkpoint(phase=next_phase, epoch=epoch, history=state["history"],
               trained=[n for n, p in model.named_parameters() if id(p) in state["trained"]],
               train_seconds=state["train_seconds"], images_seen=state["images_seen"], extras=state["extras"],
               model=model.state_dict(), torch_rng=torch.get_rng_state(), data_rng=run.gen.get_state(),
               **mid).save(path)


def _final_result(run: _Setup, state: dict) -> FitResult:
    """Validation and test metrics of the best weights, and what the run cost."""
    model, cfg = run.model, run.cfg
    kw = dict(batch_size=cfg.eval_batch_size, loss_fn=run.loss_fn, channels_last=run.channels_last,
              autocast_dtype=run.amp_dtype)
    val_metrics, val_y_true, val_y_prob = evaluate(model, run.val, **kw)
    test_metrics, y_true, y_prob = evaluate(model, run.test, **kw)
    return FitResult(model=model, history=state["history"], val_metrics=val_metrics, test_metrics=test_metrics,
                     y_true=y_true, y_prob=y_prob, val_y_true=val_y_true, val_y_prob=val_y_prob,
                     train_seconds=state["train_seconds"],
                     images_seen=state["images_seen"],
                     trainable_params=sum(p.numel() for p in model.parameters() if id(p) in state["trained"]),
                     extras=state["extras"], precision=precision_name(run.amp_dtype))


def _open_checkpoint(path: str | Path | None, run: _Setup, state: dict, log: Callable[[str], None],
                     strategy=None) -> tuple[Path | None, Checkpoint | None]:
    """Clean temp files of killed writers; load an existing checkpoint into ``state``. A phase-boundary
    checkpoint is applied here (its weights start the next phase); a mid-phase one is returned for
    :func:`_start_phase` to apply after the phase's ``set_trainable``."""
    if path is None:
        return None, None
    ckpt = Path(path)
    for stale in ckpt.parent.glob(ckpt.name + ".tmp*"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    if not ckpt.exists():
        return ckpt, None
    try:
        resume = Checkpoint.load(ckpt)
    except StoreError as exc:  # truncated or garbage: set it aside and start the run afresh
        aside = ckpt.with_name(ckpt.name + ".corrupt")
        os.replace(ckpt, aside)
        warnings.warn(f"{exc} It was renamed {aside.name} and the run starts from its first epoch.\n"
                      "HINT: a checkpoint is cut short when the disk fills or the machine stops mid-write.",
                      stacklevel=2)
        log(f"corrupt checkpoint set aside as {aside}; starting afresh")
        return ckpt, None
    named = dict(run.model.named_parameters())
    state.update(phase=resume.phase, history=resume.history, train_seconds=resume.train_seconds,
                 images_seen=resume.images_seen, extras=resume.extras,
                 trained={id(named[n]) for n in resume.trained})
    log(f"resuming from {ckpt} at phase {resume.phase} epoch {resume.epoch}")
    if resume.optimizer is None:
        if strategy is not None:  # a module the strategy put in place (the kNN probe's head), rebuilt to load into
            type(strategy).restore_model(run.blocks.model, {k[len("backbone."):]: v for k, v in resume.model.items()
                                                           if k.startswith("backbone.")})
        run.model.load_state_dict(resume.model)
        torch.set_rng_state(resume.torch_rng)
        run.gen.set_state(resume.data_rng)
        return ckpt, None
    return ckpt, resume


def _log_groups(log: Callable[[str], None], phase: str, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    frozen = sum(p.numel() for p in model.parameters()) - trainable
    parts = ", ".join(f"{g.get('name', '?')}={sum(p.numel() for p in g['params'])}" for g in optimizer.param_groups[:12])
    more = f", +{len(optimizer.param_groups) - 12} groups" if len(optimizer.param_groups) > 12 else ""
    log(f"[{phase}] trainable {trainable:,} / frozen {frozen:,} params; groups: {parts}{more}")
