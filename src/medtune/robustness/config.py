"""The configuration of a UAP audit of stored runs, validated when it is built.

Every field is a ``medtune attack`` flag, a YAML key and a keyword of ``medtune.attack`` of the
same name (``num_source_images`` ↔ ``--num-source-images``).
"""

from __future__ import annotations

import hashlib
import json
import numbers
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from medtune._checks import check_choice, check_fraction, check_positive_int, check_scalar, param_error
from medtune.config import _as_tuple, _Base
from medtune.errors import ConfigError, unknown_name_error
from medtune.robustness._common import check_target
from medtune.robustness.params import (
    ALGORITHMS,
    CHECKS,
    DEFAULT_BATCH_SIZE,
    CLIPS,
    RETURNS,
    DEFAULT_GOAL_RATE,
    DEFAULT_MAX_PASSES,
    DEFAULT_STEP_FRACTION,
    PUSHES,
    RANDOM_LINF,
    STEP_SCALES,
    UAPParams,
    check_knobs,
)

__all__ = ["AuditConfig", "CHANNELS", "NATURAL_RESIZE", "PROTOCOLS", "SOURCES"]

#: The image sources a UAP is computed from, in their canonical order.
SOURCES = ("train", "natural", "mixed")
#: Threat-model channel modes: detect grey tasks, or force grey or colour perturbations.
CHANNELS = ("auto", "grey", "rgb")
#: How a natural photo becomes a source image: resized whole (the papers') or random crops resized.
NATURAL_RESIZE = ("whole", "crop")
# The papers' FGSM eps on their [-1, 1] pixel scale ((x - 128) / 128), expressed on medtune's [0, 1] scale.
_PAPER_SCALE = 128 / 255
#: The papers' audit protocols: the knob values of their official code (Takemoto lab: MedicalAI-UAP for
#: Hirano et al. 2021, Natural_UAP for Minagi et al. 2022; both ART's UniversalPerturbation with FGSM).
#: A protocol sets every knob still at its default; a knob given explicitly keeps its value.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "hirano2021": {  # generate_nontargeted_uap.py: FGSM eps 0.0024, max_iter 15, delta 1e-6, X_train whole
        "algorithm": "reference", "step_eps": 0.0024 * _PAPER_SCALE, "step_norm": "inf", "clip": "none",
        "max_passes": 15, "goal_rate": 1.0, "num_source_images": "all", "chunk_size": "all",
        "natural_resize": "whole", "return_v": "last"},
    "minagi2022": {  # run_Natural_UAP.py (README example): fgsm_eps 0.0005, uap_iter 1, 100 files of 1,000 images
        "algorithm": "reference", "step_eps": 0.0005 * _PAPER_SCALE, "step_norm": "inf", "clip": "none",
        "max_passes": 1, "goal_rate": 1.0, "num_source_images": "all", "chunk_size": 1000,
        "natural_resize": "whole", "return_v": "last"},
}

# Fields that are UAPParams fields too: checked by its table (params.CHECKS), under the same names.
_UAP_FIELDS = ("norm", "algorithm", "step_fraction", "step_eps", "step_norm", "step_decay", "step_scale", "push",
               "max_passes", "goal_rate", "batch_size", "clip", "return_v")
# Fields that do not change what an audit computes; the attack id leaves them out.
_NOT_HASHED = frozenset({"device", "transfer", "store"})
# Fields added after stores existed: hashed only when set away from these defaults, so the audits of
# older stores keep their attack ids.
_HASHED_WHEN_SET = {"step_scale": "fixed", "push": "away", "protocol": None, "clip": "pixel", "step_eps": None,
                    "natural_resize": "crop", "return_v": "best"}


def check_sources(sources: Any, owner: str) -> list[str]:
    """The UAP sources (a sequence or ``"train,natural"``) in the given order, else raise.

    A source listed twice is refused: two UAPs of one source would share one key in the store.
    """
    names = _as_tuple(sources)
    if not names:
        raise ConfigError(f"The 'sources' parameter of {owner} is empty; choose from {', '.join(SOURCES)}.")
    for name in names:
        if name not in SOURCES:
            raise unknown_name_error("UAP source", name, SOURCES)
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"The 'sources' parameter of {owner} lists {name!r} twice; list each source once "
                              f"(a folder of photos is the 'natural' source with natural_folder).")
    return list(names)


def _count_or_all(value: Any, name: str, owner: str) -> int | str:
    """An int >= 1 or ``"all"`` (a flag's text ``"256"`` is read as 256)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "all":
            return "all"
        if text.isdigit():
            value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise param_error(name, owner, "an int >= 1 or 'all'", value)
    return int(value)


def _number_or_none(text: str, name: str, owner: str) -> float | None:
    if text.strip().lower() in ("", "none"):
        return None
    try:
        return float(text)
    except ValueError:
        raise param_error(name, owner, "a positive number or None", text) from None


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
        out.append(CHECKS["zeta"](z, "zetas", owner))
    return out


@dataclass(frozen=True)
class AuditConfig(_Base):
    """What ``medtune attack`` computes for each stored run, and where.

    ζ and the sources are sets: ``zetas=(0.04, 0.02)`` and ``(0.02, 0.04)`` are one audit with one
    attack id. They are stored canonically (ζ ascending, sources in the order of ``SOURCES``), as
    is the norm (``"2"`` or ``"inf"``). ``protocol`` sets every knob as a paper's official code; the
    README says where the defaults depart from it.

    Attributes:
        sources: ``train`` (the run's training images), ``natural`` (natural photos: ``natural_folder``,
            or the 16 photos the dependencies ship when it is None) and/or ``mixed`` (a share
            ``mix_fraction`` of natural images, the rest training images).
        zetas: budgets ζ in (0, 1]: ξ = ζ·mean‖x_train‖ₚ over the run's training images for every
            source (Minagi et al.).
        norm: ``2`` or ``inf``.
        targeted: None (non-targeted), a class index, or ``all`` (one targeted UAP per class).
        protocol: None (medtune's knobs), ``hirano2021`` or ``minagi2022``: every knob still at its
            default takes the value of that paper's official code (``PROTOCOLS``).
        natural_folder: folder of natural photos for the ``natural`` and ``mixed`` sources, read in
            chunks (any number of photos, e.g. ImageNet's validation set).
        num_source_images: images per source, or ``all``: the whole training split (``train``,
            ``mixed``) and every photo once (``natural``); a number N draws N (natural: spread over the photos).
        natural_resize: ``whole`` (each photo resized to the input, as the papers) or ``crop`` (random crops).
        mix_fraction: share of natural images in the ``mixed`` source, in (0, 1].
        chunk_size: source images per chunk, or ``all``: each chunk gets up to ``max_passes`` passes and v
            carries over to the next (Minagi et al.); the test fooling rate after each chunk is the
            record's ``source_curve``.
        algorithm: ``batched`` (fast, default) or ``reference`` (the papers'/ART's per-image loop).
        channels: ``auto`` (grey perturbations when every training image has R = G = B), ``grey`` or
            ``rgb``.
        step_fraction: FGSM step as a fraction of ξ (its length in the budget's norm), in (0, 1].
        step_eps: an absolute FGSM eps on the [0, 1] scale instead (ART's eps: for sign steps each pixel
            moves by it); a paper's eps on a [-1, 1] scale is eps·128/255.
        step_norm: None (steps in the budget's norm) or ``inf`` (sign steps, ART's FGSM default
            that the papers' code used under L2 budgets too).
        step_decay: the step is multiplied by this after every pass, in (0, 1]; 1 keeps it fixed.
        step_scale: ``fixed`` (every step has the step size; the papers'), ``sqrt_batch`` (batched
            only: a batch's step is √(its images still to fool) × the step size, as long as that
            many per-image steps summed in independent directions) or ``batch`` (n × the step size);
            None (default): ``sqrt_batch`` for the batched algorithm, ``fixed`` for the reference
            (resolved when the config is built; ``benchmarks/bench_uap_vs_art.py`` compares them with ART).
        push: non-targeted steps: ``away`` from each image's clean label (ART's FGSM) or ``dominant``
            (batched only: towards the class v already sends most fooled images to); None (default):
            ``dominant`` for the batched algorithm, ``away`` for the reference (resolved when the config is built).
        max_passes: maximum passes of the UAP loop over each chunk of source images.
        goal_rate: a UAP stops once it fools this share of its source images, in (0, 1].
        batch_size: images per UAP gradient step (batched) and per evaluation forward.
        clip: ``pixel`` (x+v clipped to [0, 1] when computing and evaluating) or ``none`` (the papers' code).
        return_v: ``best`` (the v with the best source rate) or ``last`` (ART's and the papers').
        num_random: random controls drawn per UAP (mean and max reported; McNemar's test against
            the strongest).
        random_linf: L∞ random controls ``uniform`` in the cube (as the papers' code) or on its ``corners``.
        seed: seeds source sampling, crops, UAP shuffling and random controls.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        transfer: also evaluate each run's UAPs at the middle ζ on every audited run of the same
            dataset and input size (the transferability matrix).
        store: the results store folder.

    Raises:
        ConfigError: a field is invalid (the message names it), when the config is built.
    """

    #: The fixed value sets of fields, shown in the CLI's help (each is checked in __post_init__).
    CHOICES: ClassVar[dict[str, tuple]] = {"sources": SOURCES, "norm": ("2", "inf"), "step_norm": ("2", "inf"),
                                           "algorithm": ALGORITHMS, "channels": CHANNELS, "random_linf": RANDOM_LINF,
                                           "step_scale": STEP_SCALES, "push": PUSHES, "protocol": tuple(PROTOCOLS),
                                           "natural_resize": NATURAL_RESIZE, "clip": CLIPS, "return_v": RETURNS}

    sources: tuple[str, ...] = ("train", "natural")
    zetas: tuple[float, ...] = (0.02, 0.04, 0.08)
    norm: str = "2"
    targeted: int | str | None = None
    protocol: str | None = None
    natural_folder: str | None = None
    num_source_images: int | str = "all"
    natural_resize: str = "whole"
    mix_fraction: float = 0.5
    chunk_size: int | str = 1024
    algorithm: str = "batched"
    channels: str = "auto"
    step_fraction: float = DEFAULT_STEP_FRACTION
    step_eps: float | None = None
    step_norm: str | None = None
    step_decay: float = 1.0
    step_scale: str | None = None
    push: str | None = None
    max_passes: int = DEFAULT_MAX_PASSES
    goal_rate: float = DEFAULT_GOAL_RATE
    batch_size: int = DEFAULT_BATCH_SIZE
    clip: str = "pixel"
    return_v: str = "best"
    num_random: int = 10
    random_linf: str = "uniform"
    seed: int = 0
    device: str = "auto"
    transfer: bool = False
    store: str = "./medtune-results"

    def __post_init__(self) -> None:
        owner = "AuditConfig"
        self._apply_protocol(owner)
        chosen = check_sources(self.sources, owner)
        object.__setattr__(self, "sources", tuple(s for s in SOURCES if s in chosen))
        object.__setattr__(self, "zetas", tuple(sorted(set(check_zetas(self.zetas, owner)))))
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
        for name in ("num_source_images", "chunk_size"):
            object.__setattr__(self, name, _count_or_all(getattr(self, name), name, owner))
        check_positive_int(self.num_random, "num_random", owner)
        check_choice(self.natural_resize, "natural_resize", NATURAL_RESIZE, owner=owner)
        object.__setattr__(self, "mix_fraction", check_fraction(self.mix_fraction, "mix_fraction", owner))
        check_choice(self.channels, "channels", CHANNELS, owner=owner)
        check_choice(self.random_linf, "random_linf", RANDOM_LINF, owner=owner)
        self._check_uap_fields(owner)
        check_scalar(self.seed, "seed", int, min_val=0, owner=owner)
        check_scalar(self.device, "device", str, owner=owner)
        check_scalar(self.transfer, "transfer", bool, owner=owner)

    def _apply_protocol(self, owner: str) -> None:
        """Set the knobs still at their defaults to the protocol's values."""
        if isinstance(self.protocol, str) and self.protocol.strip().lower() in ("", "none"):  # a flag's text
            object.__setattr__(self, "protocol", None)
        if self.protocol is None:
            return
        check_choice(self.protocol, "protocol", tuple(PROTOCOLS), owner=owner)
        defaults = {f.name: f.default for f in fields(self)}
        for name, value in PROTOCOLS[self.protocol].items():
            if getattr(self, name) == defaults[name]:
                object.__setattr__(self, name, value)

    def _check_uap_fields(self, owner: str) -> None:
        """Check the UAP knobs with UAPParams' table and hold the resulting :attr:`uap`."""
        if isinstance(self.step_eps, str):  # a flag's text
            object.__setattr__(self, "step_eps", _number_or_none(self.step_eps, "step_eps", owner))
        for name, value in check_knobs({name: getattr(self, name) for name in _UAP_FIELDS}, owner).items():
            object.__setattr__(self, name, value)
        uap = UAPParams.from_checked(zeta=self.zetas[0], **{k: getattr(self, k) for k in _UAP_FIELDS})
        if self.step_norm == self.norm:  # stored as None: the budget's norm (older stores' attack ids)
            object.__setattr__(self, "step_norm", None)
        object.__setattr__(self, "_uap", uap.derive(step_norm=uap.step_norm or self.norm))

    @property
    def uap(self) -> UAPParams:
        """The UAP parameters every UAP of the audit shares, checked with the config; each UAP sets its
        ζ, ξ, target and resolved channels with :meth:`UAPParams.derive`."""
        return self._uap

    def semantic_dict(self) -> dict[str, Any]:
        """The fields that decide the result: audit()'s keywords, each attack record's ``params``, the hashed part."""
        return {k: v for k, v in self.to_dict().items()
                if k not in _NOT_HASHED and not (k in _HASHED_WHEN_SET and v == _HASHED_WHEN_SET[k])}

    def attack_id(self, run_id: str, **extra: Any) -> str:
        """16 hex chars: a hash of ``run_id``, :meth:`semantic_dict` and ``extra`` (e.g. ``key=...``)."""
        payload = json.dumps({"run": run_id, **self.semantic_dict(), **extra}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]
