"""Fine-tuning strategies behind one registry (names and citations in the README's "Methods" section)."""

from medtune.strategies import depth as _depth  # noqa: F401  (registers scratch, linear, full, top_k, ...)
from medtune.strategies import zoo as _zoo  # noqa: F401  (registers lp_ft, gradual_*, l2_sp, auto_rgn, ...)
from medtune.strategies import efficient as _efficient  # noqa: F401  (registers bitfit, norm, lora, knn)
from medtune.strategies._registry import get_strategy_class, list_strategies, register_strategy
from medtune.strategies.base import Strategy
from medtune.strategies.spec import StrategySpec, create_strategy
from medtune.training.hooks import EpochContext, Phase

__all__ = ["StrategySpec", "Strategy", "Phase", "EpochContext", "create_strategy", "get_strategy_class", "list_strategies",
           "register_strategy"]
