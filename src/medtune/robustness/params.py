"""The UAP parameter set: one frozen object, validated once where it enters, handed down to the loop.

:class:`UAPParams` is what :func:`~medtune.robustness.uap.compute_uap` and the registered ``uap``
attack run with; :class:`~medtune.robustness.config.AuditConfig` checks its own copies of these
knobs with the same table (:data:`CHECKS`) and holds the resulting object. Values taken from an
object already checked (a budget ξ computed from a checked ζ, a target from a checked list) are set
with :meth:`UAPParams.derive`, which does not check them again.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import InitVar, dataclass, fields
from typing import Any

from medtune._checks import check_choice, check_fraction, check_positive_int, param_error
from medtune.errors import ConfigError, did_you_mean
from medtune.robustness._common import check_target, resolve_norm

__all__ = [
    "ALGORITHMS",
    "CHANNEL_MODES",
    "CLIPS",
    "RETURNS",
    "CHECKS",
    "DEFAULT_PUSH",
    "DEFAULT_STEP_SCALE",
    "PUSHES",
    "RANDOM_LINF",
    "STEP_SCALES",
    "UAPParams",
    "check_knobs",
    "resolve_for_algorithm",
]

#: The UAP algorithms, default first.
ALGORITHMS = ("batched", "reference")
#: How long a batched step is: the step size (the papers'), or the step size × √(images the step is
#: taken for) — as long as the sum of that many per-image steps in independent directions —, or the step
#: size × the images (as long as that many aligned per-image steps, the most one pass of ART's loop can move v).
STEP_SCALES = ("fixed", "sqrt_batch", "batch")
#: Each algorithm's step scale when none is given: the batched loop's √n (3–12× the test fooling of a
#: fixed step at equal passes; with the dominant push ART's or more within the interval under L2 and L∞:
#: ``benchmarks/bench_uap_vs_art.py``); the per-image loop's one step per image (the papers').
DEFAULT_STEP_SCALE = {"batched": "sqrt_batch", "reference": "fixed"}
#: Where a non-targeted step pushes an image: ``away`` from its clean label (ascending its cross-entropy,
#: ART's FGSM), or towards the ``dominant`` label, the class v already sends most fooled images to (images of
#: that class, and all until one is fooled, away from their label).
PUSHES = ("away", "dominant")
#: Each algorithm's push when none is given: the batched loop's ``dominant`` (a batch's summed away-gradients
#: point at different wrong classes and cancel; ``benchmarks/bench_uap_vs_art.py``), the per-image loop's
#: ``away`` (ART's).
DEFAULT_PUSH = {"batched": "dominant", "reference": "away"}
#: Perturbation spaces of the UAP loop: colour, or grey (R = G = B).
CHANNEL_MODES = ("rgb", "grey")
#: Whether x+v is clipped to the pixel range [0, 1] when the UAP is computed and evaluated (``pixel``), or
#: not (``none``: the papers' code, whose classifiers had no clip values).
CLIPS = ("pixel", "none")
#: Which v the loop returns: the best seen (by the source rate) or the last (ART's and the papers').
RETURNS = ("best", "last")
#: Random controls under an L∞ budget: uniform in the cube (as the papers' code), or its corners.
RANDOM_LINF = ("uniform", "corners")

# Default FGSM step as a fraction of the budget ξ: ten unclipped steps span the ball's radius.
DEFAULT_STEP_FRACTION = 0.1
# Images per batched step (and per scoring forward): more steps per pass beat bigger batches at equal passes
# (batches of 16 against 32 and 64 with the dominant push: ``benchmarks/bench_uap_vs_art.py``).
DEFAULT_BATCH_SIZE = 16
# Defaults of the papers' code (Hirano et al. 2021: ART max_iter=15, delta=1e-6).
DEFAULT_MAX_PASSES = 15
DEFAULT_GOAL_RATE = 1.0


def _positive_or_none(expected: str, hint: str = "") -> Callable[[Any, str, str], float | None]:
    def check(value: Any, name: str, owner: str) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise param_error(name, owner, expected, value, hint)
        return float(value)

    return check


def _choice(choices: tuple[str, ...], *, optional: bool = False) -> Callable[[Any, str, str], str | None]:
    """A check of one of ``choices`` (``optional``: or None, resolved later)."""
    def check(value: Any, name: str, owner: str) -> str | None:
        if value is None and optional:
            return None
        check_choice(value, name, choices, owner=owner)
        return value

    return check


def _flag(value: Any, name: str, owner: str) -> bool:
    if not isinstance(value, bool):
        raise param_error(name, owner, "True or False", value)
    return value


#: One check per UAP parameter: ``check(value, name, owner) -> canonical value`` (raises ConfigError).
#: Used by :class:`UAPParams` and by ``AuditConfig`` for the fields of the same name.
CHECKS: dict[str, Callable[[Any, str, str], Any]] = {
    "zeta": check_fraction,
    "norm": lambda value, name, owner: resolve_norm(value, owner=owner),
    "xi": _positive_or_none("a positive float (the budget in [0, 1] pixel units) or None",
                            " Compute it with budget_xi(train_images, zeta, norm)."),
    "targeted": lambda value, name, owner: check_target(value, owner),
    "algorithm": _choice(ALGORITHMS),
    "channels": _choice(CHANNEL_MODES),
    "step_size": _positive_or_none("a positive float (pixel units on the [0, 1] scale) or None"),
    "step_fraction": check_fraction,
    "step_eps": _positive_or_none("a positive float (the FGSM eps on the [0, 1] pixel scale) or None",
                                  " A paper's eps on a [-1, 1] scale is eps·128/255 here."),
    "step_norm": lambda value, name, owner: None if value is None else resolve_norm(value, owner=owner),
    "step_decay": check_fraction,
    "step_scale": _choice(STEP_SCALES, optional=True),
    "push": _choice(PUSHES, optional=True),
    "max_passes": check_positive_int,
    "goal_rate": check_fraction,
    "batch_size": check_positive_int,
    "exact_rates": _flag,
    "clip": _choice(CLIPS),
    "return_v": _choice(RETURNS),
}


#: Knobs whose default depends on the algorithm, each with what the per-image loop does instead: a value
#: other than the reference loop's default applies to the batched algorithm only.
_BATCHED_ONLY = {
    "step_scale": (DEFAULT_STEP_SCALE, "takes one step per image"),
    "push": (DEFAULT_PUSH, "steps away from each image's label (ART's FGSM)"),
}


def resolve_for_algorithm(name: str, value: str | None, algorithm: str, owner: str) -> str:
    """``value``, or the algorithm's default for None (:data:`DEFAULT_STEP_SCALE`, :data:`DEFAULT_PUSH`);
    a value the per-image loop cannot take is refused outside the batched algorithm."""
    defaults, instead = _BATCHED_ONLY[name]
    value = defaults[algorithm] if value is None else value
    if algorithm != "batched" and value != defaults["reference"]:
        raise ConfigError(f"The {name!r} parameter of {owner} is {value!r}, which applies to the batched algorithm "
                          f"only; the {algorithm!r} algorithm {instead}: use {name}={defaults['reference']!r}.")
    return value


def check_knobs(values: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """The canonical values of UAP knobs (``values`` holds ``norm``, ``algorithm``, ``step_norm``,
    ``step_scale``, ``push`` and any other :data:`CHECKS` names): each checked by its table entry, the step
    scale and the push resolved for the algorithm, then the checks across knobs. The one validation of
    :class:`UAPParams` and of ``AuditConfig``'s fields of the same names."""
    out = {name: CHECKS[name](value, name, owner) for name, value in values.items()}
    for name in _BATCHED_ONLY:
        out[name] = resolve_for_algorithm(name, out[name], out["algorithm"], owner)
    check_step_norm(out["step_norm"], out["norm"], owner, values["step_norm"])
    return out


def check_step_norm(step_norm: str | None, norm: str, owner: str, raw: Any = None) -> None:
    """L2 steps under an L∞ budget are refused."""
    if step_norm == "2" and norm == "inf":
        raise param_error("step_norm", owner, "None or 'inf' under an L-infinity budget",
                          step_norm if raw is None else raw,
                          " L2 steps under an L-infinity budget are not supported.")


@dataclass(frozen=True)
class UAPParams:
    """How one UAP is computed, in [0, 1] pixel units; validated when built (``owner`` names the caller
    in the messages), never again on its way to the loop.

    Attributes:
        zeta: budget as a fraction of the mean Lp norm of the images that set ξ, in (0, 1].
        norm: ``"2"`` or ``"inf"`` (2, ``"l2"``, ``float("inf")`` are read as these).
        xi: the absolute budget; None: ζ·mean‖images‖ₚ of the images the UAP is computed from. The
            audit passes ζ·mean‖x_train‖ₚ (Minagi et al.: natural-image UAPs get the training images' budget).
        targeted: None (non-targeted) or the target class index.
        algorithm: ``batched`` (default) or ``reference`` (the papers'/ART's per-image loop).
        channels: ``rgb``, or ``grey`` to keep v in the grey subspace (R = G = B).
        step_size: one FGSM step's length in the budget's norm; None: ``step_fraction``·ξ.
        step_fraction: the step as a fraction of ξ when ``step_size`` and ``step_eps`` are None, in (0, 1].
        step_eps: the absolute FGSM eps as ART's (the size in the step's own norm: for sign steps each
            pixel moves by ``step_eps``), [0, 1] scale; overrides ``step_size``.
        step_norm: the norm of the step: ``"inf"`` for sign steps (ART's FGSM default, which the papers'
            code used under L2 budgets too: L∞ size step/√(C·H·W) under an L2 budget); None is the
            budget's norm (resolved on construction).
        step_decay: the step is multiplied by this after every pass, in (0, 1].
        step_scale: ``fixed`` (every step has the step size), ``sqrt_batch`` or ``batch`` (batched only: a
            batch's step is √n or n × the step size for its n images still to fool); None (default): the
            algorithm's (:data:`DEFAULT_STEP_SCALE`: ``sqrt_batch`` batched, ``fixed`` reference).
        push: non-targeted steps: ``away`` from each image's clean label (ART's FGSM) or ``dominant`` (batched
            only: towards the class v already sends most fooled images to); None (default): the algorithm's
            (:data:`DEFAULT_PUSH`: ``dominant`` batched, ``away`` reference). Targeted UAPs step towards the target.
        max_passes: maximum passes over the source images.
        goal_rate: stop once the exactly scored source fooling rate (targeted: success) reaches this.
        batch_size: images per gradient step (batched) and per scoring forward.
        exact_rates: batched only: score v exactly after every pass (as ART), about a quarter more compute.
        clip: ``pixel`` clips x+v to [0, 1] in every forward; ``none`` does not (the papers' code).
        return_v: ``best`` (the v with the best source rate) or ``last`` (ART's and the papers').

    Raises:
        ConfigError: a field is out of range (the message names it and ``owner``).
    """

    zeta: float = 0.04
    norm: str = "2"
    xi: float | None = None
    targeted: int | None = None
    algorithm: str = "batched"
    channels: str = "rgb"
    step_size: float | None = None
    step_fraction: float = DEFAULT_STEP_FRACTION
    step_eps: float | None = None
    step_norm: str | None = None
    step_decay: float = 1.0
    step_scale: str | None = None
    push: str | None = None
    max_passes: int = DEFAULT_MAX_PASSES
    goal_rate: float = DEFAULT_GOAL_RATE
    batch_size: int = DEFAULT_BATCH_SIZE
    exact_rates: bool = False
    clip: str = "pixel"
    return_v: str = "best"
    owner: InitVar[str] = "UAPParams"

    def __post_init__(self, owner: str) -> None:
        for name, value in check_knobs({name: getattr(self, name) for name in CHECKS}, owner).items():
            object.__setattr__(self, name, value)
        if self.step_norm is None:
            object.__setattr__(self, "step_norm", self.norm)

    @classmethod
    def create(cls, owner: str, params: UAPParams | None = None, knobs: Mapping[str, Any] | None = None) -> UAPParams:
        """``params`` as given, or one built from keyword values ``knobs`` (unknown names refused with
        the closest match); not both."""
        knobs = dict(knobs or {})
        if params is not None:
            if knobs:
                raise ConfigError(f"{owner} takes a UAPParams or its fields as keywords, not both; got params and "
                                  f"{', '.join(sorted(knobs))}. Use params.derive(...) or dataclasses.replace.")
            if not isinstance(params, cls):
                raise param_error("params", owner, "a UAPParams or None", params)
            return params
        names = [f.name for f in fields(cls)]
        for key in knobs:
            if key not in names:
                raise ConfigError(f"Unknown parameter {key!r} of {owner}.{did_you_mean(key, names)} "
                                  f"Available: {', '.join(names)}.")
        return cls(**knobs, owner=owner)

    @classmethod
    def from_checked(cls, **values: Any) -> UAPParams:
        """A UAPParams of values already checked by :data:`CHECKS` (a config's), not checked again; the
        fields not given keep their defaults."""
        out = object.__new__(cls)
        for f in fields(cls):
            object.__setattr__(out, f.name, values.pop(f.name, f.default))
        if values:
            raise AttributeError(f"UAPParams has no field {sorted(values)[0]!r}")
        for name in _BATCHED_ONLY:  # the algorithm's defaults filled in
            object.__setattr__(out, name, resolve_for_algorithm(name, getattr(out, name), out.algorithm, "UAPParams"))
        return out

    def derive(self, **values: Any) -> UAPParams:
        """A copy with ``values`` set as they are, unchecked: for values derived from checked ones
        (ξ from ζ, a target from the checked list, the resolved channels)."""
        out = copy.copy(self)
        for name, value in values.items():
            if name not in CHECKS:
                raise AttributeError(f"UAPParams has no field {name!r}")
            object.__setattr__(out, name, value)
        return out

    def step_for(self, xi: float, numel: int = 1) -> float:
        """The first pass's step length in the budget's norm, [0, 1] pixel units (``numel``: C·H·W)."""
        if self.step_eps is not None:
            return self.step_eps * math.sqrt(numel) if (self.step_norm == "inf" and self.norm == "2") else self.step_eps
        return self.step_size if self.step_size is not None else self.step_fraction * xi

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
