"""Frozen-prefix feature cache: when a phase's frozen prefix is fixed and its inputs deterministic,
compute the prefix's features once and train the rest of the network on them.

The model is cut into a *chain* (the normalisation, then the backbone's top-level children with
``nn.Sequential`` and timm's ``ClassifierHead`` expanded), accepted only if running it reproduces
``model(x)``; no library offers this cut, hence the hand-written chain. Entries are keyed by a
fingerprint of the prefix's weights, the data, the cut and the storage precision, kept within a
memory and a disk budget, and carry the seconds they cost so every run of a prefix is charged the
same. Storage precision and budgets: README, "Feature cache"; measurements: ``benchmarks/README.md``.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import math
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from medtune.models._norm import BATCH_STAT_LAYERS

__all__ = ["build_chain", "frozen_prefix_length", "FeatureCache", "FEATURE_CACHE", "CachedFeatures",
           "FeaturesDoNotFit", "cache_unusable_reason", "cached_features",
           "default_memory_bytes", "default_disk_bytes"]

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
GIB = 1 << 30


class _Normalize(nn.Module):
    """The wrapper's normalisation as a chain element (copies of its constant mean/std buffers)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.register_buffer("mean", model.mean.detach().clone())
        self.register_buffer("std", model.std.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _expand(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    from timm.layers import ClassifierHead

    if type(module) is nn.Sequential:
        children = list(module.named_children())
    elif type(module) is ClassifierHead:  # its forward: global_pool, drop, fc, flatten (build_chain checks)
        children = [(n, getattr(module, n)) for n in ("global_pool", "drop", "fc", "flatten")]
    else:
        return [(prefix, module)]
    out = []
    for name, child in children:
        out += _expand(child, f"{prefix}.{name}" if prefix else name)
    return out


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
    except (RuntimeError, TypeError, ValueError, AttributeError):
        ok = False
    finally:
        model.train(was_training)
    return chain if ok else None


def _random_in_training(module: nn.Module) -> bool:
    """Whether ``module`` draws random numbers in training mode (dropout, timm's DropPath/DropBlock):
    computed once in eval mode, its output would differ from the uncached run's."""
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        if (getattr(m, "drop_prob", 0) or 0) > 0:
            return True
    return False


def frozen_prefix_length(chain: list[tuple[str, nn.Module]], bn_mode: str) -> int:
    """Number of leading chain elements that are entirely frozen and deterministic (no trainable
    parameter, no active dropout; with ``bn_mode="train"`` also no batch-statistics layer, whose
    running statistics would still move). Parameter-free modules (global pooling) count as frozen."""
    n = 0
    for _, module in chain:
        params = list(module.parameters())
        if any(p.requires_grad for p in params) or _random_in_training(module):
            break
        if bn_mode == "train" and any(isinstance(m, BATCH_STAT_LAYERS) for m in module.modules()):
            break
        n += 1
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
    """A prefix's outputs, the seconds computing them took (the same on a hit as on the miss), the
    storage precision (``float16`` / ``float32``) and the largest |feature| seen."""

    values: torch.Tensor
    seconds: float
    dtype: str
    max_abs: float


class FeaturesDoNotFit(Exception):
    """A run's features would exceed the cache's memory and disk budgets (the message says by how much)."""


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * GIB


def default_memory_bytes(held: int = 0) -> int:
    """min(2 GiB, 25% of the RAM available now plus the ``held`` bytes the cache already takes)."""
    return int(min(2 * GIB, 0.25 * (_available_ram() + held)))


def default_disk_bytes(folder: str | Path | None, held: int = 0) -> int:
    """min(32 GiB, half the free space of ``folder`` (its nearest existing parent; None: the temp
    folder) plus the ``held`` bytes the cache's spills already take)."""
    path = Path(folder) if folder is not None else Path(tempfile.gettempdir())
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return 0
    return int(min(32 * GIB, 0.5 * (free + held)))


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


class FeatureCache:
    """Process-wide store of prefix outputs: in memory up to ``memory_bytes``, on disk (memmaps in
    ``spill_dir``) up to ``disk_bytes``, each LRU-evicted; with the seconds each took to compute
    (kept after eviction; a recomputation replaces them)."""

    def __init__(self, memory_bytes: int = 2 * GIB, disk_bytes: int = 32 * GIB, spill_dir: str | None = None) -> None:
        self.memory_bytes, self.disk_bytes, self.spill_dir = memory_bytes, disk_bytes, spill_dir
        self._mem: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._disk: OrderedDict[str, tuple[torch.Tensor, str]] = OrderedDict()
        self._info: dict[str, tuple[float, str, float]] = {}  # key -> (seconds, dtype, max |x|)
        self.hits = 0
        self.misses = 0

    def configure(self, *, memory_bytes: int, disk_bytes: int, spill_dir: str | None) -> None:
        """Set the budgets and the spill folder (entries beyond a lowered budget are evicted)."""
        self.memory_bytes, self.disk_bytes, self.spill_dir = memory_bytes, disk_bytes, spill_dir
        self._evict(self._mem, self.memory_bytes)
        self._evict(self._disk, self.disk_bytes)

    def seconds(self, key: str) -> float:
        """Seconds computing ``key``'s features took (0.0 when unknown)."""
        return self._info.get(key, (0.0,))[0]

    def nbytes(self) -> int:
        """Bytes held in memory."""
        return sum(_nbytes(t) for t in self._mem.values())

    def disk_nbytes(self) -> int:
        """Bytes held in disk memmaps."""
        return sum(_nbytes(t) for t, _ in self._disk.values())

    def is_on_disk(self, values: torch.Tensor) -> bool:
        return any(t is values for t, _ in self._disk.values())

    def keys(self) -> list[str]:
        return [*self._mem, *self._disk]

    def get(self, key: str) -> CachedFeatures | None:
        if key in self._mem:
            self._mem.move_to_end(key)
            value = self._mem[key]
        elif key in self._disk:
            self._disk.move_to_end(key)
            value = self._disk[key][0]
        else:
            return None
        seconds, dtype, max_abs = self._info[key]
        return CachedFeatures(value, seconds, dtype, max_abs)

    def put(self, key: str, features: CachedFeatures, *, folder: str | None = None) -> None:
        """Keep ``features`` (a memmap in ``folder`` counts against the disk budget, else memory)."""
        self._info[key] = (float(features.seconds), features.dtype, float(features.max_abs))
        if folder is not None:
            self._disk[key] = (features.values, folder)
            self._evict(self._disk, self.disk_bytes)
        else:
            self._mem[key] = features.values
            self._evict(self._mem, self.memory_bytes)

    @staticmethod
    def _evict(store: OrderedDict, budget: int) -> None:
        def size(item):
            return _nbytes(item[0] if isinstance(item, tuple) else item)

        total = sum(size(v) for v in store.values())
        while total > budget and len(store) > 1:  # the newest entry was planned to fit
            _, item = store.popitem(last=False)
            total -= size(item)
            if isinstance(item, tuple):
                shutil.rmtree(item[1], ignore_errors=True)  # a mapped file stays readable until unmapped

    def clear(self) -> None:
        for _, folder in self._disk.values():
            shutil.rmtree(folder, ignore_errors=True)
        self._mem.clear()
        self._disk.clear()
        self._info.clear()
        self.hits = self.misses = 0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


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
    """One cut's features of one split, preallocated (in memory, or a disk memmap) and filled batch by
    batch, with the largest |x| seen; a float16 sink that meets a value beyond float16's range stops
    and asks for a float32 pass."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, folder: str | None) -> None:
        self.dtype, self.folder = dtype, folder
        if folder is not None:
            self.memmap = np.lib.format.open_memmap(os.path.join(folder, "features.npy"), mode="w+",
                                                    dtype=np.float16 if dtype == torch.float16 else np.float32,
                                                    shape=shape)
            self.values = torch.from_numpy(self.memmap)
        else:
            self.memmap, self.values = None, torch.empty(shape, dtype=dtype)
        self.filled, self.max_abs, self.overflow = 0, 0.0, False

    def add(self, batch: torch.Tensor) -> None:
        batch = batch.detach()
        self.max_abs = max(self.max_abs, float(batch.abs().max()) if batch.numel() else 0.0)
        if self.dtype == torch.float16 and not self.max_abs < FP16_MAX:
            self.overflow = True
        if not self.overflow:
            self.values[self.filled:self.filled + len(batch)] = batch.to("cpu", self.dtype)
        self.filled += len(batch)

    def result(self, seconds: float) -> CachedFeatures:
        if self.memmap is not None:
            self.memmap.flush()
        return CachedFeatures(self.values, seconds, str(self.dtype).removeprefix("torch."), self.max_abs)


def _spill_folder(spill_dir: str | None) -> str:
    if spill_dir is not None:
        Path(spill_dir).mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="medtune-features-", dir=spill_dir)
    atexit.register(shutil.rmtree, folder, True)  # spills live as long as the process's cache
    return folder


def _batches(n: int, batch_size: int) -> Iterable[torch.Tensor]:
    for start in range(0, n, batch_size):
        yield torch.arange(start, min(n, start + batch_size))


@torch.no_grad()
def _pass(chain, upto: int, images, sinks: dict[int, _Sink], *, batch_size: int,
          to_input: Callable[[torch.Tensor], torch.Tensor], desc: str = "features") -> dict[int, float]:
    """Run ``chain[:upto]`` over ``images`` batch by batch (read by index), filling the sinks at
    their cuts; the seconds up to each cut (less the copies of the shorter cuts' outputs)."""
    from medtune.progress import progress_bar

    seconds = dict.fromkeys(sinks, 0.0)
    with progress_bar(len(images), desc, unit="img") as bar:
        for idx in _batches(len(images), batch_size):
            _pass_batch(chain, upto, images, idx, sinks, seconds, to_input)
            bar.update(len(idx))
    return seconds


@torch.no_grad()
def _pass_batch(chain, upto: int, images, idx: torch.Tensor, sinks: dict[int, _Sink], seconds: dict[int, float],
                to_input: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """One batch of :func:`_pass`."""
    t0 = time.perf_counter()
    other_copies = 0.0  # copying shorter cuts' outputs is not part of a longer cut's cost
    x = to_input(images[idx])
    for i, (_, module) in enumerate(chain[:upto], start=1):
        x = module(x)
        if i in sinks:
            t_copy = time.perf_counter()
            sinks[i].add(x)  # the copy to the CPU waits for the device, so the clock is honest
            now = time.perf_counter()
            seconds[i] += now - t0 - other_copies
            other_copies += now - t_copy


@torch.no_grad()
def _feature_shapes(chain, upto: int, images, cuts: Iterable[int],
                    to_input: Callable[[torch.Tensor], torch.Tensor]) -> dict[int, tuple[int, ...]]:
    """One image's feature shape at each cut (a one-image probe: nothing is computed for the estimate)."""
    shapes, x, cuts = {}, to_input(images[torch.arange(1)]), set(cuts)
    for i, (_, module) in enumerate(chain[:upto], start=1):
        x = module(x)
        if i in cuts:
            shapes[i] = tuple(x.shape[1:])
    return shapes


class _EvalMode:
    def __init__(self, modules) -> None:
        self.modules = list(modules)

    def __enter__(self):
        self.modes = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc) -> None:
        for m, mode in zip(self.modules, self.modes):
            m.train(mode)


def _storage_dtype(storage: str, shape: tuple[int, ...]) -> torch.dtype:
    """float16 for feature maps under ``auto`` (float32 if a value turns out beyond its range); float32
    for ``fp32`` and for pooled vectors, which are small and feed the linear probe's exact solve."""
    return torch.float16 if storage == "auto" and len(shape) > 1 else torch.float32


def _plan(cache: FeatureCache, held: Mapping[str, CachedFeatures], sizes: Mapping[str, int],
          what: str) -> dict[str, str | int]:
    """Where each missing split's features go (``memory`` or ``disk``) next to the run's ``held`` hits,
    and ``spare``: the memory left for optional cuts.

    Raises:
        FeaturesDoNotFit: they do not fit the memory and disk budgets together.
    """
    on_disk = sum(_nbytes(f.values) for f in held.values() if cache.is_on_disk(f.values))
    mem_left = cache.memory_bytes - (sum(_nbytes(f.values) for f in held.values()) - on_disk)
    disk_left = cache.disk_bytes - on_disk
    plan: dict[str, str | int] = {}
    for name, size in sizes.items():
        if size <= mem_left:
            plan[name], mem_left = "memory", mem_left - size
        elif size <= disk_left:
            plan[name], disk_left = "disk", disk_left - size
        else:
            raise FeaturesDoNotFit(
                f"the frozen prefix's features ({what}) would take {_fmt_bytes(sum(sizes.values()))} but the cache "
                f"holds at most {_fmt_bytes(cache.memory_bytes)} in memory and {_fmt_bytes(cache.disk_bytes)} on disk")
    plan["spare"] = mem_left
    return plan


def cached_features(chain: list[tuple[str, nn.Module]], upto: int, splits: Mapping[str, tuple[Any, str]], *,
                    batch_size: int, to_input: Callable[[torch.Tensor], torch.Tensor], storage: str = "auto",
                    cache: FeatureCache | None = None, block_starts: Iterable[int] = (), cuts: Iterable[int] = (),
                    memory_bytes: int | None = None, disk_bytes: int | None = None,
                    spill_dir: str | None = None, precision: str = "fp32",
                    autocast: Callable[[], Any] = contextlib.nullcontext) -> dict[str, CachedFeatures]:
    """Outputs of ``chain[:upto]`` (all in eval mode) for each split, from the cache when possible,
    with the seconds computing them took (a hit reports the seconds stored by the miss).

    Args:
        splits: name -> (uint8 images, read only as ``images[index_tensor]`` and ``len(images)``;
            a salt naming the data).
        storage: ``auto`` (float16 where every feature fits its range, else float32) or ``fp32``.
        block_starts: the chain index where each block begins.
        cuts: frozen depths in blocks (a run that freezes the first ``b`` blocks: ``b``) of the other
            runs of a plan; those that lie before ``upto`` are stored too, where memory is left.
        memory_bytes, disk_bytes: the budgets (None: :func:`default_memory_bytes`,
            :func:`default_disk_bytes`, counting what the cache holds as available).
        spill_dir: where features beyond the memory budget go (None: the cache's).
        precision, autocast: the run's precision (``fp32``, ``bf16``, ``fp16``; part of the key) and a
            factory of its autocast context, under which the prefix runs, as it would uncached.

    Raises:
        FeaturesDoNotFit: the missing features would exceed the memory and disk budgets together
            (estimated from a one-image probe, before anything else is computed).
    """
    cache = cache if cache is not None else FEATURE_CACHE
    spill_dir = cache.spill_dir if spill_dir is None else spill_dir
    cache.configure(memory_bytes=default_memory_bytes(cache.nbytes()) if memory_bytes is None else memory_bytes,
                    disk_bytes=default_disk_bytes(spill_dir, cache.disk_nbytes()) if disk_bytes is None else disk_bytes,
                    spill_dir=spill_dir)
    salt = f"{storage}:" if precision == "fp32" else f"{storage}:{precision}:"  # fp32 keys as before
    keys = {name: _prefix_fingerprint(chain, upto, salt + s) for name, (_, s) in splits.items()}
    out: dict[str, CachedFeatures] = {}
    for name, key in keys.items():
        hit = cache.get(key)
        if hit is not None:
            cache.hits += 1
            out[name] = hit
    missing = [name for name in splits if name not in out]
    if not missing:
        return out
    starts = list(block_starts)
    extra = sorted({starts[b] for b in cuts if 0 <= b < len(starts)} & set(range(2, upto)))
    probe = next(images for images, _ in splits.values() if len(images))
    with _EvalMode(m for _, m in chain[:upto]), autocast():
        shapes = _feature_shapes(chain, upto, probe, [*extra, upto], to_input)
        dtypes = {b: _storage_dtype(storage, shapes[b]) for b in shapes}
        while True:
            dtype = dtypes[upto]
            per_image = math.prod(shapes[upto]) * dtype.itemsize
            what = (f"{sum(len(splits[n][0]) for n in missing)} images x {_fmt_bytes(per_image)} at "
                    f"{chain[upto - 1][0]}, {str(dtype).removeprefix('torch.')}")
            plan = _plan(cache, out, {n: len(splits[n][0]) * per_image for n in missing}, what)
            done, overflow = [], False
            for name in missing:
                images, s = splits[name]
                cache.misses += 1
                sinks = {upto: _Sink((len(images), *shapes[upto]), dtype,
                                     _spill_folder(cache.spill_dir) if plan[name] == "disk" else None)}
                extra_keys = {}
                for b in extra:
                    k = _prefix_fingerprint(chain, b, salt + s)
                    size = len(images) * math.prod(shapes[b]) * dtypes[b].itemsize
                    if cache.get(k) is None and size <= plan["spare"]:
                        plan["spare"] -= size
                        sinks[b], extra_keys[b] = _Sink((len(images), *shapes[b]), dtypes[b], None), k
                seconds = _pass(chain, upto, images, sinks, batch_size=batch_size, to_input=to_input,
                                desc=f"features {name}")
                done.append((name, sinks, extra_keys, seconds))
                if sinks[upto].overflow:
                    overflow = True
                    break
            if overflow:  # float16 cannot hold these features: store the prefix in float32
                for _, sinks, _, _ in done:
                    if sinks[upto].folder is not None:
                        shutil.rmtree(sinks[upto].folder, ignore_errors=True)
                dtypes[upto] = torch.float32
                continue
            for name, sinks, extra_keys, seconds in done:
                for b, k in extra_keys.items():
                    if not sinks[b].overflow:  # (one that overflows is stored in float32 by its own run)
                        cache.put(k, sinks[b].result(seconds[b]))
                out[name] = sinks[upto].result(seconds[upto])
                cache.put(keys[name], out[name], folder=sinks[upto].folder)
            return out
