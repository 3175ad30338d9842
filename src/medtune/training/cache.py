"""Frozen-prefix feature cache.

When a phase's frozen prefix is fixed and its inputs are deterministic (no random augmentation,
frozen BatchNorm in eval mode), the prefix computes the same features every epoch and in every
run that shares its weights: compute them once, train the rest of the network on them.

The model is cut into a *chain*: the normalisation, then the backbone's top-level children with
plain ``nn.Sequential`` containers expanded (timm CNNs run their children in order). The chain is
accepted only if running it reproduces ``model(x)`` on a probe batch, so a model whose forward
does more than chain its children is never cached wrongly. No library offers this cut, hence
the hand-written chain.

Cached features are shared through a process-wide store keyed by a fingerprint of the prefix's
weights and buffers, the data, and the cut position; one pass through the network fills the
features of every block boundary it crosses (memory budget permitting), so a top-k sweep pays
one forward pass for all its depths.

Each entry also keeps what computing it cost: the seconds the pass spent up to that cut (the
modules before it and the copy of its output, summed over the batches). A run that finds the
features cached is told the same seconds as the run that computed them, so the training loop can
charge every run of a prefix equally, whatever order the runs come in.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from medtune.models._norm import BATCH_STAT_LAYERS

__all__ = ["build_chain", "frozen_prefix_length", "FeatureCache", "FEATURE_CACHE", "CachedFeatures",
           "cache_unusable_reason", "cached_features"]


class _Normalize(nn.Module):
    """The wrapper's normalisation as a chain element (copies of its constant mean/std buffers)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.register_buffer("mean", model.mean.detach().clone())
        self.register_buffer("std", model.std.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _expand(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    if type(module) is nn.Sequential:
        out = []
        for name, child in module.named_children():
            out += _expand(child, f"{prefix}.{name}" if prefix else name)
        return out
    return [(prefix, module)]


@torch.no_grad()
def build_chain(model: nn.Module, sample: torch.Tensor) -> list[tuple[str, nn.Module]] | None:
    """The model as an ordered list of (name, module) whose composition equals ``model(x)``, or None.

    Args:
        model: a ``NormalizedModel`` (``.backbone``, ``.normalize``).
        sample: a small float batch in [0, 1] used to check the chain against ``model``.
    """
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(model, "normalize"):
        return None
    chain: list[tuple[str, nn.Module]] = [("normalize", _Normalize(model))]
    for name, child in backbone.named_children():
        chain += _expand(child, name)
    was_training = model.training
    model.eval()
    try:
        x = sample
        for _, module in chain:
            x = module(x)
        ok = x.shape == model(sample).shape and torch.allclose(x, model(sample), rtol=1e-4, atol=1e-5)
    except (RuntimeError, TypeError, ValueError):
        ok = False
    finally:
        model.train(was_training)
    return chain if ok else None


def frozen_prefix_length(chain: list[tuple[str, nn.Module]], bn_mode: str) -> int:
    """Number of leading chain elements that are entirely frozen (no trainable parameter; with
    ``bn_mode="train"`` also no batch-statistics layer, whose running statistics would still move)."""
    n = 0
    for _, module in chain:
        params = list(module.parameters())
        if any(p.requires_grad for p in params):
            break
        if bn_mode == "train" and any(isinstance(m, BATCH_STAT_LAYERS) for m in module.modules()):
            break
        n += 1
    # trailing parameter-free modules belong to the suffix only if nothing frozen follows; keep them in the prefix
    return n


def cache_unusable_reason(*, augment: tuple[str, ...], prefix_fixed: bool, prefix_len: int,
                          chain_ok: bool) -> str | None:
    """Why the feature cache cannot serve a phase, or None when it can (``augment``: the run's
    augmentation names, empty for none)."""
    if not chain_ok:
        return "the model's forward is not a plain chain of its children"
    if augment:
        return f"random augmentation ({', '.join(augment)}) changes the prefix's inputs every epoch"
    if not prefix_fixed:
        return "the strategy changes which layers are frozen during the phase"
    if prefix_len <= 1:
        return "nothing before the first trainable layer is frozen"
    return None


class CachedFeatures(NamedTuple):
    """A prefix's outputs and the seconds computing them took (the same on a hit as on the miss)."""

    values: torch.Tensor
    seconds: float


class FeatureCache:
    """Process-wide store of prefix outputs, LRU-evicted beyond ``budget_bytes``, with the seconds
    each took to compute (kept after eviction; a recomputation replaces them)."""

    def __init__(self, budget_bytes: int = 2 << 30, spill_dir: str | None = None) -> None:
        self.budget_bytes = budget_bytes
        self.spill_dir = spill_dir
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._disk: dict[str, torch.Tensor] = {}
        self._seconds: dict[str, float] = {}
        self.hits = 0
        self.misses = 0

    def seconds(self, key: str) -> float:
        """Seconds computing ``key``'s features took (0.0 when unknown)."""
        return self._seconds.get(key, 0.0)

    def nbytes(self) -> int:
        """Bytes held in memory (memmapped features live on disk and are not counted)."""
        return sum(t.numel() * t.element_size() for t in self._items.values())

    def get(self, key: str) -> torch.Tensor | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
            return value
        return self._disk.get(key)

    def put(self, key: str, value: torch.Tensor, *, on_disk: bool = False, seconds: float = 0.0) -> bool:
        """Keep ``value`` and its cost (memmapped ``on_disk`` values are kept without counting
        against the budget)."""
        self._seconds[key] = float(seconds)
        if on_disk:
            self._disk[key] = value
            return True
        if value.numel() * value.element_size() > self.budget_bytes:
            return False
        self._items[key] = value
        while self.nbytes() > self.budget_bytes:
            self._items.popitem(last=False)
        return True

    def clear(self) -> None:
        self._items.clear()
        self._disk.clear()
        self._seconds.clear()
        self.hits = self.misses = 0


FEATURE_CACHE = FeatureCache()


def _prefix_fingerprint(chain: list[tuple[str, nn.Module]], upto: int, salt: str) -> str:
    h = hashlib.sha256(salt.encode())
    for name, module in chain[:upto]:
        h.update(name.encode())
        h.update(type(module).__name__.encode())
        for t in (*module.parameters(), *module.buffers()):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


class _Sink:
    """Collects one cut's batches: in memory, or straight into a disk memmap when the whole
    output would exceed the cache's memory budget (so it never has to fit in RAM)."""

    def __init__(self, total: int, budget_bytes: int, spill_dir: str | None) -> None:
        self.total, self.budget, self.spill_dir = total, budget_bytes, spill_dir
        self.parts: list[torch.Tensor] = []
        self.memmap: np.memmap | None = None
        self.filled = 0

    def add(self, batch: torch.Tensor) -> None:
        batch = batch.detach().float().cpu()
        if self.memmap is None and not self.parts and batch.numel() * 4 * self.total / len(batch) > self.budget:
            folder = tempfile.mkdtemp(prefix="medtune-features-", dir=self.spill_dir)
            self.memmap = np.lib.format.open_memmap(os.path.join(folder, "features.npy"), mode="w+",
                                                    dtype=np.float32, shape=(self.total, *batch.shape[1:]))
        if self.memmap is not None:
            self.memmap[self.filled:self.filled + len(batch)] = batch.numpy()
        else:
            self.parts.append(batch)
        self.filled += len(batch)

    def store(self, cache: FeatureCache, key: str, seconds: float) -> CachedFeatures:
        if self.memmap is not None:
            self.memmap.flush()
            value = torch.from_numpy(self.memmap)
        else:
            value = torch.cat(self.parts)
        cache.put(key, value, on_disk=self.memmap is not None, seconds=seconds)
        return CachedFeatures(value, seconds)


@torch.no_grad()
def cached_features(chain: list[tuple[str, nn.Module]], upto: int, images: torch.Tensor, *, salt: str,
                    device: torch.device, batch_size: int, to_input: Callable[[torch.Tensor], torch.Tensor],
                    cache: FeatureCache | None = None, boundaries: list[int] | None = None) -> CachedFeatures:
    """Outputs of ``chain[:upto]`` for uint8 ``images`` (all in eval mode), from the cache when possible,
    with the seconds computing them took (a hit reports the seconds stored by the miss).

    On a miss, one pass computes them and also stores the outputs at each index in ``boundaries``
    (< ``upto``) so other cuts of the same prefix hit later; each cut is charged the time the pass
    spent up to it, less the copies of the shorter cuts' outputs. Outputs larger than the cache's
    memory budget go to a disk memmap (``cache.spill_dir``, default the system temp folder).
    """
    cache = cache if cache is not None else FEATURE_CACHE
    key = _prefix_fingerprint(chain, upto, salt)
    hit = cache.get(key)
    if hit is not None:
        cache.hits += 1
        return CachedFeatures(hit, cache.seconds(key))
    cache.misses += 1
    wanted = sorted({b for b in (boundaries or []) if 1 < b < upto} | {upto})
    keys = {b: (key if b == upto else _prefix_fingerprint(chain, b, salt)) for b in wanted}
    wanted = [b for b in wanted if b == upto or cache.get(keys[b]) is None]
    sinks = {b: _Sink(len(images), cache.budget_bytes, cache.spill_dir) for b in wanted}
    modes = [m.training for _, m in chain[:upto]]
    for _, m in chain[:upto]:
        m.eval()
    seconds = dict.fromkeys(wanted, 0.0)
    try:
        for start in range(0, len(images), batch_size):
            t0 = time.perf_counter()
            other_copies = 0.0  # copying shorter cuts' outputs is not part of a longer cut's cost
            x = to_input(images[start:start + batch_size])
            for i, (_, module) in enumerate(chain[:upto], start=1):
                x = module(x)
                if i in sinks:
                    t_copy = time.perf_counter()
                    sinks[i].add(x)  # the copy to the CPU waits for the device, so the clock is honest
                    now = time.perf_counter()
                    seconds[i] += now - t0 - other_copies
                    other_copies += now - t_copy
    finally:
        for (_, m), mode in zip(chain[:upto], modes):
            m.train(mode)
    for b in wanted[:-1]:
        sinks[b].store(cache, keys[b], seconds[b])
    return sinks[upto].store(cache, key, seconds[upto])
