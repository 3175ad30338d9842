"""DEFT search: differential evolution over which blocks or layers to fine-tune."""

from medtune.deft._cache import GenomeCache, InMemoryGenomeCache, JsonlGenomeCache, genome_key
from medtune.deft.deft import (
    INFEASIBLE_MODES,
    DEFTSearch,
    Evaluation,
    Evaluator,
    Mask,
    search_result_to_dict,
)

__all__ = [
    "DEFTSearch",
    "Evaluation",
    "Evaluator",
    "GenomeCache",
    "INFEASIBLE_MODES",
    "InMemoryGenomeCache",
    "JsonlGenomeCache",
    "Mask",
    "genome_key",
    "search_result_to_dict",
]
