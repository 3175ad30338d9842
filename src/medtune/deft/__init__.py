"""DEFT search: differential evolution over which blocks or layers to fine-tune.

:class:`DEFTSearch` is the engine: it only searches, constrains and caches. ``medtune.search``
(:func:`medtune.deft.driver.run_search`, configured by :class:`medtune.deft.driver.SearchConfig`)
runs it on real trainings and compares the best mask at full fidelity.
"""

from medtune.deft._cache import GenomeCache, InMemoryGenomeCache, JsonlGenomeCache, genome_key
from medtune.deft._constraints import Mask
from medtune.deft._records import Evaluation, Evaluator, GenomeRecord
from medtune.deft.deft import INFEASIBLE_MODES, DEFTSearch, search_result_to_dict

# Also importable from here, for type hints and custom caches: GenomeCache, Evaluator, Mask,
# INFEASIBLE_MODES.
__all__ = [
    "DEFTSearch",
    "Evaluation",
    "GenomeRecord",
    "InMemoryGenomeCache",
    "JsonlGenomeCache",
    "genome_key",
    "search_result_to_dict",
]
