"""``medtune search``: DEFT on real training runs, then the full-fidelity comparison.

The engine (:class:`~medtune.deft.DEFTSearch`) only searches; this module supplies its
evaluator (a low-fidelity training of one mask through the one training loop), its persistent
genome cache (the results store's ``genomes`` table, so a restarted search retrains nothing),
and afterwards retrains the best mask at full fidelity beside the paper's three baselines —
``scratch`` (the same architecture from random initialisation, on its own epoch budget
``scratch_epochs``), ``linear`` (the frozen pretrained network with a new head) and ``full`` — and
every ``top_k``, on the same data and seeds.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from medtune._checks import check_choice, check_scalar, param_error
from medtune._tensors import resolve_device
from medtune.config import RunConfig, _WithBase, load_config
from medtune.deft._constraints import budget_from_setting
from medtune.deft._records import Evaluation
from medtune.deft.deft import INFEASIBLE_MODES, DEFTSearch, search_result_to_dict
from medtune.store import ResultsStore
from medtune.training.metrics import higher_is_better

__all__ = ["SearchConfig", "run_search"]


@dataclass(frozen=True)
class SearchConfig(_WithBase):
    """A DEFT search: the base run plus the search's own settings.

    Attributes:
        granularity: ``block`` or ``layer`` — one genome bit per non-head unit.
        popsize: differential evolution's population size multiplier (scipy's ``popsize``).
        mutation: differential weight F of the mutation, in [0, 2].
        recombination: crossover probability CR, in [0, 1].
        generations: generations of differential evolution (scipy's ``maxiter``).
        search_seed: seed of the evolution.
        search_epochs: epochs of each low-fidelity training.
        search_train_fraction: share of the training split each low-fidelity training uses.
        max_trainable_params: budget, absolute (> 1) or a fraction of the model (<= 1); 0 = none.
        max_seconds: training-time budget per evaluation in seconds; 0 = none.
        infeasible: ``penalty`` or ``repair`` (see DEFTSearch).
        seeds: training seeds of the full-fidelity comparison.
        compare: also train ``scratch``, ``full``, ``linear`` and every ``top_k`` at full fidelity.
    """

    #: The fixed value sets of fields (validated on build, shown in the CLI's help).
    CHOICES: ClassVar[dict[str, tuple]] = {"granularity": ("block", "layer"), "infeasible": INFEASIBLE_MODES}

    granularity: str = "block"
    popsize: int = 8
    mutation: float = 0.8
    recombination: float = 0.7
    generations: int = 4
    search_seed: int = 0
    search_epochs: int = 2
    search_train_fraction: float = 1.0
    max_trainable_params: float = 0.0
    max_seconds: float = 0.0
    infeasible: str = "penalty"
    seeds: tuple[int, ...] = (0,)
    compare: bool = True

    def __post_init__(self) -> None:
        owner = "SearchConfig"
        for name, choices in self.CHOICES.items():
            check_choice(getattr(self, name), name, choices, owner=owner)
        check_scalar(self.search_epochs, "search_epochs", int, min_val=1, owner=owner)
        check_scalar(self.search_train_fraction, "search_train_fraction", (float, int), min_val=0, max_val=1,
                     include_min=False, owner=owner)
        check_scalar(self.max_trainable_params, "max_trainable_params", (float, int), min_val=0, owner=owner)
        check_scalar(self.max_seconds, "max_seconds", (float, int), min_val=0, owner=owner)
        seeds = self.seeds
        if isinstance(seeds, str):
            seeds = [s for s in seeds.split(",") if s.strip()]
        try:
            object.__setattr__(self, "seeds", tuple(int(s) for s in (seeds if isinstance(seeds, (list, tuple)) else [seeds])))
        except ValueError:
            raise param_error("seeds", owner, "integers", self.seeds) from None


def compare_with_baselines(rows: list[dict], monitor: str, *, search_seconds: float = 0.0,
                           search_trainings: int = 0) -> tuple[list[dict], str]:
    """DEFT's comparison table from :func:`medtune.sweeps.results_table` rows: the DEFT mask, ``scratch``,
    ``full``, ``linear`` and the best ``top_k`` — the best chosen on validation (the monitored metric,
    else AUC), never on test. Returns the rows and the column that selected.
    """
    metric = monitor if rows and f"val_{monitor}_mean" in rows[0] else "auc"
    select = f"val_{metric}_mean"
    sign = 1.0 if higher_is_better(metric) else -1.0
    tops = [r for r in rows if r["strategy"].startswith("top_k") and not math.isnan(r[select])]
    best_top = max(tops, key=lambda r: sign * r[select], default=None)
    comparison = []
    for r in rows:
        if r["strategy"].startswith("top_k") and r is not best_top:
            continue
        is_deft = r["strategy"].startswith("deft")
        comparison.append({"label": "deft" if is_deft else r["strategy"],
                           "auc": r["auc_mean"], "auc_sd": r["auc_sd"], "accuracy": r["accuracy_mean"],
                           "val_auc": r["val_auc_mean"],
                           "trainable_params": r["trainable_params"], "train_seconds": r["train_seconds"],
                           # what it cost to find this configuration, beside what it costs to train it
                           "search_seconds": search_seconds if is_deft else 0.0,
                           "search_trainings": search_trainings if is_deft else 0,
                           "n_seeds": r["n_seeds"]})
    return comparison, select


class StoreGenomeCache:
    """The DEFT genome cache on the results store's ``genomes`` table (survives restarts)."""

    def __init__(self, store: ResultsStore) -> None:
        self.store = store

    def get(self, key: str) -> dict | None:
        return self.store.get_genome(key)

    def put(self, key: str, value: dict) -> None:
        self.store.put_genome(key, value)


class MaskEvaluator:
    """Train one mask at low fidelity and return its validation score (picklable for process pools).

    Args:
        cfg: the run config of a low-fidelity training (epochs, train_fraction already set).
        granularity: ``block`` or ``layer``.
    """

    def __init__(self, cfg: RunConfig, granularity: str) -> None:
        self.cfg, self.granularity = cfg, granularity

    def __call__(self, mask) -> Evaluation:
        from medtune.runner import build_run, prepare_data
        from medtune.training.loop import fit

        bits = "".join(str(int(b)) for b in mask)
        cfg = self.cfg.replace(strategy=f"deft:mask={bits},granularity={self.granularity}")
        data = prepare_data(cfg)
        strategy, model, blocks = build_run(cfg, data, resolve_device(cfg.device))
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            result = fit(model, data, strategy, cfg, blocks=blocks)
        seconds = time.perf_counter() - t0
        score = result.val_metrics.get(cfg.monitor, float("nan"))
        if not higher_is_better(cfg.monitor):  # DEFT maximises its fitness
            score = -score
        return Evaluation(fitness=float(score), trainable_params=result.trainable_params, seconds=seconds,
                          info={"val": result.val_metrics, "train_seconds": result.train_seconds})


def run_search(config: SearchConfig | dict | str, *, store: ResultsStore | str | None = None,
               log: Callable[[str], None] | None = None, map_fn=None, executor: str = "local", workers: int = 1,
               address: str | None = None, **overrides: Any) -> dict:
    """Run a DEFT search, retrain its best mask and compare it; return the stored search record.

    Args:
        config: a SearchConfig, a dict of its keys, or a YAML path.
        store: results store (default: the config's ``store``).
        log: receives one-line progress messages.
        map_fn: map-like used to evaluate one generation; default: the executor's ``map``, or
            the builtin ``map`` (in this process) for ``local`` with one worker.
        executor: ``local`` (``workers`` processes) or ``ray`` (at ``address``); see
            :func:`medtune.executors.create_executor`.
        workers: processes of the ``local`` executor.
        address: a running Ray cluster (``auto`` or ``HOST:PORT``), or ``None`` to start a local one.
        **overrides: config keys replacing the config's.

    Returns:
        The search record as stored (``store.searches()``): ``search_id``, ``dataset``, ``arch``,
        ``granularity``, ``unit_names``, ``unit_params``, ``history``, ``best_mask``,
        ``best_fitness``, ``seconds``, ``num_trainings``, ``num_evaluations``,
        ``trainable_fraction``, ``comparison``, ``config`` and ``evaluations``.
    """
    from medtune.models import get_blocks
    from medtune.runner import build_run, prepare_data, run
    from medtune.sweeps import results_table

    if isinstance(store, str):  # a folder, as from --store: it is a config key
        overrides["store"], store = store, None
    cfg = load_config(SearchConfig, config, **overrides)
    log = log or (lambda _m: None)
    store = store or ResultsStore(cfg.base.store)
    if map_fn is None and (executor != "local" or workers > 1):
        from medtune.executors import create_executor

        map_fn = create_executor(executor, workers=workers, address=address).map
    base = cfg.base.replace(seed=cfg.seeds[0])
    low = base.replace(epochs=cfg.search_epochs, train_fraction=float(cfg.search_train_fraction) * base.train_fraction)
    full_data = prepare_data(base)
    low_data = prepare_data(low)
    _, model, _ = build_run(base.replace(strategy="full"), full_data, torch.device("cpu"))
    blocks = get_blocks(model, granularity=cfg.granularity)
    unit_params = [b.num_params for b in blocks][:-1]
    head_params = blocks[blocks.head_idx].num_params
    total = sum(p.numel() for p in model.parameters())
    unit_names = [b.name for b in blocks][:-1]
    fidelity = {"epochs": cfg.search_epochs, "train_fraction": low.train_fraction, "granularity": cfg.granularity}
    context = json.dumps({"run": low.replace(strategy="deft:mask=0").semantic_dict(), "data": low_data.fingerprint()},
                         sort_keys=True)
    budget = budget_from_setting(cfg.max_trainable_params)
    search_id = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]
    log(f"DEFT search {search_id}: {len(unit_names)} {cfg.granularity}s, popsize {cfg.popsize}, "
        f"{cfg.generations} generations, {cfg.search_epochs} epochs per evaluation")

    def on_generation(entry: dict) -> None:
        log(f"generation {entry['generation']}: best {entry['best_fitness']:.4f} mask "
            f"{''.join(map(str, entry['best_mask']))} ({entry['num_trainings']} trained, "
            f"{entry['num_cache_hits']} cached)")

    t0 = time.perf_counter()
    search = DEFTSearch(num_units=len(unit_names), evaluator=MaskEvaluator(low, cfg.granularity),
                        unit_params=unit_params, head_params=head_params, total_params=total,
                        max_trainable_params=budget, max_seconds=cfg.max_seconds or None, infeasible=cfg.infeasible,
                        popsize=cfg.popsize, mutation=cfg.mutation, recombination=cfg.recombination,
                        generations=cfg.generations, seed=cfg.search_seed, fidelity=fidelity, context=context,
                        cache=StoreGenomeCache(store), map_fn=map_fn, callback=on_generation).fit()
    seconds = time.perf_counter() - t0
    best = "".join(map(str, search.best_mask_))
    log(f"best mask {best} (val {search.best_fitness_:.4f}) after {seconds:.0f} s, "
        f"{search.num_trainings_} trainings")
    result = search_result_to_dict(search)

    specs = [f"deft:mask={best},granularity={cfg.granularity}"]
    if cfg.compare:
        # Vrbančič & Podgorelec's three baselines (scratch, the frozen pretrained network with a new
        # head, full fine-tuning) and every top_k; top_k:0 and top_k:S+1 are linear and full, trained
        # here on their own (as top_k:all expands)
        specs += ["full", "linear", "scratch"] + [f"top_k:{k}" for k in range(1, len(get_blocks(model)) - 1)]
    records = []
    for spec in specs:
        for seed in cfg.seeds:
            records.append(run(base.replace(strategy=spec, seed=seed), store=store, log=log))
    comparison, select = compare_with_baselines(results_table(records), base.monitor, search_seconds=seconds,
                                                search_trainings=search.num_trainings_)
    record = {"search_id": search_id, "dataset": full_data.name, "arch": base.arch, "granularity": cfg.granularity,
              "unit_names": unit_names, "unit_params": unit_params, "history": result["history"],
              "best_mask": list(search.best_mask_), "best_fitness": search.best_fitness_, "seconds": seconds,
              "num_trainings": search.num_trainings_, "num_evaluations": len(search.evaluations_),
              "trainable_fraction": search.count_trainable(search.best_mask_) / total,
              "comparison": comparison, "baseline_selected_on": select, "config": cfg.to_dict(), "evaluations": result.get("evaluations")}
    store.put_search(search_id, record)
    return record
