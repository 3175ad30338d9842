"""Sweeps: expand a grid of runs, skip the ones already in the store, run the rest."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any


from medtune.config import RunConfig, SweepConfig, load_config
from medtune.store import ResultsStore

__all__ = ["expand_sweep", "sweep", "results_table", "format_table", "load_sweep_config"]


@lru_cache(maxsize=4)
def _blocks_of(arch: str, granularity: str):
    """The block partition of ``arch`` (random init; only its structure is used)."""
    import torch

    from medtune.models import get_blocks
    from medtune.models._builder import probe_model

    with torch.random.fork_rng(devices=[]):
        model = probe_model(arch)  # the one structural copy the driver keeps (also probes the input size)
    return get_blocks(model, granularity=granularity)


def _frozen_blocks(runs: Sequence[RunConfig]) -> set[int]:
    """How many leading blocks each depth strategy of ``runs`` freezes: the feature cache's hint, so the
    pass of a sweep's longest frozen prefix also stores its shorter ones (a top-k sweep pays one pass)."""
    out = set()
    for run in runs:
        strategy = run.strategy.create()
        num_blocks = len(_blocks_of(run.arch, strategy.granularity))
        depth = strategy.depth(num_blocks)
        if depth is not None:
            out.add(num_blocks - 1 - depth)
    return out


def load_sweep_config(source: str | Path | dict | SweepConfig | None = None, **overrides: Any) -> SweepConfig:
    """A SweepConfig from a YAML path, a dict or a SweepConfig, with keyword overrides on top."""
    return load_config(SweepConfig, source, **overrides)


def expand_sweep(config: SweepConfig, log: Callable[[str], None] | None = None) -> list[RunConfig]:
    """Every distinct RunConfig of the grid, in a stable order; ``:all`` specs expand per architecture.

    Grid cells that are the same run (``seeds: 0,0``, ``lr: 0.001,1e-3``) are kept once; ``log`` is told how many were removed.

    Raises:
        ConfigError: a strategy or a depth that does not fit an architecture (checked before any training).
    """
    runs: list[RunConfig] = []
    solved: set[tuple[str, str]] = set()
    for arch in config.arch:
        _blocks_of(arch, "block")  # an unknown architecture fails here, before any training
        for template in config.strategy:
            num_units = len(_blocks_of(arch, template.strategy_class.granularity)) if template.expand_all else 0
            for spec in template.expand(num_units):
                checker = spec.create()
                if checker.main_param is not None:
                    # validate the depth against the architecture before any training time is spent
                    checker.check_blocks(_blocks_of(arch, checker.granularity))
                folds = range(config.base.cv_folds) if config.base.cv_folds >= 2 else [config.base.fold]
                lrs, wds = config.lr, config.weight_decay
                if checker.ignores_optimiser(_blocks_of(arch, checker.granularity)):
                    if len(lrs) * len(wds) > 1:
                        solved.add((str(spec), arch))
                    lrs, wds = lrs[:1], wds[:1]  # a solved probe: every (lr, wd) cell would repeat the same run
                for policy, lr, wd, frac, fold, seed in itertools.product(
                        config.resize, lrs, wds, config.train_fraction, folds, config.seeds):
                    runs.append(config.base.replace(arch=arch, strategy=spec, seed=int(seed), train_fraction=float(frac),
                                                    lr=float(lr), weight_decay=float(wd), fold=fold, resize=policy))
    if solved and log is not None:
        log(f"{', '.join(sorted({f'{s} on {a}' for s, a in solved}))}: solved by L-BFGS with C chosen on validation; "
            f"lr and weight_decay unused, so one run per cell of the other axes (at lr {config.lr[0]:g}, "
            f"weight_decay {config.weight_decay[0]:g})")
    seen: set[str] = set()
    unique = [run for run in runs if not (run.to_json() in seen or seen.add(run.to_json()))]
    if len(unique) < len(runs) and log is not None:
        log(f"removed {len(runs) - len(unique)} duplicate grid cell(s): the same run listed more than once")
    return unique


def sweep(config: SweepConfig | dict | str | Path | None = None, *, store: ResultsStore | str | Path | None = None,
          executor: Any = "local", workers: int = 1, address: str | None = None, cpus_per_run: float = 1,
          gpus_per_run: float = 0, log: Callable[[str], None] | None = None, **overrides: Any) -> list[dict]:
    """Run every run of a sweep that the store does not hold yet; return all the sweep's records.

    The driver (this process) claims each pending run in the store, sends it to the executor, and
    writes each returned result to the store itself (:func:`medtune.runner.run_all`). Runs another
    live process has claimed are skipped; runs whose owner died are reclaimed and resume from their
    epoch checkpoint.

    Args:
        config: a SweepConfig, a dict of its keys, or a YAML path.
        store: the results store or its folder (default: the config's ``store``).
        executor: ``local``, ``ray`` or an executor object (``medtune.executors``).
        workers: processes of the local executor (1 = in this process).
        address: Ray cluster address (``auto`` or ``HOST:PORT``); None starts a local Ray.
        cpus_per_run, gpus_per_run: Ray resources per run.
        log: receives one-line progress messages.
        **overrides: config keys that replace the config's (same names as the YAML keys).
    """
    from medtune.executors import create_executor
    from medtune.runner import run_all
    from medtune.training.cache import expect_cuts

    if isinstance(store, (str, Path)):  # a folder, as from --store: it is a config key
        overrides["store"], store = str(store), None
    elif store is not None:  # a store object: the runs' decode caches live in it too
        overrides["store"] = str(store.root)
    cfg = load_sweep_config(config, **overrides)
    runs = expand_sweep(cfg, log)
    store = store or ResultsStore(cfg.base.store)
    if cfg.expected:  # a literature preset's published numbers travel into the store, for the report
        store.put_expected(cfg.name, cfg.expected)
    log = log or (lambda _m: None)
    if isinstance(executor, str):
        executor = create_executor(executor, workers=workers, address=address, num_cpus=cpus_per_run,
                                   num_gpus=gpus_per_run)
    log(f"sweep {cfg.name!r}: {len(runs)} runs into {store.root}")
    expect_cuts(_frozen_blocks(runs))  # in-process runs share the cache; others ignore the hint
    try:
        records = run_all(runs, store=store, executor=executor, log=log,
                          progress=cfg.name if cfg.base.progress else None)
    finally:
        expect_cuts(())
    return [r for r in records if r is not None]


def results_table(records: Sequence[dict], metrics: Sequence[str] = ("auc", "accuracy", "balanced_accuracy", "f1"),
                  ) -> list[dict[str, Any]]:
    """One row per (dataset, arch, label, train_fraction), in order of first appearance: mean ± sd over
    seeds of the test metrics, the mean validation metrics (``val_{m}_mean``, what selection uses),
    params, train time — :func:`medtune.reporting.summarize` under the CLI's column names."""
    from medtune.reporting import summarize

    by = ("dataset", "arch", "label", "train_fraction", "hp")
    frame = summarize(records, metrics=None if tuple(metrics) == ("auc", "accuracy", "balanced_accuracy", "f1")
                      else list(metrics), by=by)
    from medtune.reporting._records import configuration

    first_seen: dict[tuple, int] = {}
    for r in records:
        first_seen.setdefault((r["dataset"], r["arch"], r["label"], r["train_fraction"], configuration(r)[1]),
                              len(first_seen))
    rows = []
    for row in frame.to_dict("records"):
        out = {"dataset": row["dataset"], "arch": row["arch"], "strategy": row["label"],
               "train_fraction": row["train_fraction"], "hp": row["hp"], "n_seeds": int(row["n"])}
        out.update({f"{m}_{stat}": float(row[f"{m}_{stat}"]) for m in metrics for stat in ("mean", "sd")})
        out.update({f"val_{m}_mean": float(row[f"val_{m}_mean"]) for m in metrics})
        out.update(trainable_params=int(row["trainable_params"]), train_seconds=float(row["train_seconds"]),
                   depth=row.get("depth"))
        rows.append(out)
    return sorted(rows, key=lambda r: first_seen[(r["dataset"], r["arch"], r["strategy"], r["train_fraction"], r["hp"])])


def format_table(rows: Sequence[dict], metrics: Sequence[str] = ("auc", "accuracy")) -> str:
    """A plain-text table of :func:`results_table` rows."""
    if not rows:
        return "(no finished runs)"
    cells_of = [(r["dataset"], r["arch"], r["strategy"], r["train_fraction"]) for r in rows]
    show_hp = len(set(cells_of)) < len(cells_of)  # several values of a hyper-parameter: say which row is which
    header = ["arch", "strategy"] + (["hyper-parameters"] if show_hp else []) + ["frac", "n"] + list(metrics) + \
        ["trainable", "train s"]
    lines = []
    for r in rows:
        cells = [r["arch"], r["strategy"]] + ([r.get("hp") or ""] if show_hp else []) + \
            [f"{r['train_fraction']:g}", str(r["n_seeds"])]
        for m in metrics:
            mean, sd = r[f"{m}_mean"], r[f"{m}_sd"]
            cells.append(f"{mean:.3f}" + (f" ± {sd:.3f}" if not math.isnan(sd) else ""))
        cells += [f"{r['trainable_params']:,}", f"{r['train_seconds']:.1f}"]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*c) for c in lines]
    return "\n".join(out)
