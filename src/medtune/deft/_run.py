"""One DEFT fit in progress: its records, history and counters, and scipy's two hooks.

scipy calls :meth:`SearchRun.map_generation` as its ``workers=`` map once per generation (the
whole generation is proposed first, ``updating="deferred"``) and :meth:`SearchRun.on_generation_end`
after each selection. The map evaluates the generation (dedupe, cache, budget, training) and
then lets scipy's objective read the scores back; nothing but mask tuples and the evaluator
leaves this process.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medtune.deft._cache import GenomeCache, genome_key
from medtune.deft._constraints import Mask, count_trainable, infeasible_score, judge_evaluation, repair_mask
from medtune.deft._records import Evaluation, GenomeRecord, best_record, cache_value, history_entry
from medtune.errors import MedtuneError


class StopSearch(Exception):
    """Raised inside the generation map when the user callback asks to stop (not a user error)."""


class Escaped(Exception):
    """Carries an error out of the generation map past scipy.

    scipy turns any TypeError/ValueError raised by a ``workers`` map into a RuntimeError about the
    map's signature, which would hide the evaluator's real error (or a ConfigError); ``fit``
    re-raises the carried error instead.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(repr(error))
        self.error = error


def to_mask(x: np.ndarray) -> Mask:
    """Return scipy's trial vector as a mask; it must already be exact 0/1 values."""
    values = np.asarray(x, dtype=float)
    bits = np.rint(values)
    if not np.all((bits == 0) | (bits == 1)) or not np.allclose(values, bits):
        raise MedtuneError(f"scipy proposed a non-binary genome {values.tolist()}; expected 0/1.")
    return tuple(int(b) for b in bits)


@dataclass(frozen=True)
class _Proposal:
    """A genome of the generation being evaluated, before its outcome is known."""

    genome_idx: int
    mask: Mask
    repaired_from: Mask | None
    key: str
    trainable_params: int


@dataclass(frozen=True)
class _Outcome:
    """A trained or cached evaluation (normalised to plain floats, ints and a dict) and its verdict."""

    evaluation: Evaluation
    reason: str | None  # None when feasible
    score: float


class SearchRun:
    """The state of one :meth:`DEFTSearch.fit <medtune.deft.DEFTSearch.fit>`.

    Args:
        evaluator: trains a mask and returns an :class:`Evaluation`.
        unit_params, head_params, total_params: the model's parameter counts.
        budget: the resolved parameter budget, or ``None``.
        max_seconds: the time budget per evaluation in seconds, or ``None``.
        repair: repair over-budget genomes instead of penalising them.
        fidelity, context: the cache key's other two parts.
        cache: where evaluations are read and written.
        map_fn: map-like used to train the masks of a generation.
        callback: called with each history entry; ``True`` stops the search.

    Attributes:
        records: one :class:`GenomeRecord` per proposed genome, in order.
        history: one entry per finished generation.
        evaluations: the :class:`Evaluation` behind each trained or cached record, by
            ``(generation, genome_idx)``.
        num_trainings: evaluator calls so far.
        stopped: whether the callback asked to stop.
    """

    def __init__(self, *, evaluator: Callable[[Mask], Evaluation], unit_params: Sequence[int],
                 head_params: int, total_params: int, budget: int | None, max_seconds: float | None,
                 repair: bool, fidelity: Mapping[str, Any], context: str, cache: GenomeCache,
                 map_fn: Callable[[Callable, Iterable], Iterable],
                 callback: Callable[[dict], bool | None] | None) -> None:
        self.evaluator, self.cache, self.map_fn, self.callback = evaluator, cache, map_fn, callback
        self.unit_params, self.head_params, self.total_params = unit_params, head_params, total_params
        self.budget, self.max_seconds, self.repair = budget, max_seconds, repair
        self.fidelity, self.context = fidelity, context
        self.records: list[GenomeRecord] = []
        self.history: list[dict] = []
        self.evaluations: dict[tuple[int | None, int], Evaluation] = {}
        self.num_trainings = 0
        self.stopped = False
        self._scores: dict[Mask, float] = {}  # genome as scipy sees it -> score
        self._generation: int | None = 0
        self._pending: tuple[int, list[GenomeRecord]] = (0, [])  # the generation scipy is selecting

    # ---- scipy's objective: the scores of a generation are filled in by map_generation first
    def objective(self, x: np.ndarray) -> float:
        """Return the negated score of a genome of the generation just mapped."""
        return -self._scores[to_mask(x)]

    # ---- scipy's workers=: evaluate one generation, then score it through `func`
    def map_generation(self, func: Callable, iterable: Iterable) -> list[float]:
        """Evaluate a generation, then return ``[func(x) for x in iterable]`` as scipy expects."""
        try:
            xs = [np.asarray(x) for x in iterable]
            self._evaluate_generation([to_mask(x) for x in xs])
            return [func(x) for x in xs]
        except (StopSearch, Escaped):
            raise
        except Exception as exc:
            raise Escaped(exc) from exc

    def _evaluate_generation(self, genomes: list[Mask]) -> None:
        proposals = [self._propose(genome_idx, genome) for genome_idx, genome in enumerate(genomes)]
        outcomes: dict[str, _Outcome] = {}
        sources: list[str] = []
        to_train: dict[str, _Proposal] = {}  # key -> first proposal of this generation needing training
        for proposal in proposals:
            if self.budget is not None and proposal.trainable_params > self.budget:
                sources.append("not_trained")
            elif proposal.key in outcomes or proposal.key in to_train:
                sources.append("duplicate")
            elif (cached := self.cache.get(proposal.key)) is not None:
                sources.append("cache")
                outcomes[proposal.key] = self._judge(Evaluation.from_dict(cached), proposal.mask)
            else:
                sources.append("trained")
                to_train[proposal.key] = proposal
        if to_train:
            outcomes.update(self._train(list(to_train.values())))

        records = [self._record(p, source, outcomes.get(p.key)) for p, source in zip(proposals, sources, strict=True)]
        for record in records:
            self._scores[record.genome] = record.score
        self.records.extend(records)
        self._pending = (self._generation, records)
        if self._generation == 0:
            # the initial population is the population (no selection yet); later generations are
            # finished by on_generation_end, once scipy has selected.
            self._finish_generation(float(np.mean([r.score for r in records])))
            if self.stopped:
                raise StopSearch
        self._generation += 1

    def _propose(self, genome_idx: int, genome: Mask) -> _Proposal:
        mask, repaired_from = genome, None
        if self.repair:
            mask = repair_mask(genome, self.unit_params, self.head_params, self.budget)
            repaired_from = genome if mask != genome else None
        return _Proposal(genome_idx=genome_idx, mask=mask, repaired_from=repaired_from,
                         key=genome_key(mask, self.fidelity, self.context),
                         trainable_params=count_trainable(mask, self.unit_params, self.head_params))

    def _train(self, proposals: list[_Proposal]) -> dict[str, _Outcome]:
        """Train the proposals through ``map_fn``, caching each result as soon as it arrives."""
        outcomes = {}
        results = self.map_fn(self.evaluator, [p.mask for p in proposals])
        for proposal, evaluation in zip(proposals, results, strict=False):  # counted below
            outcomes[proposal.key] = self._accept_training(proposal.key, proposal.mask, evaluation)
        if len(outcomes) != len(proposals):
            raise MedtuneError(
                f"map_fn returned {len(outcomes)} results for {len(proposals)} masks; it must "
                "behave like the builtin map(func, iterable)."
            )
        return outcomes

    def _accept_training(self, key: str, mask: Mask, evaluation: Any) -> _Outcome:
        """Check a fresh training's result, write it to the cache, then judge it."""
        self.num_trainings += 1
        if not isinstance(evaluation, Evaluation):
            raise MedtuneError(
                f"The DEFT evaluator must return an Evaluation(fitness, trainable_params, seconds, "
                f"info) for mask {list(mask)}; got {type(evaluation).__name__}."
            )
        expected = count_trainable(mask, self.unit_params, self.head_params)
        if int(evaluation.trainable_params) != expected:
            warnings.warn(
                f"The DEFT evaluator reports {evaluation.trainable_params} trainable parameters "
                f"for mask {list(mask)}, but head_params + unit_params give {expected}; the search "
                f"uses {expected} for the budget.\n"
                "HINT: check unit_params/head_params against the model's block partition.",
                stacklevel=2,
            )
        self.cache.put(key, cache_value(mask, self.fidelity, self.context, evaluation))
        return self._judge(evaluation, mask)

    def _judge(self, evaluation: Evaluation, mask: Mask) -> _Outcome:
        evaluation = Evaluation(fitness=float(evaluation.fitness), trainable_params=int(evaluation.trainable_params),
                                seconds=float(evaluation.seconds), info=dict(evaluation.info))
        reason, score = judge_evaluation(evaluation.fitness, evaluation.seconds, max_seconds=self.max_seconds,
                                         mask=mask)
        return _Outcome(evaluation, reason, score)

    def _record(self, proposal: _Proposal, source: str, outcome: _Outcome | None) -> GenomeRecord:
        """Build the record of a proposal; ``outcome`` is ``None`` when it broke the parameter budget."""
        if outcome is None:
            evaluation, reason = None, "max_trainable_params"
            score = infeasible_score(proposal.trainable_params, self.budget)
        else:
            evaluation, reason, score = outcome.evaluation, outcome.reason, outcome.score
            self.evaluations[(self._generation, proposal.genome_idx)] = evaluation
        return GenomeRecord(
            generation=self._generation, genome_idx=proposal.genome_idx, mask=proposal.mask,
            repaired_from=proposal.repaired_from, key=proposal.key, source=source,
            feasible=reason is None, reason=reason, trainable_params=proposal.trainable_params,
            trainable_fraction=proposal.trainable_params / self.total_params,
            fitness=None if evaluation is None else evaluation.fitness, score=score,
            seconds=None if evaluation is None else evaluation.seconds,
            info={} if evaluation is None else evaluation.info,
        )

    # ---- scipy's callback after each generation >= 1 (selection done)
    def on_generation_end(self, intermediate_result) -> bool:
        """Finish the generation scipy has just selected; ``True`` asks scipy to stop."""
        self._finish_generation(-float(np.mean(intermediate_result.population_energies)))
        return self.stopped

    def _finish_generation(self, mean_fitness: float) -> None:
        generation, records = self._pending
        best = best_record(self.records, feasible_only=False)
        entry = history_entry(generation, records, best=best, mean_fitness=mean_fitness)
        self.history.append(entry)
        if self.callback is not None and self.callback(dict(entry)):
            self.stopped = True

    def evaluate_fallback(self) -> GenomeRecord:
        """Evaluate (or fetch from the cache) the head-only mask and record it (no generation)."""
        mask = (0,) * len(self.unit_params)
        proposal = self._propose(0, mask)
        cached = self.cache.get(proposal.key)
        if cached is not None:
            source, outcome = "cache", self._judge(Evaluation.from_dict(cached), mask)
        else:
            source, outcome = "trained", self._accept_training(proposal.key, mask, self.evaluator(mask))
        self._generation = None  # not part of any DE generation
        record = self._record(proposal, source, outcome)
        self.records.append(record)
        return record
