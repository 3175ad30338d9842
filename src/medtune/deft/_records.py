"""What a DEFT search records: an :class:`Evaluation` per training, a :class:`GenomeRecord` per
proposed genome, a history entry per generation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from medtune.deft._constraints import Mask


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


def cache_value(mask: Sequence[int], fidelity: Mapping[str, Any], context: str,
                evaluation: Evaluation) -> dict[str, Any]:
    """Return what the genome cache keeps for a trained mask (the ``genomes`` table's value).

    Keys: ``mask``, ``fidelity``, ``context`` and those of :meth:`Evaluation.to_dict`;
    :meth:`Evaluation.from_dict` reads it back.
    """
    return {"mask": list(mask), "fidelity": fidelity, "context": context, **evaluation.to_dict()}

SOURCES = ("trained", "cache", "duplicate", "not_trained")
"""Where a record's evaluation came from (``not_trained``: over the parameter budget)."""


@dataclass(frozen=True)
class GenomeRecord:
    """One genome a generation proposed, and how it scored.

    Attributes:
        generation: the DE generation (0 = initial population); ``None`` for the head-only
            fallback, which belongs to no generation.
        genome_idx: its position in the generation.
        mask: the mask that was (or would have been) trained.
        repaired_from: the genome scipy proposed, when repair changed it; else ``None``.
        key: the :func:`~medtune.deft.genome_key` of ``mask``.
        source: one of :data:`SOURCES`.
        feasible: whether it met every constraint.
        reason: ``None``, ``max_trainable_params``, ``max_seconds`` or ``non_finite_fitness``.
        trainable_params: head + selected units, from the search's parameter counts.
        trainable_fraction: ``trainable_params / total_params``.
        fitness: the raw fitness; ``None`` if not trained.
        score: what differential evolution saw (the fitness, or a penalty below -1).
        seconds: training time in seconds; ``None`` if not trained.
        info: the evaluator's ``Evaluation.info``.
    """

    generation: int | None
    genome_idx: int
    mask: Mask
    repaired_from: Mask | None
    key: str
    source: str
    feasible: bool
    reason: str | None
    trainable_params: int
    trainable_fraction: float
    fitness: float | None
    score: float
    seconds: float | None
    info: dict = field(default_factory=dict)

    @property
    def genome(self) -> Mask:
        """The genome as scipy proposed it (before any repair)."""
        return self.repaired_from or self.mask

    def to_dict(self) -> dict[str, Any]:
        """Return the record as stored: the attributes as keys, masks as lists of ints."""
        return {
            "generation": self.generation, "genome_idx": self.genome_idx, "mask": list(self.mask),
            "repaired_from": None if self.repaired_from is None else list(self.repaired_from),
            "key": self.key, "source": self.source, "feasible": self.feasible, "reason": self.reason,
            "trainable_params": self.trainable_params, "trainable_fraction": self.trainable_fraction,
            "fitness": self.fitness, "score": self.score, "seconds": self.seconds, "info": dict(self.info),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenomeRecord:
        """Rebuild a record from :meth:`to_dict` output or a stored search's ``evaluations``.

        Extra keys (older in-memory records carried ``genome``, ``order`` and
        ``evaluated_params``) are ignored.
        """
        repaired_from = data["repaired_from"]
        return cls(
            generation=data["generation"], genome_idx=int(data["genome_idx"]),
            mask=tuple(int(b) for b in data["mask"]),
            repaired_from=None if repaired_from is None else tuple(int(b) for b in repaired_from),
            key=data["key"], source=data["source"], feasible=bool(data["feasible"]), reason=data["reason"],
            trainable_params=int(data["trainable_params"]), trainable_fraction=float(data["trainable_fraction"]),
            fitness=data["fitness"], score=data["score"], seconds=data["seconds"], info=dict(data.get("info") or {}),
        )


def best_record(records: Sequence[GenomeRecord], *, feasible_only: bool) -> GenomeRecord | None:
    """Return the best record by score (feasible ones first); ``None`` if there is none.

    Ties go to fewer trainable parameters, then to the first in ``records``.
    """
    candidates = [r for r in records if r.feasible or not feasible_only]
    if not candidates:
        return None
    pool = [r for r in candidates if r.feasible] or candidates
    best_idx = max(range(len(pool)), key=lambda i: (pool[i].score, -pool[i].trainable_params, -i))
    return pool[best_idx]


def history_entry(generation: int, records: Sequence[GenomeRecord], *, best: GenomeRecord,
                  mean_fitness: float) -> dict[str, Any]:
    """Return one ``history_`` entry: a generation's counts and the best record so far.

    Args:
        generation: the generation's number (0 = initial population).
        records: the records this generation proposed.
        best: the best record of the search so far (:func:`best_record`, any feasibility).
        mean_fitness: mean score of the population after selection.
    """
    sources = [r.source for r in records]
    return {
        "generation": generation, "num_evaluations": len(records),
        "num_trainings": sources.count("trained"), "num_cache_hits": sources.count("cache"),
        "num_duplicates": sources.count("duplicate"),
        "num_infeasible": sum(not r.feasible for r in records),
        "best_fitness": best.score, "best_feasible": best.feasible, "mean_fitness": mean_fitness,
        "best_mask": list(best.mask), "trainable_fraction": best.trainable_fraction,
    }
