"""Universal adversarial perturbations (UAPs) and their random controls.

A UAP is one input-agnostic perturbation v, ‖v‖ₚ ≤ ξ, that changes a classifier's prediction on many
images (Moosavi-Dezfooli et al. 2017); the medical-imaging papers this audit follows (Hirano et al.
2021, Minagi et al. 2022) compute it with ART's ``UniversalPerturbation`` and an FGSM inner step.
:func:`compute_uap` runs that loop on a :class:`UAPParams`: ``reference`` is the papers' per-image
loop, ``batched`` (default) one step per mini-batch. How they differ, and from the papers' code, is in
the README ("DEFT and the UAP audit").
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from medtune._checks import check_choice
from medtune._tensors import eval_mode, model_device, to_float
from medtune.errors import ConfigError, DataError
from medtune.robustness._common import check_images, check_target, lp_norms, num_outputs, resolve_norm
from medtune.robustness._loop import UAPLoop, no_param_grads, project
from medtune.robustness._registry import register_attack
from medtune.robustness.params import (
    ALGORITHMS,
    CHANNEL_MODES,
    DEFAULT_GOAL_RATE,
    RANDOM_LINF,
    STEP_SCALES,
    UAPParams,
)

__all__ = [
    "ALGORITHMS",
    "STEP_SCALES",
    "UAPAttack",
    "UAPParams",
    "UAPResult",
    "apply_perturbation",
    "budget_xi",
    "compute_targeted_uaps",
    "compute_uap",
    "is_grey",
    "perturbation_norm",
    "project_perturbation",
    "project_to_grey",
    "random_control",
]


@dataclass
class UAPResult:
    """A universal perturbation and how it was found.

    Attributes:
        perturbation: float32 tensor (3, H, W) on CPU, in [0, 1] pixel units; ‖v‖ₚ ≤ xi. The best
            v seen, or the last with ``return_v="last"``.
        zeta: budget as a fraction of the mean Lp norm of the images that set ξ.
        xi: absolute budget ξ in [0, 1] pixel units.
        norm: "2" or "inf".
        targeted: target class index, or None for a non-targeted UAP.
        algorithm: "batched" or "reference".
        channels: "rgb" or "grey" (v has R = G = B exactly).
        fooling_rate_source: per pass, the fooling rate on the source images (targeted: the share
            predicted as the target); exact where ``source_rate_exact`` says so, otherwise counted
            from the pass's own forwards (batched).
        source_rate_exact: per pass, whether its rate is an exact scoring of the end-of-pass v.
        best_rate: exact source rate of the returned v.
        best_pass: the pass (1-based) whose end-of-pass v is returned; 0 for the initial v.
        last_rate: exact source rate of the last v (returned v is never worse).
        num_passes: passes over the source images actually made.
        num_updates: steps applied to v (batched: batches with an image to fool; reference: kept steps).
        seconds: wall time of the computation.
        step_size: the FGSM step's length in the budget's norm, [0, 1] pixel units (first pass).
        step_eps: the absolute FGSM eps when one was given (ART's eps on the [0, 1] scale), else None.
        clip: "pixel" (x+v clipped to [0, 1] in every forward) or "none" (the papers' code).
        return_v: "best" or "last": which v ``perturbation`` is.
        step_norm: the norm of the FGSM step: "2" or "inf" (sign steps).
        step_decay: factor applied to the step after every pass.
        step_scale: "fixed", "sqrt_batch" or "batch" (batched steps × 1, √n or n for n images stepped for).
        push: "away" (from each image's label) or "dominant" (towards the class v sends most fooled images to).
        goal_rate: the source rate at which the loop stops early.
        num_source_images: number of images the UAP was computed from.
        goal_reached: whether the loop stopped because ``goal_rate`` was reached (exactly scored).
        last_perturbation: the v of the last pass (what ART returns), float32 (3, H, W) on CPU.
    """

    perturbation: torch.Tensor
    zeta: float
    xi: float
    norm: str
    targeted: int | None
    algorithm: str = "batched"
    channels: str = "rgb"
    fooling_rate_source: list[float] = field(default_factory=list)
    source_rate_exact: list[bool] = field(default_factory=list)
    best_rate: float = 0.0
    best_pass: int = 0
    last_rate: float = 0.0
    num_passes: int = 0
    num_updates: int = 0
    seconds: float = 0.0
    step_size: float = 0.0
    step_eps: float | None = None
    clip: str = "pixel"
    return_v: str = "best"
    step_norm: str = "2"
    step_decay: float = 1.0
    step_scale: str = "fixed"
    push: str = "away"
    goal_rate: float = DEFAULT_GOAL_RATE
    num_source_images: int = 0
    goal_reached: bool = False
    last_perturbation: torch.Tensor | None = None

    def to_dict(self) -> dict:
        """JSON-serialisable summary; the perturbations are replaced by the shape and norm of the returned one."""
        out = asdict(self)
        out.pop("last_perturbation")
        v = out.pop("perturbation")
        out["perturbation_shape"] = list(v.shape)
        out["perturbation_norm"] = perturbation_norm(v, self.norm)
        return out


def budget_xi(images: torch.Tensor, zeta: float, norm: object = 2) -> float:
    """Absolute budget ξ = ζ · mean over images of ‖x‖ₚ (flattened, pixels in [0, 1]).

    Args:
        images: uint8 (N, C, H, W) or float in [0, 1], or a ``DiskImages`` (read in batches); the model's
            training images in the audit.
        zeta: fraction in (0, 1].
        norm: 2 or "inf".

    Returns:
        ξ in [0, 1] pixel units.

    Raises:
        ConfigError: zeta not in (0, 1] or unknown norm.
        DataError: images not a 4-d uint8/[0, 1] tensor.
    """
    params = UAPParams(zeta=zeta, norm=norm, owner="budget_xi")
    zeta, norm = params.zeta, params.norm
    images = check_images(images, stream=True)
    return float(zeta * lp_norms(images, norm).mean())


def perturbation_norm(perturbation: torch.Tensor, norm: object) -> float:
    """‖v‖ₚ of the flattened perturbation (float)."""
    norm = resolve_norm(norm, owner="perturbation_norm")
    v = perturbation.detach().double().flatten()
    return float(v.norm() if norm == "2" else v.abs().max())


def project_perturbation(perturbation: torch.Tensor, xi: float, norm: object) -> torch.Tensor:
    """Project v onto the Lp ball of radius ξ (new detached tensor; the batch dimension is not used).

    For L2 the scaled vector is shrunk by a further 1e-6 relative so float32 rounding cannot leave
    it outside the ball; a v already inside is returned unchanged.
    """
    norm = resolve_norm(norm, owner="project_perturbation")
    return project(perturbation.detach(), float(xi), norm).clone()


def project_to_grey(tensor: torch.Tensor) -> torch.Tensor:
    """Orthogonal projection onto the grey subspace: each pixel's channel mean in every channel.

    Args:
        tensor: float (..., C, H, W), a perturbation or images.

    Returns:
        float tensor of the same shape with equal channels.
    """
    # the mean in float64 is exact for equal float32 channels: a grey v is its own projection
    return tensor.double().mean(dim=-3, keepdim=True).float().expand_as(tensor).clone()


def is_grey(images: torch.Tensor) -> bool:
    """Whether every image (N, C, H, W) or perturbation (C, H, W) has equal channels, exactly.

    ``images`` may be a ``DiskImages``: read a chunk at a time, stopping at the first colour image."""
    from medtune.data.diskcache import DiskImages

    if isinstance(images, DiskImages):
        return all(is_grey(torch.from_numpy(chunk)) for chunk in images.chunks())
    first = images.select(-3, 0).unsqueeze(-3)
    return bool((images == first).all())


def apply_perturbation(images: torch.Tensor, perturbation: torch.Tensor) -> torch.Tensor:
    """clip(x + v, 0, 1) as float32 for uint8 (/255) or float [0, 1] images (N, C, H, W)."""
    images = check_images(images)
    x = to_float(images, images.device)
    return (x + perturbation.to(x.device, torch.float32)).clamp_(0.0, 1.0)


def compute_uap(
    model: nn.Module,
    images: torch.Tensor,
    params: UAPParams | None = None,
    *,
    init: torch.Tensor | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    channels_last: bool = True,
    **knobs: object,
) -> UAPResult:
    """Compute a (non-)targeted universal adversarial perturbation.

    Args:
        model: maps float images (N, 3, H, W) in [0, 1] to logits (N, K); normalisation inside.
            Put in eval mode during the call (restored after); its parameters get no gradients.
        images: source images, uint8 (N, 3, H, W) or float in [0, 1], moved batch-wise; or a
            ``DiskImages`` (the decode cache), read a batch at a time.
        params: the :class:`UAPParams`; or give its fields as keywords (``zeta=0.04, norm=2, ...``),
            checked here.
        init: the starting v (C, H, W), e.g. the previous chunk's; projected, scored as pass 0; default 0.
        seed: seeds the order of the source images.
        device: where to run; default the model's device.
        channels_last: NHWC-strided batches (faster); False for a model calling ``.view`` on conv outputs.
        **knobs: the fields of :class:`UAPParams` when ``params`` is None.

    Returns:
        A :class:`UAPResult`; its ``perturbation`` is a float32 CPU tensor (3, H, W).

    Raises:
        ConfigError: a bad parameter (as :class:`UAPParams`) or keyword, a target the model lacks, or
            a model that does not output (N, K) logits.
        DataError: images is not a non-empty 4-d uint8/[0, 1] tensor, or ``init`` does not fit them.

    Example:
        >>> fooled = evaluate_perturbation(model, x, y, compute_uap(model, x_train, zeta=0.04).perturbation)
    """
    params = UAPParams.create("compute_uap", params, knobs)
    images = _check_source(images, init, params.channels)
    dev = model_device(model, device)
    start = time.perf_counter()
    xi = params.xi if params.xi is not None else float(params.zeta * lp_norms(images, params.norm).mean())
    v = torch.zeros((1, *images.shape[1:]), device=dev)
    if init is not None:
        v = project(init.reshape(v.shape).to(dev, torch.float32), xi, params.norm)
    with eval_mode(model), no_param_grads(model):
        target = check_target(params.targeted, "compute_uap", num_classes=num_outputs(model, images, dev))
        loop = UAPLoop(model, images, params, xi=xi, target=target, device=dev, channels_last=channels_last)
        state = loop.run(v, scored_start=init is not None, seed=seed)
    return UAPResult(
        perturbation=(state.v if params.return_v == "last" else state.best_v)[0].detach().cpu(), zeta=params.zeta, xi=xi, norm=params.norm, targeted=target,
        algorithm=params.algorithm, channels=params.channels, fooling_rate_source=state.history,
        source_rate_exact=state.exact, best_rate=state.best_rate, best_pass=state.best_pass,
        last_rate=state.last_rate, num_passes=len(state.history), num_updates=state.num_updates,
        seconds=time.perf_counter() - start, step_size=loop.stepper_step, step_eps=params.step_eps,
        clip=params.clip, return_v=params.return_v, step_norm=params.step_norm,
        step_decay=params.step_decay, step_scale=params.step_scale, push=params.push, goal_rate=params.goal_rate,
        num_source_images=images.shape[0], goal_reached=state.goal_reached,
        last_perturbation=state.v[0].detach().cpu(),
    )


def _check_source(images, init: torch.Tensor | None, channels: str):
    """The checked source images; ``init`` must fit them (and be grey for a grey UAP)."""
    images = check_images(images, stream=True)
    if init is not None and tuple(init.shape) not in (tuple(images.shape[1:]), (1, *images.shape[1:])):
        raise DataError(f"init has shape {tuple(init.shape)} but the images are {tuple(images.shape[1:])}.")
    if channels == "grey" and init is not None and not is_grey(init.reshape(images.shape[1:])):
        raise DataError("init is not grey (R = G = B) but channels='grey'; pass project_to_grey(init).")
    return images


def compute_targeted_uaps(
    model: nn.Module,
    images: torch.Tensor,
    params: UAPParams | None = None,
    *,
    classes: list[int] | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    **knobs: object,
) -> dict[int, UAPResult]:
    """One targeted UAP per class (``targeted="all"``).

    Args:
        model: as in :func:`compute_uap`.
        images: as in :func:`compute_uap`.
        params: as in :func:`compute_uap`, its ``targeted`` None (set here per class).
        classes: target classes; default every output class 0..K-1.
        seed: the UAP for class t uses seed ``seed + t``.
        device: as in :func:`compute_uap`.
        **knobs: the fields of :class:`UAPParams` when ``params`` is None, but ``targeted``.

    Returns:
        {class index: UAPResult}.

    Raises:
        ConfigError: as :func:`compute_uap`; also when a target is given.
    """
    if "targeted" in knobs or (params is not None and params.targeted is not None):
        raise ConfigError(
            "compute_targeted_uaps chooses the targets itself; pass 'classes' instead of 'targeted'."
        )
    params = UAPParams.create("compute_targeted_uaps", params, knobs)
    images = check_images(images, stream=True)
    if classes is None:
        dev = model_device(model, device)
        with eval_mode(model):
            classes = list(range(num_outputs(model, images, dev)))
    return {int(t): compute_uap(model, images, params.derive(targeted=int(t)), seed=seed + int(t), device=device)
            for t in classes}


def random_control(perturbation: torch.Tensor, norm: object, *, seed: int, channels: str = "rgb",
                   linf: str = "uniform") -> torch.Tensor:
    """A random perturbation of the UAP's size, the papers' random control.

    L2: a uniformly random direction (a normalised Gaussian vector) scaled to ‖v‖₂, so ‖r‖₂ = ‖v‖₂.
    L∞: uniform in the cube [-‖v‖∞, ‖v‖∞]^d, as ART's ``random_sphere`` that the papers' code draws
    from (so ‖r‖∞ ≤ ‖v‖∞); ``linf="corners"`` draws a random corner (±‖v‖∞ everywhere) instead,
    which matches the L2 norm of an FGSM-type UAP that sits mostly at ±ξ. With ``channels="grey"``
    the draw is one channel repeated over the three (R = G = B).

    Args:
        perturbation: the UAP, float tensor (C, H, W) in pixel units.
        norm: 2 or "inf".
        seed: seeds a CPU torch.Generator.
        channels: "rgb" or "grey".
        linf: "uniform" or "corners" (L∞ only).

    Returns:
        float32 CPU tensor, same shape as ``perturbation``.

    Raises:
        ConfigError: unknown norm, channels or linf.
    """
    owner = "random_control"
    norm = resolve_norm(norm, owner=owner)
    check_choice(channels, "channels", CHANNEL_MODES, owner=owner)
    check_choice(linf, "linf", RANDOM_LINF, owner=owner)
    generator = torch.Generator().manual_seed(int(seed))
    shape = tuple(perturbation.shape)
    draw_shape = (1, *shape[1:]) if channels == "grey" else shape
    size = perturbation_norm(perturbation, norm)
    if norm == "2":
        r = torch.randn(draw_shape, generator=generator, dtype=torch.float64).expand(shape)
        length = float(r.norm())
        return (r * (size / length if length > 0 else 0.0)).float().contiguous()
    if linf == "corners":
        r = torch.randint(0, 2, draw_shape, generator=generator, dtype=torch.int64).double() * 2.0 - 1.0
    else:
        r = torch.rand(draw_shape, generator=generator, dtype=torch.float64) * 2.0 - 1.0
    return (r.expand(shape) * size).float().contiguous()


@register_attack("uap")
class UAPAttack:
    """The UAP as a registered attack: ``attack(model, images, labels) -> clip(images + v)``.

    Threat model: one input-agnostic perturbation v with ‖v‖ₚ ≤ ξ, added to every image in [0, 1]
    pixel space (grey tasks: v has R = G = B). ξ = ``params.xi`` when given (the audit passes
    ζ·mean‖x_train‖ₚ), else ζ·mean‖x‖ₚ over the images v is computed from. Calling the attack computes
    v on the given images (labels are not used: fooling is measured against the clean prediction)
    and stores it in ``perturbation_`` and the full :class:`UAPResult` in ``result_``.

    Args:
        params: the :class:`UAPParams`; or give its fields as keywords, checked on construction.
        seed: seeds the order of the source images.
        device: where to run; default the model's device.
        **knobs: the fields of :class:`UAPParams` when ``params`` is None.

    Raises:
        ConfigError: a parameter is out of range, or an unknown keyword.
    """

    name: str
    threat_model = "universal"
    params_type = UAPParams

    def __init__(self, params: UAPParams | None = None, *, seed: int = 0,
                 device: str | torch.device | None = None, **knobs: object) -> None:
        self.params = UAPParams.create("UAPAttack", params, knobs)
        self.seed = seed
        self.device = device

    def compute(self, model: nn.Module, images: torch.Tensor, *, init: torch.Tensor | None = None,
                seed: int | None = None) -> UAPResult:
        """Compute v on ``images`` (see :func:`compute_uap`); also kept in ``result_`` and ``perturbation_``.

        ``init`` starts from a given v (a streamed source's previous chunk); ``seed`` overrides the
        attack's seed for this call.
        """
        self.result_ = compute_uap(model, images, self.params, init=init, seed=self.seed if seed is None else seed,
                                   device=self.device)
        self.perturbation_ = self.result_.perturbation
        return self.result_

    def __call__(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Compute v on ``images`` and return clip(images + v, 0, 1), float32 (N, 3, H, W)."""
        return apply_perturbation(images, self.compute(model, images).perturbation)
