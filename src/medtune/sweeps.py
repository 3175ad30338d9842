"""Sweeps: expand a grid of runs, skip the ones already in the store, run the rest."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any


from medtune.config import RunConfig, SweepConfig, load_config, parse_strategy_spec
from medtune.errors import ConfigError
from medtune.store import ResultsStore

__all__ = ["expand_sweep", "sweep", "results_table", "format_table", "load_sweep_config"]


@lru_cache(maxsize=4)
def _blocks_of(arch: str, granularity: str):
    """The block partition of ``arch`` (random init; only its structure is used)."""
    import torch

    from medtune.models import create_model, get_blocks

    with torch.random.fork_rng(devices=[]):
        model = create_model(arch, num_classes=2, weights="none")
    return get_blocks(model, granularity=granularity)


def load_sweep_config(source: str | Path | dict | SweepConfig | None = None, **overrides: Any) -> SweepConfig:
    """A SweepConfig from a YAML path, a dict or a SweepConfig, with keyword overrides on top."""
    return load_config(SweepConfig, source, **overrides)


def expand_sweep(config: SweepConfig) -> list[RunConfig]:
    """Every RunConfig of the grid, in a stable order; ``:all`` specs expand per architecture.

    Raises:
        ConfigError: a strategy or a depth that does not fit an architecture (checked before any training).
    """
    from medtune.strategies import create_strategy, get_strategy_class

    runs: list[RunConfig] = []
    for arch in config.arch:
        _blocks_of(arch, "block")  # an unknown architecture fails here, before any training
        for spec in config.strategy:
            name, params = parse_strategy_spec(spec)
            cls = get_strategy_class(name)
            if params.get("_main") == "all":
                others = ",".join(f"{k}={v}" for k, v in params.items() if k != "_main")
                values = cls.expand("all", len(_blocks_of(arch, cls.granularity)))
                specs = [f"{name}:{v}" + (f",{others}" if others else "") for v in values]
            else:
                specs = [spec]
            for s in specs:
                strategy = create_strategy(s)
                if strategy.main_param is not None:
                    # validate the depth against the architecture before any training time is spent
                    strategy.check_blocks(_blocks_of(arch, strategy.granularity))
                for frac in config.train_fraction:
                    for seed in config.seeds:
                        runs.append(config.base.replace(arch=arch, strategy=s, seed=int(seed),
                                                        train_fraction=float(frac)))
    return runs


def _log_to_stderr(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


def _execute_in_worker(cfg_dict: dict, checkpoint: str) -> dict:
    """Module-level (picklable) worker entry for process pools and Ray."""
    from medtune.runner import execute_run

    return execute_run(cfg_dict, checkpoint, log=_log_to_stderr)


def sweep(config: SweepConfig | dict | str | Path | None = None, *, store: ResultsStore | str | Path | None = None,
          executor: Any = "local", workers: int = 1, address: str | None = None, cpus_per_run: float = 1,
          gpus_per_run: float = 0, log: Callable[[str], None] | None = None, **overrides: Any) -> list[dict]:
    """Run every run of a sweep that the store does not hold yet; return all the sweep's records.

    The driver (this process) claims each pending run in the store, sends it to the executor, and
    writes each returned result to the store itself (artifacts by temp file + rename, the record in
    one transaction). Runs another live process has claimed are skipped; runs whose owner died are
    reclaimed and resume from their epoch checkpoint.

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
    import functools
    import sys

    from tqdm import tqdm

    from medtune.executors import LocalExecutor, create_executor
    from medtune.runner import execute_run, prepare_data, run_id_of, store_result

    if isinstance(store, (str, Path)):  # a folder, as from --store: it is a config key
        overrides["store"], store = str(store), None
    cfg = load_sweep_config(config, **overrides)
    runs = expand_sweep(cfg)
    store = store or ResultsStore(cfg.base.store)
    log = log or (lambda _m: None)
    if isinstance(executor, str):
        executor = create_executor(executor, workers=workers, address=address, num_cpus=cpus_per_run,
                                   num_gpus=gpus_per_run)
    log(f"sweep {cfg.name!r}: {len(runs)} runs into {store.root}")
    records: list[dict | None] = [None] * len(runs)
    todo: list[tuple[int, str]] = []
    for i, run_cfg in enumerate(runs):
        run_id = run_id_of(run_cfg, prepare_data(run_cfg).fingerprint())
        records[i] = store.get(run_id)
        if records[i] is not None:
            continue
        if store.claim(run_id, run_cfg.to_dict()):
            todo.append((i, run_id))
        else:
            log(f"{run_id} is being trained by another live process; skipped here")
    log(f"{len(runs) - len(todo)} runs already in the store, {len(todo)} to train")
    in_process = isinstance(executor, LocalExecutor) and executor.workers == 1
    worker = functools.partial(execute_run, log=log) if in_process else _execute_in_worker
    items = [(runs[i].to_dict(), str(store.checkpoint_path(run_id))) for i, run_id in todo]
    bar = tqdm(total=len(todo), desc=cfg.name, unit="run", file=sys.stderr,
               disable=not (cfg.base.progress and sys.stderr.isatty()))
    try:
        for j, payload in executor.map_unordered(worker, items):
            i, run_id = todo[j]
            records[i] = store_result(store, payload)
            bar.update(1)
    except BaseException:
        for i, run_id in todo:
            if records[i] is None:
                store.release(run_id)  # the next start resumes these from their epoch checkpoints
        raise
    finally:
        bar.close()
    return [r for r in records if r is not None]


def results_table(records: Sequence[dict], metrics: Sequence[str] = ("auc", "accuracy", "balanced_accuracy", "f1"),
                  ) -> list[dict[str, Any]]:
    """One row per (dataset, arch, label, train_fraction), in order of first appearance: mean ± sd over
    seeds, params, train time — :func:`medtune.reporting.summarize` under the CLI's column names."""
    from medtune.reporting import summarize

    by = ("dataset", "arch", "label", "train_fraction")
    frame = summarize(records, metrics=None if tuple(metrics) == ("auc", "accuracy", "balanced_accuracy", "f1")
                      else list(metrics), by=by)
    first_seen: dict[tuple, int] = {}
    for r in records:
        first_seen.setdefault(tuple(r[k] for k in by), len(first_seen))
    rows = []
    for row in frame.to_dict("records"):
        out = {"dataset": row["dataset"], "arch": row["arch"], "strategy": row["label"],
               "train_fraction": row["train_fraction"], "n_seeds": int(row["n"])}
        out.update({f"{m}_{stat}": float(row[f"{m}_{stat}"]) for m in metrics for stat in ("mean", "sd")})
        out.update(trainable_params=int(row["trainable_params"]), train_seconds=float(row["train_seconds"]),
                   depth=row.get("depth"))
        rows.append(out)
    return sorted(rows, key=lambda r: first_seen[(r["dataset"], r["arch"], r["strategy"], r["train_fraction"])])


def format_table(rows: Sequence[dict], metrics: Sequence[str] = ("auc", "accuracy")) -> str:
    """A plain-text table of :func:`results_table` rows."""
    if not rows:
        return "(no finished runs)"
    header = ["arch", "strategy", "frac", "n"] + [m for m in metrics] + ["trainable", "train s"]
    lines = []
    for r in rows:
        cells = [r["arch"], r["strategy"], f"{r['train_fraction']:g}", str(r["n_seeds"])]
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
