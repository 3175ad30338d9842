"""DEFT: differential evolution over which blocks (or layers) of a backbone to fine-tune.

Vrbančič & Podgorelec 2020 (*Transfer learning with adaptive fine-tuning*, IEEE Access
8:196197). A genome is one bit per searchable unit, input to output: 1 = the unit trains, 0 = it
stays frozen. The head is not part of the genome; it always trains. The fitness of a genome is a
validation metric (higher is better, AUC by default) after a low-fidelity training run that the
caller's :class:`Evaluator` performs; this package only searches, constrains and caches. This
module holds the user-facing :class:`DEFTSearch`; the constraint arithmetic is in
``_constraints.py``, the records in ``_records.py`` and the state of one fit in ``_run.py``.

The optimiser is :func:`scipy.optimize.differential_evolution` with ``integrality`` (each bit is
an integer variable in [0, 1]), ``updating="deferred"`` (a whole generation is proposed before
any is selected, so it can be trained in parallel) and ``polish=False``. The search hands scipy
an in-process map (``workers=``) that dedupes the generation, answers repeats from the
:class:`GenomeCache`, skips genomes that break the parameter budget, and sends only the genomes
that must be trained to the caller's ``map_fn(evaluator, masks)``. So the cache, the records and
the penalties never leave the calling process; only the evaluator and plain mask tuples do.

How scipy rounds integral variables (checked on scipy 1.17): the bounds [0, 1] are widened to
(-0.5, 1.5) and every trial is rounded with ``np.round`` when it is scaled, so the objective only
ever sees exact 0.0 / 1.0 values and both values have the same share of the search interval.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from scipy.optimize import differential_evolution
from scipy.stats import qmc

from medtune._checks import check_choice, check_scalar, param_error
from medtune.deft._cache import GenomeCache, InMemoryGenomeCache, genome_key
from medtune.deft._constraints import (Mask, check_mask, count_trainable, feasible_top_k_masks, repair_mask,
                                       resolve_budget)
from medtune.deft._records import Evaluation, Evaluator, best_record
from medtune.deft._run import Escaped, SearchRun, StopSearch
from medtune.errors import MedtuneError, NotFittedError
from medtune.progress import progress_bar

__all__ = ["DEFTSearch", "Evaluation", "search_result_to_dict"]

INFEASIBLE_MODES = ("penalty", "repair")

_OWNER = "DEFTSearch"


def _int_param(value, name: str, *, min_val: int | None = None) -> int:
    """Return ``value`` as an int after :func:`check_scalar` (numpy integers pass; bool does not)."""
    check_scalar(value, name, numbers.Integral, min_val=min_val, owner=_OWNER)
    return int(value)


def _real_param(value, name: str, *, min_val: float, max_val: float, include_min: bool = True,
                include_max: bool = True) -> float:
    """Return ``value`` as a float after :func:`check_scalar` (numpy floats pass; NaN does not)."""
    check_scalar(value, name, numbers.Real, min_val=min_val, max_val=max_val, include_min=include_min,
                 include_max=include_max, owner=_OWNER)
    if math.isnan(value):
        raise param_error(name, _OWNER, "a number", value)
    return float(value)


def _callable_param(value, name: str, expected: str) -> None:
    if not callable(value):
        raise param_error(name, _OWNER, expected, value)


class DEFTSearch:
    """Search which units of a backbone to fine-tune with differential evolution.

    Constraints and their penalties (fitness is "higher is better"; scipy minimises its
    negation):

    * Parameter budget, checked *before* training: a mask trains
      ``head_params + sum(unit_params[i] for selected i)`` parameters. Over the budget ``B``:
      with ``infeasible="penalty"`` the mask is **not trained**, is recorded with
      ``feasible=False`` and scores ``-1 - (trainable - B) / B``; with ``infeasible="repair"``
      the largest selected unit (ties: the one nearest the input) is dropped until the mask fits,
      and the repaired mask is trained in its place (scipy keeps the original genome; the record
      keeps both, ``mask`` and ``repaired_from``).
    * Time budget ``T`` seconds, known only *after* training: ``seconds > T`` makes the mask
      infeasible with score ``-1 - (seconds - T) / T`` (the training result stays cached, so a
      later search with a looser ``T`` reuses it).
    * A NaN or infinite fitness (diverged training) is infeasible with score ``-2``.

    Every penalised score is below -1, so feasible fitnesses must be >= -1 (AUC, accuracy, F1
    and balanced accuracy are in [0, 1]); a feasible fitness below -1 raises.

    Population: ``popsize`` is the **total** number of genomes per generation (scipy's own
    ``popsize`` is a multiplier of the number of parameters). With ``seed_top_k`` (the default)
    the initial population holds every top-k mask within the parameter budget (the last k units
    train, k = 0 … num_units; k = 0 is the linear probe's head-only mask), so the result is never
    worse on validation than the best feasible top-k; the other rows are a Latin hypercube, as
    scipy's default init, and the population grows to the number of those masks where that
    exceeds ``popsize``. It is passed as ``init=``; scipy then keeps that size. The run evaluates
    ``population * (generations + 1)`` genomes at most (generation 0 is the initial population)
    and stops early when every member has the same score (``tol=0``, ``atol=0``).

    Caching: a genome is identified by :func:`genome_key` ``(mask, fidelity, context)``. Within a
    generation identical genomes are trained once; across generations and across processes
    (with a persistent ``cache``) a key already in the cache is never trained again. Each
    training is written to the cache as soon as it finishes, so a killed search resumes where it
    stopped: rerun it with the same arguments and seed and it replays the same generations from
    the cache and ends with the same result as an uninterrupted run (for a deterministic
    evaluator).

    Result: the best **feasible** evaluated mask (highest fitness; ties: fewer trainable
    parameters, then first evaluated). If no evaluated mask is feasible, the head-only mask
    (all zeros, the cheapest and always within the parameter budget) is evaluated and returned
    with a warning and ``fallback_used_ = True``; if even that breaks ``max_seconds``, a
    :class:`MedtuneError` asks to loosen the constraint.

    Args:
        num_units: number of searchable units (blocks or layers, head excluded), >= 1.
        evaluator: trains a mask and returns an :class:`Evaluation`.
        unit_params: parameter count of each unit, input to output, ``len == num_units``.
        head_params: parameter count of the head (always trainable).
        total_params: parameter count of the whole model, >= head + sum(units); the
            denominator of ``trainable_fraction``.
        max_trainable_params: parameter budget; an int is absolute, a float in (0, 1] a
            fraction of ``total_params``; ``None`` for no budget. Must admit the head.
        max_seconds: training-time budget per evaluation in seconds, > 0; ``None`` for none.
        infeasible: ``"penalty"`` or ``"repair"`` (see above).
        popsize: genomes per generation (total, not scipy's multiplier), >= 5; raised to the
            number of feasible top-k masks with ``seed_top_k`` where that is larger.
        seed_top_k: seed the initial population with every feasible top-k mask.
        mutation: DE differential weight F in [0, 2), or a ``(min, max)`` pair for dithering.
        recombination: DE crossover probability CR in [0, 1].
        generations: DE generations after the initial population (scipy ``maxiter``), >= 0.
        seed: seeds the initial population and scipy's DE; same seed, same search.
        fidelity: JSON-serialisable low-fidelity settings (epochs, subset, ...); part of the
            cache key and passed on in the records. The evaluator reads its own fidelity; this
            dict only has to describe it.
        context: what else the evaluation depends on (data fingerprint, arch, training seed,
            block/layer granularity); part of the cache key.
        cache: where evaluations are kept; default a fresh :class:`InMemoryGenomeCache`.
        map_fn: map-like ``map_fn(evaluator, masks) -> iterable of Evaluation`` in input order,
            e.g. ``ThreadPoolExecutor(...).map`` or a process pool's ``map`` (then the evaluator
            must be picklable). Default: builtin ``map``. Results are consumed (and cached) one
            by one as the iterator yields them.
        callback: ``callback(entry)`` called after each generation with its ``history_`` entry;
            returning ``True`` stops the search after that generation.

    Attributes:
        best_mask_: the best feasible mask, a tuple of 0/1.
        best_fitness_: its fitness.
        best_evaluation_: its :class:`Evaluation`.
        history_: one dict per generation (0 = initial population): ``generation``,
            ``best_fitness`` and ``best_mask`` (best score so far; a penalised score while no
            feasible mask is known), ``best_feasible``, ``mean_fitness`` (mean score of the
            population after selection), ``trainable_fraction`` (of ``best_mask``),
            ``num_evaluations`` (genomes proposed), ``num_trainings``, ``num_cache_hits``,
            ``num_duplicates`` (repeats within the generation), ``num_infeasible``.
        evaluations_: one dict per proposed genome, in order (a :class:`GenomeRecord
            <medtune.deft.GenomeRecord>` as ``to_dict``): ``generation``, ``genome_idx``,
            ``mask``, ``repaired_from``, ``key``, ``source`` (``trained``, ``cache``,
            ``duplicate`` or ``not_trained``), ``feasible``, ``reason`` (``None``,
            ``max_trainable_params``, ``max_seconds`` or ``non_finite_fitness``),
            ``trainable_params``, ``trainable_fraction``, ``fitness`` (raw; ``None`` if not
            trained), ``score`` (what DE saw), ``seconds``, ``info``.
        num_trainings_: evaluator calls made by this fit.
        max_trainable_params_: the resolved absolute parameter budget, or ``None``.
        fallback_used_: whether the head-only fallback was returned.
        stopped_by_callback_: whether the callback ended the search.
        scipy_result_: ``{"nit", "nfev", "message"}`` of scipy's run (``None`` counts when the
            callback stopped it at generation 0).

    Raises:
        ConfigError: on invalid arguments (at construction).

    Example:
        >>> search = DEFTSearch(num_units=4, evaluator=my_eval, unit_params=[10, 20, 40, 80],
        ...                     head_params=5, total_params=155, max_trainable_params=0.5,
        ...                     popsize=8, generations=5, seed=0).fit()
        >>> search.best_mask_
        (0, 1, 1, 0)
    """

    def __init__(
        self,
        *,
        num_units: int,
        evaluator: Evaluator,
        unit_params: Sequence[int],
        head_params: int,
        total_params: int,
        max_trainable_params: int | float | None = None,
        max_seconds: float | None = None,
        infeasible: str = "penalty",
        popsize: int = 8,
        mutation: float | tuple[float, float] = 0.8,
        recombination: float = 0.7,
        generations: int = 10,
        seed: int = 0,
        fidelity: dict | None = None,
        context: str = "",
        cache: GenomeCache | None = None,
        map_fn: Callable[[Callable, Iterable], Iterable] | None = None,
        callback: Callable[[dict], bool | None] | None = None,
        seed_top_k: bool = True,
    ) -> None:
        self.num_units = _int_param(num_units, "num_units", min_val=1)
        _callable_param(evaluator, "evaluator", "callable as evaluator(mask) -> Evaluation")
        self.evaluator = evaluator
        if isinstance(unit_params, (str, bytes)) or not isinstance(unit_params, Sequence) \
                or len(unit_params) != self.num_units:
            got = (len(unit_params) if isinstance(unit_params, Sequence)
                   else type(unit_params).__name__)
            raise param_error("unit_params", _OWNER, f"a sequence of {self.num_units} ints (one per unit, "
                              f"num_units={self.num_units})", got)
        self.unit_params = tuple(_int_param(p, "unit_params", min_val=0) for p in unit_params)
        self.head_params = _int_param(head_params, "head_params", min_val=0)
        min_total = max(self.head_params + sum(self.unit_params), 1)
        self.total_params = _int_param(total_params, "total_params")
        if self.total_params < min_total:
            raise param_error("total_params", _OWNER, f"an int >= {min_total}", total_params,
                              " It must count at least the head and every unit.")
        self.max_trainable_params = max_trainable_params
        self.max_trainable_params_ = resolve_budget(max_trainable_params, total_params=self.total_params,
                                                    head_params=self.head_params)
        self.max_seconds = None if max_seconds is None else _real_param(
            max_seconds, "max_seconds", min_val=0.0, max_val=math.inf, include_min=False, include_max=False)
        check_choice(infeasible, "infeasible", INFEASIBLE_MODES, owner=_OWNER)
        self.infeasible = infeasible
        self.popsize = _int_param(popsize, "popsize")
        if self.popsize < 5:
            raise param_error("popsize", _OWNER, "an int >= 5", popsize,
                              " It is the total number of genomes per generation (scipy needs at least 5).")
        self.mutation = self._check_mutation(mutation)
        self.recombination = _real_param(recombination, "recombination", min_val=0.0, max_val=1.0)
        self.generations = _int_param(generations, "generations", min_val=0)
        self.seed = _int_param(seed, "seed", min_val=0)
        if fidelity is not None and not isinstance(fidelity, Mapping):
            raise param_error("fidelity", _OWNER, "a dict (e.g. {'epochs': 2}) or None", fidelity)
        self.fidelity = dict(fidelity or {})
        genome_key((0,) * self.num_units, self.fidelity)  # validates JSON-serialisability
        if not isinstance(context, str):
            raise param_error("context", _OWNER, "a str (e.g. a data fingerprint)", context)
        self.context = context
        if cache is not None and not all(callable(getattr(cache, m, None)) for m in ("get", "put")):
            raise param_error("cache", _OWNER, "an object with get(key) and put(key, value) methods "
                              "(a GenomeCache)", cache)
        self.cache = cache if cache is not None else InMemoryGenomeCache()
        if map_fn is not None:
            _callable_param(map_fn, "map_fn", "a map-like callable map_fn(func, iterable), e.g. "
                            "ThreadPoolExecutor(...).map")
        self.map_fn = map_fn
        if callback is not None:
            _callable_param(callback, "callback", "callable as callback(entry)")
        self.callback = callback
        if not isinstance(seed_top_k, bool):
            raise param_error("seed_top_k", _OWNER, "a bool", seed_top_k)
        self.seed_top_k = seed_top_k

    @staticmethod
    def _check_mutation(mutation: float | tuple[float, float]) -> float | tuple[float, float]:
        if not isinstance(mutation, tuple):
            return _real_param(mutation, "mutation", min_val=0.0, max_val=2.0, include_max=False)
        if len(mutation) != 2:
            raise param_error("mutation", _OWNER, "a float in [0, 2) or a (min, max) pair", mutation)
        low, high = (_real_param(m, "mutation", min_val=0.0, max_val=2.0, include_max=False) for m in mutation)
        if not low < high:
            raise param_error("mutation", _OWNER, "a (min, max) pair with min < max", mutation)
        return low, high

    # ------------------------------------------------------------------ masks
    def count_trainable(self, mask: Sequence[int]) -> int:
        """Return the trainable parameters of a mask: head + the selected units.

        Raises:
            ConfigError: if ``mask`` is not ``num_units`` values of 0 or 1.
        """
        return count_trainable(check_mask(mask, self.num_units), self.unit_params, self.head_params)

    def repair(self, mask: Sequence[int]) -> Mask:
        """Drop the largest selected units (ties: nearest the input) until the budget holds.

        Args:
            mask: one 0/1 per unit.

        Returns:
            The repaired mask; ``mask`` itself (as a tuple) if it already fits or there is no
            parameter budget. Deterministic.

        Raises:
            ConfigError: if ``mask`` is not ``num_units`` values of 0 or 1.
        """
        return repair_mask(check_mask(mask, self.num_units), self.unit_params, self.head_params,
                           self.max_trainable_params_)

    def _initial_population(self) -> np.ndarray:
        # The feasible top-k masks (exact 0.0 / 1.0 values, which scipy's rounding keeps), then
        # Latin-hypercube rows up to popsize: scipy's own LHS init sizes the population as
        # popsize * num_units; drawing the LHS here lets the user give the total size. Values
        # span the widened integral interval (-0.5, 1.5), so after scipy's rounding each bit is
        # 0 or 1 with equal probability.
        seeded = (feasible_top_k_masks(self.unit_params, self.head_params, self.max_trainable_params_)
                  if self.seed_top_k else [])
        rows = np.array(seeded, dtype=float).reshape(len(seeded), self.num_units)
        num_random = self.popsize - len(seeded)
        if num_random <= 0:
            return rows
        lhs_seed, _ = np.random.SeedSequence(self.seed).spawn(2)
        sampler = qmc.LatinHypercube(d=self.num_units, seed=np.random.default_rng(lhs_seed))
        return np.concatenate([rows, -0.5 + 2.0 * sampler.random(num_random)])

    # ------------------------------------------------------------------ fit
    def fit(self) -> DEFTSearch:
        """Run the search; sets the attributes ending in ``_``.

        Returns:
            ``self``.

        Raises:
            MedtuneError: if the evaluator returns something other than an
                :class:`Evaluation`, a feasible fitness below -1, or no mask (not even the
                head-only one) meets ``max_seconds``.
            StoreError: if the cache cannot store an evaluation (e.g. ``info`` is not
                JSON-serialisable).
        """
        bar = progress_bar(self.generations + 1, "DEFT", unit="gen")  # the initial population, then each generation
        run = SearchRun(
            evaluator=self.evaluator, unit_params=self.unit_params, head_params=self.head_params,
            total_params=self.total_params, budget=self.max_trainable_params_, max_seconds=self.max_seconds,
            repair=self.infeasible == "repair", fidelity=self.fidelity, context=self.context, cache=self.cache,
            map_fn=self.map_fn or map, callback=_ticking(self.callback, bar),
        )
        with bar:
            self.scipy_result_ = self._run_scipy(run)
        best = best_record(run.records, feasible_only=True)
        self.fallback_used_ = best is None
        if best is None:
            best = run.evaluate_fallback()
            if not best.feasible:
                raise MedtuneError(
                    f"DEFT found no feasible mask: even the head-only mask took "
                    f"{best.seconds:.3g} s, over max_seconds={self.max_seconds}. Loosen "
                    "'max_seconds' or lower the fidelity (fewer epochs, a smaller subset)."
                )
            warnings.warn(
                f"DEFT evaluated no feasible mask in {len(run.records) - 1} genomes; returning "
                f"the head-only mask (fitness {best.fitness:.4g}).\n"
                "HINT: loosen max_trainable_params / max_seconds or use infeasible='repair'.",
                stacklevel=2,
            )
        evaluation = run.evaluations[(best.generation, best.genome_idx)]
        self.stopped_by_callback_ = run.stopped
        self.history_ = run.history
        self.evaluations_ = [record.to_dict() for record in run.records]
        self.num_trainings_ = run.num_trainings
        self.best_mask_: Mask = best.mask
        self.best_fitness_ = evaluation.fitness
        self.best_evaluation_ = Evaluation(fitness=evaluation.fitness, trainable_params=evaluation.trainable_params,
                                           seconds=evaluation.seconds, info=dict(evaluation.info))
        return self

    def _run_scipy(self, run: SearchRun) -> dict:
        """Run scipy's differential evolution with ``run``'s hooks; return ``scipy_result_``."""
        _, de_seed = np.random.SeedSequence(self.seed).spawn(2)
        try:
            result = differential_evolution(
                run.objective,
                bounds=[(0, 1)] * self.num_units,
                strategy="best1bin",
                maxiter=self.generations,
                popsize=1,  # ignored: init= fixes the population size
                tol=0.0,
                atol=0.0,
                mutation=self.mutation,
                recombination=self.recombination,
                seed=np.random.default_rng(de_seed),
                callback=run.on_generation_end,
                polish=False,
                init=self._initial_population(),
                updating="deferred",
                workers=run.map_generation,
                integrality=[True] * self.num_units,
            )
        except StopSearch:
            return {"nit": None, "nfev": None, "message": "stopped by callback"}
        except Escaped as escaped:
            raise escaped.error from None
        return {"nit": int(result.nit), "nfev": int(result.nfev), "message": str(result.message)}


def _json_number(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def search_result_to_dict(search: DEFTSearch) -> dict:
    """Return a fitted search as a JSON-serialisable dict (for the results store and reports).

    Non-finite numbers (a diverged training's NaN fitness) become ``None``.

    Args:
        search: a fitted :class:`DEFTSearch`.

    Returns:
        ``{"params": ..., "best_mask", "best_fitness", "best_evaluation", "fallback_used",
        "stopped_by_callback", "num_trainings", "num_evaluations", "num_distinct_genomes",
        "history", "evaluations", "scipy"}``; ``history`` and ``evaluations`` are
        ``history_`` and ``evaluations_`` (the keys of :meth:`GenomeRecord.to_dict
        <medtune.deft._records.GenomeRecord.to_dict>`).

    Raises:
        NotFittedError: if ``search.fit()`` has not run.
    """
    if not hasattr(search, "best_mask_"):
        raise NotFittedError(
            "This DEFTSearch is not fitted yet; call search.fit() before search_result_to_dict()."
        )
    mutation = list(search.mutation) if isinstance(search.mutation, tuple) else search.mutation
    params = {
        "num_units": search.num_units, "unit_params": list(search.unit_params),
        "head_params": search.head_params, "total_params": search.total_params,
        "max_trainable_params": search.max_trainable_params,
        "max_trainable_params_resolved": search.max_trainable_params_,
        "max_seconds": search.max_seconds, "infeasible": search.infeasible,
        "popsize": search.popsize, "mutation": mutation, "recombination": search.recombination,
        "generations": search.generations, "seed": search.seed, "seed_top_k": search.seed_top_k,
        "fidelity": dict(search.fidelity),
        "context": search.context,
    }
    evaluations = [dict(record, fitness=_json_number(record["fitness"]), score=_json_number(record["score"]))
                   for record in search.evaluations_]
    history = [dict(entry, best_fitness=_json_number(entry["best_fitness"]),
                    mean_fitness=_json_number(entry["mean_fitness"])) for entry in search.history_]
    best_evaluation = search.best_evaluation_.to_dict()
    best_evaluation["fitness"] = _json_number(best_evaluation["fitness"])
    return {
        "params": params,
        "best_mask": list(search.best_mask_),
        "best_fitness": _json_number(search.best_fitness_),
        "best_evaluation": best_evaluation,
        "fallback_used": search.fallback_used_,
        "stopped_by_callback": search.stopped_by_callback_,
        "num_trainings": search.num_trainings_,
        "num_evaluations": len(search.evaluations_),
        "num_distinct_genomes": len({r["key"] for r in search.evaluations_}),
        "history": history,
        "evaluations": evaluations,
        "scipy": dict(search.scipy_result_),
    }


def _ticking(callback: Callable[[dict], bool | None] | None, bar) -> Callable[[dict], bool | None]:
    """``callback`` that first moves the progress bar one generation (the initial population is the first)."""
    def tick(entry: dict) -> bool | None:
        bar.set_postfix_str(f"best {entry['best_fitness']:.4f}" + ("" if entry["best_feasible"] else " (infeasible)")
                            + f", {entry['num_trainings']} trained")
        bar.update()
        return None if callback is None else callback(entry)

    return tick
