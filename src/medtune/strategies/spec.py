"""The typed strategy spec: a registered name and its parameters, parsed once.

``"top_k:2"`` and ``"l2_sp:alpha=0.1,beta=0.01"`` are the text form, used only on the way in
(CLI, YAML, API) and on the way out (display, YAML, the results store). Everything in between —
sweep expansion, workers, the training loop — holds a :class:`StrategySpec`.
"""

from __future__ import annotations

from collections.abc import Mapping
import re
from dataclasses import dataclass, field
from typing import Any

from medtune.errors import ConfigError
from medtune.strategies._registry import get_strategy_class

__all__ = ["StrategySpec", "create_strategy", "parse_strategy_spec", "format_strategy_spec", "split_strategy_list"]

#: The main-parameter value a sweep expands to every depth of an architecture (``top_k:all``).
EXPAND_ALL = "all"


_PARAM_PIECE = re.compile(r"^\s*[A-Za-z_]\w*\s*=")


def split_strategy_list(text: str) -> list[str]:
    """Split a comma-separated list of strategy specs into its entries: the one grammar of ``run``,
    ``sweep``, YAML and the API.

    A piece of the form ``key=value`` always belongs to the entry before it, so a spec's own
    comma-separated parameters are never split into entries::

        "linear,l2_sp:alpha=0.1,beta=0.5,top_k:all"  ->  ["linear", "l2_sp:alpha=0.1,beta=0.5", "top_k:all"]

    (``;`` between a spec's parameters, ``l2_sp:alpha=0.1;beta=0.5``, is accepted too.)

    Raises:
        ConfigError: the list starts with a ``key=value`` piece that has no strategy to belong to.
    """
    entries: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if _PARAM_PIECE.match(piece) and ":" not in piece.partition("=")[0]:
            if not entries:
                raise ConfigError(f"The strategy list {text!r} starts with the parameter {piece!r}; write "
                                  "'name:key=value' (e.g. 'l2_sp:alpha=0.1,beta=0.5').")
            entries[-1] = f"{entries[-1]}{',' if ':' in entries[-1] else ':'}{piece}"
        else:
            entries.append(piece)
    return entries


def parse_strategy_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"top_k:2"`` / ``"l2_sp:alpha=0.1,beta=0.01"`` into a name and parameters (syntax only).

    A bare value after the colon is the strategy's main parameter (``k`` for top_k/layers_k,
    ``block`` for surgical) and comes back under the key ``_main``; ``key=value`` pairs set named
    parameters. Values stay strings here; the strategy converts them to the types of its defaults.

    Raises:
        ConfigError: the spec is empty or malformed.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"A strategy must be a non-empty string like 'top_k:2'. Got {spec!r} instead.")
    name, _, rest = spec.strip().partition(":")
    params: dict[str, Any] = {}
    if rest:
        for part in rest.split(";" if ";" in rest else ","):
            part = part.strip()
            if not part:
                continue
            if "=" in part:
                key, _, value = part.partition("=")
                params[key.strip()] = value.strip()
            elif "_main" in params:
                raise ConfigError(f"Strategy spec {spec!r} has two unnamed parameters; name them: 'name:key=value'.")
            else:
                params["_main"] = part
    return name.strip(), params


def format_strategy_spec(name: str, params: Mapping[str, Any], main_key: str | None = None) -> str:
    """Inverse of :func:`parse_strategy_spec`: the main parameter bare, the others ``key=value`` sorted."""
    if not params:
        return name
    parts = []
    if main_key and main_key in params:
        parts.append(str(params[main_key]))
    parts += [f"{k}={params[k]}" for k in sorted(params) if k != main_key]
    return f"{name}:{','.join(parts)}"


@dataclass(frozen=True)
class StrategySpec:
    """A registered strategy with every parameter resolved (defaults filled, types converted, validated).

    Build it with :meth:`parse`; ``str(spec)`` is the canonical text (the main parameter always
    shown, other parameters only where they differ from their defaults), which is what the results
    store, the run id and the report see — ``top_k:2`` and ``top_k:k=2`` are one run.

    Attributes:
        name: the registry name, e.g. ``top_k``.
        params: ``(name, value)`` pairs of every parameter, sorted by name.
        expand_all: True for a sweep template such as ``top_k:all`` (its main parameter is unset
            until :meth:`expand` gives one spec per depth of an architecture).
    """

    name: str
    params: tuple[tuple[str, Any], ...] = ()
    expand_all: bool = False
    text: str = field(default="", compare=False, repr=False)

    @classmethod
    def parse(cls, spec: str | StrategySpec, *, allow_all: bool = False) -> StrategySpec:
        """Parse and validate a spec string (a StrategySpec is returned as it is).

        Args:
            spec: e.g. ``"full"``, ``"top_k:2"``, ``"l2_sp:alpha=0.1"``.
            allow_all: accept ``name:all`` (sweeps), for strategies that can expand.

        Raises:
            ConfigError: malformed text, unknown strategy, unknown or invalid parameter.
        """
        if isinstance(spec, StrategySpec):
            return spec
        if isinstance(spec, str) and len(split_strategy_list(spec)) > 1:
            raise ConfigError(f"{spec!r} is a list of strategies; a run takes one (a sweep takes a list).")
        name, raw = parse_strategy_spec(spec)
        strategy_cls = get_strategy_class(name)
        main = raw.pop("_main", None)
        if main is not None and strategy_cls.main_param is None:
            raise ConfigError(f"Strategy {name!r} takes no positional parameter; got {spec!r}.")
        if main == EXPAND_ALL and allow_all:
            strategy_cls.expand(EXPAND_ALL, 1)  # raises for strategies that cannot expand
            strategy = strategy_cls(**raw)  # validates the other parameters
            params = {k: v for k, v in strategy.params.items() if k != strategy_cls.main_param}
            shown = {k: v for k, v in params.items() if v != strategy_cls.defaults.get(k)}
            text = format_strategy_spec(name, {strategy_cls.main_param: EXPAND_ALL, **shown}, strategy_cls.main_param)
            return cls(name=name, params=tuple(sorted(params.items())), expand_all=True, text=text)
        if main is not None:
            raw[strategy_cls.main_param] = main
        return cls.from_strategy(strategy_cls(**raw))

    @classmethod
    def from_strategy(cls, strategy) -> StrategySpec:
        """The spec of a built :class:`~medtune.strategies.base.Strategy`."""
        return cls(name=strategy.name, params=tuple(sorted(strategy.params.items())), text=strategy.spec)

    def __str__(self) -> str:
        return self.text

    @property
    def param_dict(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def strategy_class(self) -> type:
        return get_strategy_class(self.name)

    def create(self):
        """A new strategy object (strategies hold per-run state, so each run builds its own)."""
        if self.expand_all:
            raise ConfigError(f"Strategy {self.text!r} is a sweep template; expand it per architecture first.")
        return self.strategy_class(**self.param_dict)

    def expand(self, num_units: int) -> list[StrategySpec]:
        """The specs a ``name:all`` template stands for on a backbone with ``num_units`` blocks or layers."""
        return [self] if not self.expand_all else [StrategySpec.from_strategy(s) for s in self.expand_strategies(num_units)]

    def expand_strategies(self, num_units: int) -> list:
        """One new strategy object per spec that :meth:`expand` gives (``[self.create()]`` for a plain spec)."""
        if not self.expand_all:
            return [self.create()]
        cls = self.strategy_class
        return [cls(**{**self.param_dict, cls.main_param: value}) for value in cls.expand(EXPAND_ALL, num_units)]


def create_strategy(spec, **params: Any):
    """Build a strategy from a spec (``"top_k:2"`` or a :class:`~medtune.strategies.spec.StrategySpec`),
    with keyword parameters on top.

    Raises:
        ConfigError: unknown strategy or invalid parameters.
    """
    spec = StrategySpec.parse(spec)
    return spec.create() if not params else get_strategy_class(spec.name)(**{**spec.param_dict, **params})
