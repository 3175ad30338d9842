"""The configuration of a UAP audit of stored runs, validated when it is built.

Every field is a ``medtune attack`` flag, a YAML key and a keyword of ``medtune.attack`` of the
same name (``num_source_images`` ↔ ``--num-source-images``).
"""

from __future__ import annotations

import hashlib
import json
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtune._checks import check_fraction, check_positive_int, check_scalar, param_error
from medtune.config import _as_tuple, _Base
from medtune.errors import ConfigError, unknown_name_error
from medtune.robustness._common import check_target, resolve_norm

__all__ = ["AuditConfig", "SOURCES"]

#: The image sources a UAP is computed from, in their canonical order.
SOURCES = ("train", "natural")

# Fields that do not change what an audit computes; the attack id leaves them out.
_NOT_HASHED = frozenset({"device", "transfer", "store"})


def check_sources(sources: Any, owner: str) -> list[str]:
    """The UAP sources (a sequence or ``"train,natural"``) in the given order, else raise."""
    names = _as_tuple(sources)
    if not names:
        raise ConfigError(f"The 'sources' parameter of {owner} is empty; choose from {', '.join(SOURCES)}.")
    for name in names:
        if name not in SOURCES:
            raise unknown_name_error("UAP source", name, SOURCES)
    return list(names)


def check_zetas(zetas: Any, owner: str) -> list[float]:
    """The budgets ζ (a sequence, one number or ``"0.02,0.04"``) as floats in (0, 1], in the given order."""
    values = _as_tuple(zetas)
    if not values:
        raise ConfigError(f"The 'zetas' parameter of {owner} is empty; pass e.g. zetas=(0.02, 0.04, 0.08).")
    out = []
    for z in values:
        if isinstance(z, str):
            try:
                z = float(z)
            except ValueError:
                raise param_error("zetas", owner, "comma-separated numbers like 0.02,0.04", zetas) from None
        elif isinstance(z, numbers.Real) and not isinstance(z, (bool, int, float)):  # numpy scalars
            z = float(z)
        out.append(check_fraction(z, "zetas", owner))
    return out


@dataclass(frozen=True)
class AuditConfig(_Base):
    """What ``medtune attack`` computes for each stored run, and where.

    ζ and the sources are sets: ``zetas=(0.04, 0.02)`` and ``(0.02, 0.04)`` are one audit with one
    attack id. They are stored canonically (ζ ascending, sources in the order of ``SOURCES``,
    without repeats), as is the norm (``"2"`` or ``"inf"``).

    Attributes:
        sources: ``train`` (the run's training images) and/or ``natural`` (random crops of natural
            photos: ``natural_folder``, or the ones scikit-image ships when it is None).
        zetas: budgets ζ in (0, 1], fractions of the mean Lp norm of each source's images.
        norm: ``2`` or ``inf``.
        targeted: None (non-targeted), a class index, or ``all`` (one targeted UAP per class).
        natural_folder: folder of natural photos for the ``natural`` source.
        num_source_images: images drawn per source.
        max_passes: maximum passes of the UAP loop over the source images.
        goal_rate: a UAP stops once it fools this share of its source images, in (0, 1].
        batch_size: images per UAP gradient step.
        seed: seeds source sampling, crops, UAP shuffling and random controls.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        transfer: also evaluate each run's train-image, non-targeted UAP at the middle ζ on every
            audited run (the transferability matrix).
        store: the results store folder.

    Raises:
        ConfigError: a field is invalid (the message names it), when the config is built.
    """

    sources: tuple[str, ...] = SOURCES
    zetas: tuple[float, ...] = (0.02, 0.04, 0.08)
    norm: str = "2"
    targeted: int | str | None = None
    natural_folder: str | None = None
    num_source_images: int = 256
    max_passes: int = 10
    goal_rate: float = 0.8
    batch_size: int = 32
    seed: int = 0
    device: str = "auto"
    transfer: bool = False
    store: str = "./medtune-results"

    def __post_init__(self) -> None:
        owner = "AuditConfig"
        chosen = check_sources(self.sources, owner)
        object.__setattr__(self, "sources", tuple(s for s in SOURCES if s in chosen))
        object.__setattr__(self, "zetas", tuple(sorted(set(check_zetas(self.zetas, owner)))))
        object.__setattr__(self, "norm", resolve_norm(self.norm, owner=owner))
        targeted = self.targeted
        if isinstance(targeted, str) and targeted.strip().isdigit():  # a flag's text
            targeted = int(targeted)
        object.__setattr__(self, "targeted", check_target(targeted, owner, allow_all=True))
        for name in ("natural_folder", "store"):
            value = getattr(self, name)
            if isinstance(value, Path):
                object.__setattr__(self, name, str(value))
            elif value is not None or name == "store":
                check_scalar(value, name, str, owner=owner)
        for name in ("num_source_images", "max_passes", "batch_size"):
            check_positive_int(getattr(self, name), name, owner)
        object.__setattr__(self, "goal_rate", check_fraction(self.goal_rate, "goal_rate", owner))
        check_scalar(self.seed, "seed", int, min_val=0, owner=owner)
        check_scalar(self.device, "device", str, owner=owner)
        check_scalar(self.transfer, "transfer", bool, owner=owner)

    def semantic_dict(self) -> dict[str, Any]:
        """The fields that decide the result: audit()'s keywords, each attack record's ``params``, the hashed part."""
        return {k: v for k, v in self.to_dict().items() if k not in _NOT_HASHED}

    def attack_id(self, run_id: str, **extra: Any) -> str:
        """16 hex chars: a hash of ``run_id``, :meth:`semantic_dict` and ``extra`` (e.g. ``key=...``)."""
        payload = json.dumps({"run": run_id, **self.semantic_dict(), **extra}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]
