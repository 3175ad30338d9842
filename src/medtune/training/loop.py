"""The one training loop every strategy runs through.

``fit`` drives the strategy's phases; each phase trains epochs with ``train_one_epoch`` and
scores the validation split with ``evaluate``. The loop knows nothing of strategy names: it asks
the strategy which parameters train, how they are grouped, what happens at each epoch start and
which extra loss to add. An epoch checkpoint (written atomically, loaded with
``weights_only=True``) makes an interrupted run resume to the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medtune.config import RunConfig
from medtune.data.base import ImageSet
from medtune.strategies.base import EpochContext
from medtune.training.cache import build_chain, cache_unusable_reason, cached_features, frozen_prefix_length
from medtune.training.metrics import compute_metrics, higher_is_better

__all__ = ["fit", "evaluate", "predict_proba", "lr_at", "FitResult", "resolve_device", "set_train_mode",
           "StopTraining"]

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


class StopTraining(Exception):
    """Raised by a callback to end training early (the best checkpoint is still restored)."""


@dataclass
class FitResult:
    """What :func:`fit` returns; ``model`` holds the best weights."""

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

    @property
    def images_per_s(self) -> float:
        return self.images_seen / self.train_seconds if self.train_seconds > 0 else float("nan")


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_at(step: int, *, total_steps: int, warmup_steps: int, base_lr: float, min_ratio: float = 0.01) -> float:
    """Cosine schedule with linear warm-up, a pure function of the step (no hidden scheduler state)."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_train_mode(model: nn.Module, bn_mode: str) -> None:
    """``model.train()``, then BatchNorm layers whose parameters are all frozen go to eval mode
    (running statistics frozen) unless ``bn_mode == "train"``."""
    model.train()
    if bn_mode == "train":
        return
    for module in model.modules():
        if isinstance(module, _NORM_TYPES):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def _loss_fn(task: str, label_smoothing: float) -> Callable:
    if task == "multilabel":
        bce = nn.BCEWithLogitsLoss()
        return lambda logits, y: bce(logits.float(), y.float())
    ce = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    return lambda logits, y: ce(logits.float(), y)


def _to_input(batch: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 images → float in [0, 1] on ``device``; float tensors (cached features) are moved as they are."""
    x = batch.to(device, non_blocking=True)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


@torch.no_grad()
def predict_proba(model: nn.Module, images: torch.Tensor, *, task: str, batch_size: int = 256,
                  device: torch.device | None = None, labels: torch.Tensor | None = None,
                  loss_fn: Callable | None = None, channels_last: bool = False,
                  autocast_dtype: torch.dtype | None = None) -> tuple[np.ndarray, float | None]:
    """Class probabilities for uint8 ``images`` (N, 3, H, W); also the mean loss when labels are given."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    probs, loss_sum = [], 0.0
    for start in range(0, len(images), batch_size):
        x = _to_input(images[start:start + batch_size], device, channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            logits = model(x).float()
        if labels is not None and loss_fn is not None:
            loss_sum += float(loss_fn(logits, labels[start:start + batch_size].to(device))) * len(x)
        probs.append((torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, 1)).cpu())
    model.train(was_training)
    prob = torch.cat(probs).numpy() if probs else np.zeros((0, 0), dtype=np.float32)
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
                               loss_fn=loss_fn, channels_last=channels_last, autocast_dtype=autocast_dtype)
    y_true = data.labels.numpy()
    return compute_metrics(y_true, prob, task=data.task, class_names=data.class_names, loss=loss), y_true, prob


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def _group_layout(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[dict]:
    """The optimiser's groups as names (for rebuilding the same optimiser on resume)."""
    names = _param_names(model)
    return [{"name": g.get("name", ""), "lr_scale": g.get("lr_scale", 1.0), "weight_decay": g["weight_decay"],
             "params": [names[id(p)] for p in g["params"]]} for g in optimizer.param_groups]


def _groups_from_layout(layout: list[dict], model: nn.Module) -> list[dict]:
    params = dict(model.named_parameters())
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": [params[n] for n in g["params"]]}
            for g in layout]


def fit(model: nn.Module, data: ImageSet, strategy, cfg: RunConfig, *, blocks, checkpoint_path: str | Path | None = None,
        callbacks: tuple = (), log: Callable[[str], None] | None = None) -> FitResult:
    """Train ``model`` on ``data``'s train split with ``strategy``, early-stopping on the val split.

    Args:
        model: a model taking float images in [0, 1] (``NormalizedModel``), already on its device.
        data: the ImageSet with train/val/test splits.
        strategy: a Strategy instance (its ``phases()`` are run in order).
        cfg: the run's configuration (epochs, lr, optimiser, batch size, patience, monitor, ...).
        blocks: the backbone's block partition (``medtune.models.get_blocks``) at the strategy's granularity.
        checkpoint_path: epoch checkpoint file; if it exists the run resumes from it.
        callbacks: objects with optional ``on_epoch_end(record)``; they observe and may raise StopTraining.
        log: a function taking one line of text (e.g. ``print``); None is silent.

    Returns:
        FitResult with the best weights loaded, history, val/test metrics and test probabilities.
    """
    log = log or (lambda _msg: None)
    device = next(model.parameters()).device
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cuda")
    use_amp = cfg.amp == "on" or (cfg.amp == "auto" and device.type == "cuda")
    amp_dtype = (torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16) if use_amp else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if channels_last:
        model.to(memory_format=torch.channels_last)

    train, val, test = data.split("train"), data.split("val"), data.split("test")
    loss_fn = _loss_fn(data.task, cfg.label_smoothing)
    higher = higher_is_better(cfg.monitor)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_labels = train.labels.to(device)
    train_images = train.images.to(device) if device.type == "cuda" else train.images
    steps_per_epoch = max(1, math.ceil(len(train) / cfg.batch_size))

    def build_optimizer(groups: list[dict]) -> torch.optim.Optimizer:
        groups = [g for g in groups if g["params"]]
        if not groups:  # nothing trains yet (cannot happen with a head): keep a valid optimiser
            groups = [{"params": [], "name": "empty", "lr_scale": 1.0, "weight_decay": 0.0}]
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
        return torch.optim.AdamW(groups, lr=cfg.lr)

    feats: dict[str, torch.Tensor] = {}  # cached prefix features of the current phase, by split

    def probe_batches(num_batches: int, epoch_key: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch_key)
        order = torch.randperm(len(train), generator=g)
        source = feats.get("train", train_images)
        for b in range(min(num_batches, steps_per_epoch)):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            yield _to_input(source[idx.to(source.device)], device, channels_last), train_labels[idx.to(device)]

    chain = None
    if cfg.feature_cache == "auto":
        probe = _to_input(train.images[:2], device, False)
        chain = build_chain(model, probe)
        block_of = {id(p): i for i in range(len(blocks)) for p in blocks.parameters(i)}
        starts, last = [], -1
        for i, (_, module) in enumerate(chain or []):
            ids = [block_of[id(p)] for p in module.parameters() if id(p) in block_of]
            if ids and min(ids) != last:
                starts.append(i)
                last = min(ids)
        data_fingerprint = data.fingerprint()  # covers pixels and splits, so it identifies each split too

    state: dict[str, Any] = {"phase": 0, "epoch": 0, "history": [], "train_seconds": 0.0, "images_seen": 0,
                             "extras": {}, "trained": []}
    ckpt = Path(checkpoint_path) if checkpoint_path else None
    resume = None
    if ckpt is not None:
        for stale in ckpt.parent.glob(ckpt.name + ".tmp*"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)
    if ckpt is not None and ckpt.exists():
        resume = torch.load(ckpt, map_location="cpu", weights_only=True)
        for key in ("phase", "epoch", "history", "train_seconds", "images_seen", "extras", "trained"):
            state[key] = resume[key]
        if "optimizer" not in resume:  # saved at a phase boundary: these weights start the next phase
            model.load_state_dict(resume["model"])
            torch.set_rng_state(resume["torch_rng"])
            gen.set_state(resume["data_rng"])
            resume = None
        log(f"resuming from {ckpt} at phase {state['phase']} epoch {state['epoch']}")

    # every parameter any optimiser of the run updated (the run's trainable parameter count)
    named = dict(model.named_parameters())
    trained_ids: set[int] = {id(named[n]) for n in (state.get("trained") or [])}
    phases = strategy.phases()
    for phase_idx, phase in enumerate(phases):
        if phase_idx < state["phase"]:
            continue
        s = phase.strategy
        base_lr = cfg.lr * phase.lr_scale
        num_epochs = phase.epochs or cfg.epochs
        total_steps, warmup_steps = num_epochs * steps_per_epoch, int(round(cfg.warmup_epochs * steps_per_epoch))
        s.set_trainable(blocks)
        optimizer = build_optimizer(s.param_groups(blocks, base_lr, cfg.weight_decay))
        best = {"score": None, "state": None, "epoch": -1, "metrics": {}, "bad": 0}
        if resume is not None and resume["phase"] == phase_idx:
            # after set_trainable, so strategies that keep the starting point (L2-SP) keep the pretrained one
            model.load_state_dict(resume["model"])
            trainable = set(resume["trainable"])
            for name, p in model.named_parameters():
                p.requires_grad_(name in trainable)
            optimizer = build_optimizer(_groups_from_layout(resume["layout"], model))
            optimizer.load_state_dict(resume["optimizer"])
            s.load_state_dict(resume["strategy"])
            best = resume["best"]
            torch.set_rng_state(resume["torch_rng"])
            gen.set_state(resume["data_rng"])
            if "scaler" in resume:
                scaler.load_state_dict(resume["scaler"])
        resume = None
        _log_groups(log, phase.name, optimizer, model)
        feats.clear()
        net = model
        if cfg.feature_cache == "auto":
            cut = frozen_prefix_length(chain, cfg.bn_mode) if chain is not None else 0
            reason = cache_unusable_reason(augment=cfg.augment, prefix_fixed=s.frozen_prefix_is_fixed(),
                                           prefix_len=cut, chain_ok=chain is not None)
            if reason is None:
                t_cache = time.perf_counter()
                for name, split in (("train", train), ("val", val), ("test", test)):
                    feats[name] = cached_features(
                        chain, cut, split.images, salt=f"{data_fingerprint}:{name}:{cfg.bn_mode}", device=device,
                        batch_size=cfg.eval_batch_size, boundaries=starts,
                        to_input=lambda b: _to_input(b, device, channels_last))
                    if device.type == "cuda":
                        feats[name] = feats[name].to(device)
                # extracting (or fetching) the features is part of this run's training time
                state["train_seconds"] += time.perf_counter() - t_cache
                net = nn.Sequential(*[m for _, m in chain[cut:]])
                log(f"[{phase.name}] feature cache: frozen prefix of {cut} modules ({chain[cut - 1][0]}) "
                    f"computed once; training on {tuple(feats['train'].shape[1:])} features")
            else:
                log(f"[{phase.name}] feature cache off: {reason}")
        ctx = EpochContext(model=net, blocks=blocks, optimizer=optimizer, lr=base_lr, weight_decay=cfg.weight_decay,
                           batches=None, loss_fn=loss_fn, build_optimizer=build_optimizer, record=state["extras"])
        epoch = state["epoch"]
        stop = False
        while epoch < num_epochs and not stop:
            ctx.optimizer = optimizer
            ctx.batches = lambda n, _e=epoch: probe_batches(n, phase_idx * 10_000 + _e)
            set_train_mode(model, cfg.bn_mode)
            s.on_epoch_start(epoch, ctx)
            optimizer = ctx.optimizer
            set_train_mode(model, cfg.bn_mode)  # again: the hook may have changed which layers are frozen
            t0 = time.perf_counter()
            order = torch.randperm(len(train), generator=gen)
            loss_sum = torch.zeros((), device=device)
            trained_ids.update(id(p) for g in optimizer.param_groups for p in g["params"])
            for b in range(steps_per_epoch):
                step = epoch * steps_per_epoch + b
                lr = lr_at(step, total_steps=total_steps, warmup_steps=warmup_steps, base_lr=base_lr)
                for g in optimizer.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                source = feats.get("train", train_images)
                x = _to_input(source[idx.to(source.device)], device, channels_last)
                if cfg.augment == "flip":
                    flips = torch.rand(2, generator=gen)
                    x = torch.flip(x, dims=[3]) if flips[0] < 0.5 else x
                    x = torch.flip(x, dims=[2]) if flips[1] < 0.5 else x
                y = train_labels[idx.to(device)]
                with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                    loss = loss_fn(net(x), y)
                extra = s.extra_loss(model)
                if extra is not None:
                    loss = loss + extra
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                loss_sum += loss.detach() * len(idx)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            state["train_seconds"] += seconds
            state["images_seen"] += len(train)
            val_metrics, _, _ = evaluate(net, val, batch_size=cfg.eval_batch_size, loss_fn=loss_fn,
                                         channels_last=channels_last, autocast_dtype=amp_dtype,
                                         inputs=feats.get("val"))
            # .item() syncs CPU and GPU, so the loss is read once per epoch
            record = {"phase": phase.name, "epoch": epoch, "train_loss": float(loss_sum.item()) / len(train),
                      "lr": lr, "seconds": seconds,
                      "trainable_params": sum(p.numel() for g in optimizer.param_groups for p in g["params"]),
                      **{f"val_{k}": v for k, v in val_metrics.items()}}
            state["history"].append(record)
            score = val_metrics.get(cfg.monitor, float("nan"))
            if math.isnan(score):
                score = -val_metrics["loss"] if higher else val_metrics["loss"]
            improved = best["score"] is None or (score > best["score"] if higher else score < best["score"])
            if improved:
                best = {"score": score, "state": copy.deepcopy(model.state_dict()), "epoch": epoch,
                        "metrics": val_metrics, "bad": 0}
            else:
                best["bad"] += 1
            log(f"[{phase.name}] epoch {epoch + 1}/{num_epochs} loss {record['train_loss']:.4f} "
                f"val_{cfg.monitor} {val_metrics.get(cfg.monitor, float('nan')):.4f} ({seconds:.1f}s)")
            epoch += 1
            try:
                for cb in callbacks:
                    if hasattr(cb, "on_epoch_end"):
                        cb.on_epoch_end(record)
            except StopTraining:
                stop = True
            if cfg.patience and best["bad"] >= cfg.patience:
                stop = True
            if ckpt is not None:
                state["epoch"] = epoch
                _save_atomic({
                    "phase": phase_idx, "epoch": epoch, "history": state["history"],
                    "trained": [n for n, p in named.items() if id(p) in trained_ids],
                    "train_seconds": state["train_seconds"], "images_seen": state["images_seen"],
                    "extras": state["extras"], "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "layout": _group_layout(optimizer, model),
                    "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
                    "strategy": s.state_dict(), "best": best, "torch_rng": torch.get_rng_state(),
                    "data_rng": gen.get_state(), "scaler": scaler.state_dict(),
                }, ckpt)
            if stop:
                break
        if stop and epoch < num_epochs:
            log(f"[{phase.name}] early stop after epoch {epoch} (best epoch {best['epoch'] + 1})")
        model.load_state_dict(best["state"])
        state["phase"], state["epoch"] = phase_idx + 1, 0
        state.setdefault("extras", {}).setdefault("phases", []).append(
            {"name": phase.name, "best_epoch": best["epoch"], "val": best["metrics"]})
        if ckpt is not None:
            _save_atomic({"phase": phase_idx + 1, "epoch": 0, "history": state["history"],
                          "trained": [n for n, p in named.items() if id(p) in trained_ids],
                          "train_seconds": state["train_seconds"], "images_seen": state["images_seen"],
                          "extras": state["extras"], "model": model.state_dict(),
                          "torch_rng": torch.get_rng_state(), "data_rng": gen.get_state()}, ckpt)

    trainable = sum(p.numel() for p in model.parameters() if id(p) in trained_ids)
    val_metrics, _, _ = evaluate(model, val, batch_size=cfg.eval_batch_size, loss_fn=loss_fn,
                                 channels_last=channels_last, autocast_dtype=amp_dtype)
    test_metrics, y_true, y_prob = evaluate(model, test, batch_size=cfg.eval_batch_size, loss_fn=loss_fn,
                                            channels_last=channels_last, autocast_dtype=amp_dtype)
    return FitResult(model=model, history=state["history"], val_metrics=val_metrics, test_metrics=test_metrics,
                     y_true=y_true, y_prob=y_prob, train_seconds=state["train_seconds"],
                     images_seen=state["images_seen"], trainable_params=trainable, extras=state["extras"])


def _log_groups(log: Callable[[str], None], phase: str, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    frozen = sum(p.numel() for p in model.parameters()) - trainable
    parts = ", ".join(f"{g.get('name', '?')}={sum(p.numel() for p in g['params'])}" for g in optimizer.param_groups[:12])
    more = f", +{len(optimizer.param_groups) - 12} groups" if len(optimizer.param_groups) > 12 else ""
    log(f"[{phase}] trainable {trainable:,} / frozen {frozen:,} params; groups: {parts}{more}")
