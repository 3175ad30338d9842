"""DEFT: differential evolution over which blocks (or layers) of a backbone to fine-tune.

Vrbančič & Podgorelec 2020 (*Transfer learning with adaptive fine-tuning*, IEEE Access
8:196197). A genome is one bit per searchable unit, input to output: 1 = the unit trains, 0 = it
stays frozen. The head is not part of the genome; it always trains. The fitness of a genome is a
validation metric (higher is better, AUC by default) after a low-fidelity training run that the
caller's :class:`Evaluator` performs; this module only searches, constrains and caches.

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
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
from scipy.optimize import differential_evolution
from scipy.stats import qmc

from medtune.errors import ConfigError, MedtuneError, NotFittedError, unknown_name_error
from medtune.deft._cache import GenomeCache, InMemoryGenomeCache, genome_key

__all__ = [
    "Mask",
    "Evaluation",
    "Evaluator",
    "DEFTSearch",
    "search_result_to_dict",
    "INFEASIBLE_MODES",
]

Mask = tuple[int, ...]
"""One 0/1 per searchable unit (block or layer), input to output; the head is excluded."""

INFEASIBLE_MODES = ("penalty", "repair")

# A feasible fitness must be >= this; every penalised fitness is below it (see DEFTSearch).
_PENALTY_BASE = -1.0
# The violation charged to a genome whose training returned a NaN or infinite fitness.
_NON_FINITE_VIOLATION = 1.0


@dataclass
class Evaluation:
    """What one low-fidelity training of a mask produced.

    Attributes:
        fitness: validation metric, higher is better (e.g. macro AUC in [0, 1]); must be >= -1
            for a feasible genome (the penalties sit below -1).
        trainable_params: number of parameters that trained (head included).
        seconds: wall-clock training time in seconds, compared with ``max_seconds``.
        info: anything JSON-serialisable the caller wants kept (run id, per-epoch metrics, ...).
    """

    fitness: float
    trainable_params: int
    seconds: float
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Return the evaluation as a JSON-serialisable dict (keys as the attributes)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Evaluation:
        """Rebuild an evaluation from :meth:`to_dict` output (extra keys are ignored)."""
        return cls(
            fitness=float(data["fitness"]),
            trainable_params=int(data["trainable_params"]),
            seconds=float(data["seconds"]),
            info=dict(data.get("info") or {}),
        )


class Evaluator(Protocol):
    """Trains a mask at low fidelity and reports its validation fitness.

    For a process pool or Ray ``map_fn`` the evaluator must be picklable (a module-level class
    or function, not a lambda or closure); for the default builtin ``map`` or a thread pool
    anything callable works.
    """

    def __call__(self, mask: Mask) -> Evaluation: ...


class _StopSearch(Exception):
    """Raised inside the generation map when the user callback asks to stop (not a user error)."""


class _Escaped(Exception):
    """Carries an error out of the generation map past scipy.

    scipy turns any TypeError/ValueError raised by a ``workers`` map into a RuntimeError about the
    map's signature, which would hide the evaluator's real error (or a ConfigError); ``fit``
    re-raises the carried error instead.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(repr(error))
        self.error = error


def _check_int(value: Any, name: str, *, min_val: int, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < min_val:
        raise ConfigError(
            f"The {name!r} parameter of DEFTSearch must be an int >= {min_val}. Got {value!r} "
            f"instead.{hint}"
        )
    return int(value)


def _check_float(value: Any, name: str, *, low: float, high: float, high_open: bool = False,
                 low_open: bool = False, hint: str = "") -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        ok = above and below
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(
            f"The {name!r} parameter of DEFTSearch must be a float in {interval}. Got {value!r} "
            f"instead.{hint}"
        )
    return float(value)


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
    ``popsize`` is a multiplier of the number of parameters). The search builds a Latin-hypercube
    initial population of exactly ``popsize`` rows, as scipy's default init does, and passes it
    as ``init=``; scipy then keeps that size. The run evaluates ``popsize * (generations + 1)``
    genomes at most (generation 0 is the initial population) and stops early when every member
    has the same score (``tol=0``, ``atol=0``).

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
        popsize: genomes per generation (total, not scipy's multiplier), >= 5.
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
        evaluations_: one dict per proposed genome, in order: ``generation``, ``genome_idx``,
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
    ) -> None:
        self.num_units = _check_int(num_units, "num_units", min_val=1)
        if not callable(evaluator):
            raise ConfigError(
                f"The 'evaluator' parameter of DEFTSearch must be callable as evaluator(mask) -> "
                f"Evaluation. Got {type(evaluator).__name__} instead."
            )
        self.evaluator = evaluator
        if isinstance(unit_params, (str, bytes)) or not isinstance(unit_params, Sequence) \
                or len(unit_params) != self.num_units:
            got = (len(unit_params) if isinstance(unit_params, Sequence)
                   else type(unit_params).__name__)
            raise ConfigError(
                f"The 'unit_params' parameter of DEFTSearch must be a sequence of {self.num_units} "
                f"ints (one per unit, num_units={self.num_units}). Got {got!r} instead."
            )
        self.unit_params = tuple(_check_int(p, "unit_params", min_val=0) for p in unit_params)
        self.head_params = _check_int(head_params, "head_params", min_val=0)
        min_total = self.head_params + sum(self.unit_params)
        self.total_params = _check_int(
            total_params, "total_params", min_val=max(min_total, 1),
            hint=" It must count at least the head and every unit.",
        )
        self.max_trainable_params = max_trainable_params
        self.max_trainable_params_ = self._resolve_max_params(max_trainable_params)
        self.max_seconds = None if max_seconds is None else _check_float(
            max_seconds, "max_seconds", low=0.0, high=math.inf, low_open=True, high_open=True)
        if infeasible not in INFEASIBLE_MODES:
            raise unknown_name_error("infeasible mode", infeasible, INFEASIBLE_MODES)
        self.infeasible = infeasible
        self.popsize = _check_int(
            popsize, "popsize", min_val=5,
            hint=" It is the total number of genomes per generation (scipy needs at least 5).",
        )
        if isinstance(mutation, tuple):
            if len(mutation) != 2:
                raise ConfigError(
                    f"The 'mutation' parameter of DEFTSearch must be a float in [0, 2) or a "
                    f"(min, max) pair. Got {mutation!r} instead."
                )
            low = _check_float(mutation[0], "mutation", low=0.0, high=2.0, high_open=True)
            high = _check_float(mutation[1], "mutation", low=0.0, high=2.0, high_open=True)
            if not low < high:
                raise ConfigError(
                    f"The 'mutation' parameter of DEFTSearch as a (min, max) pair needs min < max. "
                    f"Got {mutation!r} instead."
                )
            self.mutation: float | tuple[float, float] = (low, high)
        else:
            self.mutation = _check_float(mutation, "mutation", low=0.0, high=2.0, high_open=True)
        self.recombination = _check_float(recombination, "recombination", low=0.0, high=1.0)
        self.generations = _check_int(generations, "generations", min_val=0)
        self.seed = _check_int(seed, "seed", min_val=0)
        if fidelity is not None and not isinstance(fidelity, Mapping):
            raise ConfigError(
                f"The 'fidelity' parameter of DEFTSearch must be a dict (e.g. {{'epochs': 2}}) or "
                f"None. Got {type(fidelity).__name__} instead."
            )
        self.fidelity = dict(fidelity or {})
        genome_key((0,) * self.num_units, self.fidelity)  # validates JSON-serialisability
        if not isinstance(context, str):
            raise ConfigError(
                f"The 'context' parameter of DEFTSearch must be a str (e.g. a data fingerprint). "
                f"Got {type(context).__name__} instead."
            )
        self.context = context
        if cache is not None and not all(callable(getattr(cache, m, None)) for m in ("get", "put")):
            raise ConfigError(
                f"The 'cache' parameter of DEFTSearch must have get(key) and put(key, value) "
                f"methods (a GenomeCache). Got {type(cache).__name__} instead."
            )
        self.cache = cache if cache is not None else InMemoryGenomeCache()
        if map_fn is not None and not callable(map_fn):
            raise ConfigError(
                f"The 'map_fn' parameter of DEFTSearch must be a map-like callable "
                f"map_fn(func, iterable), e.g. ThreadPoolExecutor(...).map. Got "
                f"{type(map_fn).__name__} instead."
            )
        self.map_fn = map_fn
        if callback is not None and not callable(callback):
            raise ConfigError(
                f"The 'callback' parameter of DEFTSearch must be callable as callback(entry). Got "
                f"{type(callback).__name__} instead."
            )
        self.callback = callback

    # ------------------------------------------------------------------ helpers
    def _resolve_max_params(self, value: int | float | None) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(
                f"The 'max_trainable_params' parameter of DEFTSearch must be an int (absolute), a "
                f"float in (0, 1] (fraction of total_params) or None. Got {value!r} instead."
            )
        if isinstance(value, numbers.Integral):
            budget = int(value)
        else:
            fraction = _check_float(
                value, "max_trainable_params", low=0.0, high=1.0, low_open=True,
                hint=" A float is a fraction of total_params; pass an int for an absolute count.",
            )
            budget = int(math.floor(fraction * self.total_params))
        if budget < self.head_params:
            raise ConfigError(
                f"The 'max_trainable_params' parameter of DEFTSearch resolves to {budget} "
                f"parameters, fewer than the head alone ({self.head_params}), so no mask is "
                f"feasible. Raise it to at least {self.head_params} "
                f"({self.head_params / self.total_params:.4g} of total_params)."
            )
        return budget

    def _check_mask(self, mask: Sequence[int]) -> Mask:
        bits = tuple(mask)
        if len(bits) != self.num_units or any(bit not in (0, 1) for bit in bits):
            raise ConfigError(
                f"A DEFT mask must be {self.num_units} values of 0 or 1 (one per unit, head "
                f"excluded). Got {list(bits)!r} instead."
            )
        return tuple(int(bit) for bit in bits)

    def count_trainable(self, mask: Sequence[int]) -> int:
        """Return the trainable parameters of a mask: head + the selected units.

        Raises:
            ConfigError: if ``mask`` is not ``num_units`` values of 0 or 1.
        """
        bits = self._check_mask(mask)
        selected = (p for bit, p in zip(bits, self.unit_params, strict=True) if bit)
        return self.head_params + sum(selected)

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
        repaired = list(self._check_mask(mask))
        if self.max_trainable_params_ is None:
            return tuple(repaired)
        while self.count_trainable(repaired) > self.max_trainable_params_:
            selected = [i for i, bit in enumerate(repaired) if bit]
            drop_idx = max(selected, key=lambda i: (self.unit_params[i], -i))
            repaired[drop_idx] = 0
        return tuple(repaired)

    def _initial_population(self) -> np.ndarray:
        # scipy's own LHS init sizes the population as popsize * num_units; drawing the LHS here
        # lets the user give the total size. Values span the widened integral interval
        # (-0.5, 1.5), so after scipy's rounding each bit is 0 or 1 with equal probability.
        lhs_seed, _ = np.random.SeedSequence(self.seed).spawn(2)
        sampler = qmc.LatinHypercube(d=self.num_units, seed=np.random.default_rng(lhs_seed))
        return -0.5 + 2.0 * sampler.random(self.popsize)

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
        run = _SearchRun(self)
        _, de_seed = np.random.SeedSequence(self.seed).spawn(2)
        self.stopped_by_callback_ = False
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
            self.scipy_result_ = {"nit": int(result.nit), "nfev": int(result.nfev),
                                  "message": str(result.message)}
        except _StopSearch:
            self.scipy_result_ = {"nit": None, "nfev": None, "message": "stopped by callback"}
        except _Escaped as escaped:
            raise escaped.error from None
        self.stopped_by_callback_ = run.stopped
        self.history_ = run.history
        self.evaluations_ = run.records

        best = run.best_record(feasible_only=True)
        self.fallback_used_ = False
        if best is None:
            best = run.evaluate_fallback()
            self.fallback_used_ = True
            if not best["feasible"]:
                raise MedtuneError(
                    f"DEFT found no feasible mask: even the head-only mask took "
                    f"{best['seconds']:.3g} s, over max_seconds={self.max_seconds}. Loosen "
                    "'max_seconds' or lower the fidelity (fewer epochs, a smaller subset)."
                )
            warnings.warn(
                f"DEFT evaluated no feasible mask in {len(run.records) - 1} genomes; returning "
                f"the head-only mask (fitness {best['fitness']:.4g}).\n"
                "HINT: loosen max_trainable_params / max_seconds or use infeasible='repair'.",
                stacklevel=2,
            )
        self.num_trainings_ = run.num_trainings
        self.best_mask_: Mask = tuple(best["mask"])
        self.best_fitness_ = float(best["fitness"])
        self.best_evaluation_ = Evaluation(
            fitness=float(best["fitness"]), trainable_params=int(best["evaluated_params"]),
            seconds=float(best["seconds"]), info=dict(best["info"]),
        )
        return self


class _SearchRun:
    """The state of one :meth:`DEFTSearch.fit`: records, history and scipy's two hooks."""

    def __init__(self, search: DEFTSearch) -> None:
        self.search = search
        self.records: list[dict] = []
        self.history: list[dict] = []
        self.num_trainings = 0
        self.stopped = False
        self._scores: dict[tuple[int, ...], float] = {}  # genome as scipy sees it -> score
        self._generation = 0
        self._order = 0

    # ---- scipy's objective: scores of a generation are filled in by map_generation first
    def objective(self, x: np.ndarray) -> float:
        genome = self.to_mask(x)
        return -self._scores[genome]

    @staticmethod
    def to_mask(x: np.ndarray) -> Mask:
        values = np.asarray(x, dtype=float)
        bits = np.rint(values)
        if not np.all((bits == 0) | (bits == 1)) or not np.allclose(values, bits):
            raise MedtuneError(
                f"scipy proposed a non-binary genome {values.tolist()}; expected 0/1."
            )
        return tuple(int(b) for b in bits)

    # ---- scipy's workers=: evaluate one generation, then score it through `func`
    def map_generation(self, func: Callable, iterable: Iterable) -> list[float]:
        try:
            return self._map_generation(func, iterable)
        except (_StopSearch, _Escaped):
            raise
        except Exception as exc:
            raise _Escaped(exc) from exc

    def _map_generation(self, func: Callable, iterable: Iterable) -> list[float]:
        xs = [np.asarray(x) for x in iterable]
        search = self.search
        entry = {"generation": self._generation, "num_evaluations": len(xs), "num_trainings": 0,
                 "num_cache_hits": 0, "num_duplicates": 0, "num_infeasible": 0}
        gen_records: list[dict] = []
        to_train: dict[str, dict] = {}  # key -> first record of this generation needing training
        seen: dict[str, dict] = {}
        for genome_idx, x in enumerate(xs):
            genome = self.to_mask(x)
            mask, repaired_from = genome, None
            if search.infeasible == "repair":
                mask = search.repair(genome)
                repaired_from = list(genome) if mask != genome else None
            record = self._new_record(genome_idx, mask, repaired_from)
            gen_records.append(record)
            budget = search.max_trainable_params_
            if budget is not None and record["trainable_params"] > budget:
                violation = (record["trainable_params"] - budget) / max(budget, 1)
                record.update(source="not_trained", feasible=False, reason="max_trainable_params",
                              score=_PENALTY_BASE - violation)
                continue
            key = record["key"]
            if key in seen:
                record["source"] = "duplicate"
                continue
            seen[key] = record
            cached = search.cache.get(key)
            if cached is not None:
                record["source"] = "cache"
                self._apply_evaluation(record, Evaluation.from_dict(cached))
            else:
                record["source"] = "trained"
                to_train[key] = record

        if to_train:
            pending = list(to_train.values())
            masks = [tuple(r["mask"]) for r in pending]
            results = (search.map_fn or map)(search.evaluator, masks)
            num_received = 0
            for record, evaluation in zip(pending, results, strict=False):  # counted below
                num_received += 1
                self.num_trainings += 1
                self._check_evaluation(evaluation, record["mask"])
                value = {"mask": list(record["mask"]), "fidelity": search.fidelity,
                         "context": search.context, **evaluation.to_dict()}
                search.cache.put(record["key"], value)
                self._apply_evaluation(record, evaluation)
            if num_received != len(pending):
                raise MedtuneError(
                    f"map_fn returned {num_received} results for {len(pending)} masks; it must "
                    "behave like the builtin map(func, iterable)."
                )

        for record in gen_records:
            if record["source"] == "duplicate":
                first = seen[record["key"]]
                for name in ("feasible", "reason", "fitness", "score", "seconds", "info",
                             "evaluated_params"):
                    record[name] = first[name]
            entry["num_trainings"] += record["source"] == "trained"
            entry["num_cache_hits"] += record["source"] == "cache"
            entry["num_duplicates"] += record["source"] == "duplicate"
            entry["num_infeasible"] += not record["feasible"]
            self._scores[tuple(record["genome"])] = record["score"]
        self.records.extend(gen_records)

        self._pending_entry = entry
        if self._generation == 0:
            # the initial population is the population (no selection yet); later generations are
            # finished by on_generation_end, once scipy has selected.
            self._finish_generation(float(np.mean([r["score"] for r in gen_records])))
            if self.stopped:
                raise _StopSearch
        self._generation += 1
        return [func(x) for x in xs]

    # ---- scipy's callback after each generation >= 1 (selection done)
    def on_generation_end(self, intermediate_result) -> bool:
        mean_score = -float(np.mean(intermediate_result.population_energies))
        self._finish_generation(mean_score)
        return self.stopped

    def _finish_generation(self, mean_score: float) -> None:
        entry = self._pending_entry
        best = self.best_record(feasible_only=False)
        entry.update(
            best_fitness=best["score"], best_feasible=best["feasible"], mean_fitness=mean_score,
            best_mask=list(best["mask"]), trainable_fraction=best["trainable_fraction"],
        )
        self.history.append(entry)
        if self.search.callback is not None and self.search.callback(dict(entry)):
            self.stopped = True

    # ---- records
    def _new_record(self, genome_idx: int, mask: Mask, repaired_from: list[int] | None) -> dict:
        search = self.search
        trainable = search.count_trainable(mask)
        self._order += 1
        return {
            "generation": self._generation, "genome_idx": genome_idx, "mask": list(mask),
            "genome": list(repaired_from or mask), "repaired_from": repaired_from,
            "key": genome_key(mask, search.fidelity, search.context), "source": None,
            "feasible": True, "reason": None, "trainable_params": trainable,
            "trainable_fraction": trainable / search.total_params, "fitness": None,
            "score": None, "seconds": None, "info": {}, "evaluated_params": None,
            "order": self._order,
        }

    def _check_evaluation(self, evaluation: Any, mask: list[int]) -> None:
        if not isinstance(evaluation, Evaluation):
            raise MedtuneError(
                f"The DEFT evaluator must return an Evaluation(fitness, trainable_params, seconds, "
                f"info) for mask {mask}; got {type(evaluation).__name__}."
            )
        expected = self.search.count_trainable(mask)
        if int(evaluation.trainable_params) != expected:
            warnings.warn(
                f"The DEFT evaluator reports {evaluation.trainable_params} trainable parameters "
                f"for mask {mask}, but head_params + unit_params give {expected}; the search uses "
                f"{expected} for the budget.\n"
                "HINT: check unit_params/head_params against the model's block partition.",
                stacklevel=2,
            )

    def _apply_evaluation(self, record: dict, evaluation: Evaluation) -> None:
        search = self.search
        fitness = float(evaluation.fitness)
        record.update(fitness=fitness, seconds=float(evaluation.seconds),
                      info=dict(evaluation.info), evaluated_params=int(evaluation.trainable_params))
        if not math.isfinite(fitness):
            record.update(feasible=False, reason="non_finite_fitness",
                          score=_PENALTY_BASE - _NON_FINITE_VIOLATION)
        elif search.max_seconds is not None and record["seconds"] > search.max_seconds:
            violation = (record["seconds"] - search.max_seconds) / search.max_seconds
            record.update(feasible=False, reason="max_seconds", score=_PENALTY_BASE - violation)
        elif fitness < _PENALTY_BASE:
            raise MedtuneError(
                f"The DEFT evaluator returned fitness {fitness:.4g} for mask {record['mask']}; "
                "fitness must be >= -1 because penalised masks score below -1. Use a metric in "
                "[0, 1] (AUC, accuracy) or rescale it."
            )
        else:
            record.update(feasible=True, reason=None, score=fitness)

    def best_record(self, *, feasible_only: bool) -> dict | None:
        """Best record by score; ties: fewer trainable parameters, then first evaluated."""
        candidates = [r for r in self.records if r["feasible"] or not feasible_only]
        if not candidates:
            return None
        feasible = [r for r in candidates if r["feasible"]]
        pool = feasible or candidates
        return max(pool, key=lambda r: (r["score"], -r["trainable_params"], -r["order"]))

    def evaluate_fallback(self) -> dict:
        """Evaluate (or fetch from the cache) the head-only mask and record it."""
        search = self.search
        mask = (0,) * search.num_units
        self._generation = None  # type: ignore[assignment]  # not part of any DE generation
        record = self._new_record(0, mask, None)
        cached = search.cache.get(record["key"])
        if cached is not None:
            record["source"] = "cache"
            evaluation = Evaluation.from_dict(cached)
        else:
            record["source"] = "trained"
            evaluation = search.evaluator(mask)
            self.num_trainings += 1
            self._check_evaluation(evaluation, list(mask))
            search.cache.put(record["key"], {"mask": list(mask), "fidelity": search.fidelity,
                                             "context": search.context, **evaluation.to_dict()})
        self._apply_evaluation(record, evaluation)
        self.records.append(record)
        return record


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
        "history", "evaluations", "scipy"}``; ``evaluations`` drop the internal fields
        (``genome``, ``order``, ``evaluated_params``).

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
        "generations": search.generations, "seed": search.seed, "fidelity": dict(search.fidelity),
        "context": search.context,
    }
    evaluations = []
    for record in search.evaluations_:
        row = {k: v for k, v in record.items() if k not in ("genome", "order", "evaluated_params")}
        row["fitness"] = _json_number(row["fitness"])
        row["score"] = _json_number(row["score"])
        evaluations.append(row)
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
