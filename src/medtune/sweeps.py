"""Sweeps: expand a grid of runs, skip the ones already in the store, run the rest."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


from medtune.config import RunConfig, SweepConfig, load_config
from medtune.strategies import StrategySpec
from medtune.store import ResultsStore

__all__ = ["expand_sweep", "plan_sweep", "sweep", "results_table", "format_table", "load_sweep_config"]


def load_sweep_config(source: str | Path | dict | SweepConfig | None = None, **overrides: Any) -> SweepConfig:
    """A SweepConfig from a YAML path, a dict or a SweepConfig, with keyword overrides on top."""
    return load_config(SweepConfig, source, **overrides)


def _grid(config: SweepConfig, log: Callable[[str], None] | None = None) -> list[tuple[RunConfig, Any]]:
    """Every distinct cell of the grid with its strategy object: built once per cell (the first cell of
    a spec keeps the object that checked the spec against the architecture)."""
    from medtune.runner import structure_blocks

    cells: list[tuple[RunConfig, Any]] = []
    solved: set[tuple[str, str]] = set()
    folds = range(config.base.cv_folds) if config.base.cv_folds >= 2 else [config.base.fold]
    for arch in config.arch:
        structure_blocks(arch, "block")  # an unknown architecture fails here, before any training
        for template in config.strategy:
            cls = template.strategy_class
            num_units = len(structure_blocks(arch, cls.granularity)) if template.expand_all else 0
            for first in template.expand_strategies(num_units):
                spec = StrategySpec.from_strategy(first)
                blocks = structure_blocks(arch, first.granularity)
                first.check_blocks(blocks)  # a depth that does not fit fails before any training
                lrs, wds = config.lr, config.weight_decay
                if first.ignores_optimiser(blocks):
                    if len(lrs) * len(wds) > 1:
                        solved.add((str(spec), arch))
                    lrs, wds = lrs[:1], wds[:1]  # a solved probe: every (lr, wd) cell would repeat the same run
                for n, (policy, lr, wd, frac, shots, fold, seed) in enumerate(itertools.product(
                        config.resize, lrs, wds, config.train_fraction, config.train_per_class, folds, config.seeds)):
                    cfg = config.base.replace(arch=arch, strategy=spec, seed=int(seed), train_fraction=float(frac),
                                              train_per_class=int(shots), lr=float(lr), weight_decay=float(wd),
                                              fold=fold, resize=policy)
                    cells.append((cfg, first if n == 0 else None))
    if solved and log is not None:
        log(f"{', '.join(sorted({f'{s} on {a}' for s, a in solved}))}: solved by L-BFGS with C chosen on validation; "
            f"lr and weight_decay unused, so one run per cell of the other axes (at lr {config.lr[0]:g}, "
            f"weight_decay {config.weight_decay[0]:g})")
    seen: set[str] = set()
    unique = [c for c in cells if not (c[0].to_json() in seen or seen.add(c[0].to_json()))]
    if len(unique) < len(cells) and log is not None:
        log(f"removed {len(cells) - len(unique)} duplicate grid cell(s): the same run listed more than once")
    return unique


def expand_sweep(config: SweepConfig, log: Callable[[str], None] | None = None) -> list[RunConfig]:
    """Every distinct RunConfig of the grid, in a stable order; ``:all`` specs expand per architecture.

    Grid cells that are the same run (``seeds: 0,0``, ``lr: 0.001,1e-3``) are kept once; ``log`` is told how many were removed.

    Raises:
        ConfigError: a strategy or a depth that does not fit an architecture (checked before any training).
    """
    return [cfg for cfg, _ in _grid(config, log)]


def plan_sweep(config: SweepConfig, log: Callable[[str], None] | None = None) -> list:
    """The sweep's runs, each planned once (:class:`medtune.runner.RunPlan`: strategy object, block count,
    depth, data fingerprint, run id, and the frozen depths the feature cache should prepare).

    Raises:
        ConfigError, DataError: a cell that does not fit its architecture, or unreadable data.
    """
    from medtune.runner import plan_runs

    return plan_runs(_grid(config, log))


def sweep(config: SweepConfig | dict | str | Path | None = None, *, store: ResultsStore | str | Path | None = None,
          executor: Any = "local", workers: int = 1, address: str | None = None, cpus_per_run: float = 1,
          gpus_per_run: float = 0, log: Callable[[str], None] | None = None, dry_run: bool = False,
          forecast: bool = True, **overrides: Any) -> list[dict]:
    """Run every run of a sweep that the store does not hold yet; return all the sweep's records.

    The driver (this process) plans every run once (:func:`plan_sweep`), claims each pending run in
    the store, sends its plan to the executor, and writes each returned result to the store itself
    (:func:`medtune.runner.run_all`). Runs another live process has claimed are skipped; runs whose
    owner died are reclaimed and resume from their epoch checkpoint.

    Args:
        config: a SweepConfig, a dict of its keys, or a YAML path.
        store: the results store or its folder (default: the config's ``store``).
        executor: ``local``, ``ray`` or an executor object (``medtune.executors``).
        workers: processes of the local executor (1 = in this process).
        address: Ray cluster address (``auto`` or ``HOST:PORT``); None starts a local Ray.
        cpus_per_run, gpus_per_run: Ray resources per run.
        log: receives one-line progress messages.
        dry_run: log the plan and the cost forecast, train nothing (returns the records already stored).
        forecast: log one line before training: runs, epochs and a wall-time estimate from a few timed
            steps per architecture (:func:`medtune.halving.forecast`).
        **overrides: config keys that replace the config's (same names as the YAML keys); ``halving``
            and its ``halving_eta``, ``halving_first_rung``, ``halving_within`` switch successive halving on.
    """
    from medtune.executors import create_executor
    from medtune.runner import run_all

    if isinstance(store, (str, Path)):  # a folder, as from --store: it is a config key
        overrides["store"], store = str(store), None
    elif store is not None:  # a store object: the runs' decode caches live in it too
        overrides["store"] = str(store.root)
    cfg = load_sweep_config(config, **overrides)
    plans = plan_sweep(cfg, log)
    store = store or ResultsStore(cfg.base.store)
    if cfg.expected:  # a literature preset's published numbers travel into the store, for the report
        store.put_expected(cfg.name, cfg.expected)
    log = log or (lambda _m: None)
    if isinstance(executor, str):
        executor = create_executor(executor, workers=workers, address=address, num_cpus=cpus_per_run,
                                   num_gpus=gpus_per_run)
    log(f"sweep {cfg.name!r}: {len(plans)} runs into {store.root}")
    halving = dict(eta=cfg.halving_eta, first_rung=cfg.halving_first_rung, within=cfg.halving_within)
    if cfg.halving:
        log(f"successive halving: eta {cfg.halving_eta}, first rung epoch {cfg.halving_first_rung}, "
            f"within {cfg.halving_within}")
    if forecast or dry_run:
        from medtune.halving import forecast as estimate, format_forecast

        log(format_forecast(estimate(plans, halving=cfg.halving, workers=getattr(executor, "workers", 1), **halving)))
    if dry_run:
        for p in plans:
            c = p.config
            log(f"  {p.run_id} {c.arch} {c.strategy} lr {c.lr:g} wd {c.weight_decay:g} seed {c.seed} "
                f"epochs {c.epochs}" + (f" [{store.status(p.run_id)}]" if store.status(p.run_id) else ""))
        return [r for r in (store.get(p.run_id) for p in plans) if r is not None]
    progress = cfg.name if cfg.base.progress else None
    if cfg.halving:
        from medtune.halving import run_halving

        return run_halving(plans, store=store, executor=executor, log=log, progress=progress, **halving)
    records = run_all(plans, store=store, executor=executor, log=log, progress=progress)
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
