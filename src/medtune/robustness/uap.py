"""Universal adversarial perturbations (UAPs) and their random controls.

The algorithm is the universal-perturbation loop of Moosavi-Dezfooli et al. (2017, arXiv:1610.08401)
with an FGSM-type inner step, as used by Hirano & Takemoto (2020) and Hirano, Minagi & Takemoto
(2021, BMC Med Imaging) on top of IBM ART's ``UniversalPerturbation(attacker="fgsm")``.

Relation to the per-image original (ART). ART visits the source images one at a time; for an image
where x+v still has its clean prediction (targeted: is not yet the target) it takes one FGSM step
from x+v, keeps it only if that image's label changes, sets v to the clipped adversarial image minus
x, and projects v onto the ξ-ball; after each pass it scores v on all source images. Every call runs
at batch size 1. Here a pass visits the same images in seeded, shuffled mini-batches and takes *one*
FGSM step per batch, along the mean loss gradient of the batch's images not yet fooled, and always
keeps it (mini-batch instead of per-sample updates, as SGD relates to per-sample steps); projection,
clipping of x+v to [0, 1] and the stopping rule are the same. Consequences: at equal passes this
loop makes N/batch_size updates per pass where ART makes up to N, so it needs more passes or a
larger step when N/batch_size is small; on the other hand ART moves only when one step flips one
image, so with small steps (e.g. 0.1·ξ on easy tasks) it may never move at all, where this loop
accumulates small consistent steps. The gradient is taken w.r.t. clip(x+v), straight through the
clip, so a saturated pixel can still move back into range. Batches are fed channels-last and the
mask of not-yet-fooled images costs no extra pass when most images are active (see
``_mean_gradient``); both are exact.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from medtune._checks import check_fraction, check_positive_int, param_error
from medtune._tensors import batches, eval_mode, model_device, to_float
from medtune.errors import ConfigError
from medtune.robustness._common import (
    check_images,
    check_target,
    lp_norms,
    num_outputs,
    predict,
    resolve_norm,
)
from medtune.robustness._registry import register_attack

__all__ = [
    "UAPAttack",
    "UAPResult",
    "compute_uap",
    "compute_targeted_uaps",
    "random_control",
    "project_perturbation",
    "apply_perturbation",
    "perturbation_norm",
    "budget_xi",
]

# Default FGSM step as a fraction of the budget ξ: ten unclipped steps span the ball's radius.
DEFAULT_STEP_FRACTION = 0.1


@dataclass
class UAPResult:
    """A universal perturbation and how it was found.

    Attributes:
        perturbation: float32 tensor (3, H, W) on CPU, in [0, 1] pixel units; ‖v‖ₚ ≤ xi.
        zeta: budget as a fraction of the mean Lp norm of the attack inputs.
        xi: absolute budget ξ = zeta · mean‖x‖ₚ, in [0, 1] pixel units.
        norm: "2" or "inf".
        targeted: target class index, or None for a non-targeted UAP.
        fooling_rate_source: per pass, the fooling rate on the source images (non-targeted) or the
            share of source images predicted as the target (targeted).
        num_passes: passes over the source images actually made.
        seconds: wall time of the computation.
        step_size: the FGSM step size used, in [0, 1] pixel units (Lp norm of one step).
        goal_rate: the source rate at which the loop stops early.
        num_source_images: number of images the UAP was computed from.
        goal_reached: whether the loop stopped because ``goal_rate`` was reached.
    """

    perturbation: torch.Tensor
    zeta: float
    xi: float
    norm: str
    targeted: int | None
    fooling_rate_source: list[float] = field(default_factory=list)
    num_passes: int = 0
    seconds: float = 0.0
    step_size: float = 0.0
    goal_rate: float = 0.8
    num_source_images: int = 0
    goal_reached: bool = False

    def to_dict(self) -> dict:
        """JSON-serialisable summary; the perturbation itself is replaced by its shape and norm."""
        out = asdict(self)
        v = out.pop("perturbation")
        out["perturbation_shape"] = list(v.shape)
        out["perturbation_norm"] = perturbation_norm(v, self.norm)
        return out


def budget_xi(images: torch.Tensor, zeta: float, norm: object = 2) -> float:
    """Absolute budget ξ = ζ · mean over images of ‖x‖ₚ (flattened, pixels in [0, 1]).

    Args:
        images: uint8 (N, C, H, W) or float in [0, 1].
        zeta: fraction in (0, 1].
        norm: 2 or "inf".

    Returns:
        ξ in [0, 1] pixel units.

    Raises:
        ConfigError: zeta not in (0, 1] or unknown norm.
        DataError: images not a 4-d uint8/[0, 1] tensor.
    """
    zeta = check_fraction(zeta, "zeta", "budget_xi")
    norm = resolve_norm(norm, owner="budget_xi")
    images = check_images(images)
    return float(zeta * lp_norms(images, norm).mean())


def perturbation_norm(perturbation: torch.Tensor, norm: object) -> float:
    """‖v‖ₚ of the flattened perturbation (float)."""
    norm = resolve_norm(norm, owner="perturbation_norm")
    v = perturbation.detach().double().flatten()
    return float(v.norm() if norm == "2" else v.abs().max())


def project_perturbation(perturbation: torch.Tensor, xi: float, norm: object) -> torch.Tensor:
    """Project v onto the Lp ball of radius ξ (new detached tensor; the batch dimension is not used).

    For L2 the scaled vector is shrunk by a further 1e-6 relative so float32 rounding cannot leave
    it outside the ball.
    """
    norm = resolve_norm(norm, owner="project_perturbation")
    perturbation = perturbation.detach()
    if norm == "inf":
        return perturbation.clamp(-xi, xi)
    length = float(perturbation.double().norm())
    if length <= xi:
        return perturbation.clone()
    return perturbation * (xi / length * (1.0 - 1e-6))


def apply_perturbation(images: torch.Tensor, perturbation: torch.Tensor) -> torch.Tensor:
    """clip(x + v, 0, 1) as float32 for uint8 (/255) or float [0, 1] images (N, C, H, W)."""
    images = check_images(images)
    x = to_float(images, images.device)
    return (x + perturbation.to(x.device, torch.float32)).clamp_(0.0, 1.0)


def _fgsm_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "inf":
        return grad.sign()
    length = grad.norm()
    return grad / length if length > 0 else torch.zeros_like(grad)


def _mean_gradient(
    model: nn.Module,
    x: torch.Tensor,
    v: torch.Tensor,
    labels: torch.Tensor | None,
    target: int | None,
    *,
    channels_last: bool,
    whole_batch: bool,
) -> tuple[torch.Tensor | None, float]:
    """Gradient (1, C, H, W) of the mean cross-entropy over the images of the batch not yet fooled.

    Non-targeted (``labels`` = clean predictions): the loss of the clean prediction over the images
    still predicted as clean. Targeted: the loss of ``target`` over the images not predicted as
    ``target``. Returns (None, 0.0) when every image is fooled, plus the share of active images.

    Two exact ways to get it: with ``whole_batch`` one forward/backward pass over the batch whose
    logits also give the mask (cheaper when most images are active); otherwise a gradient-free
    forward pass for the mask, then forward/backward over the active images only.
    """

    def prepare(batch: torch.Tensor) -> torch.Tensor:
        batch = (batch + v).clamp(0.0, 1.0)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch.requires_grad_(True)

    def is_active(pred: torch.Tensor) -> torch.Tensor:
        return pred == labels if target is None else pred != target

    if whole_batch:
        x_in = prepare(x)
        logits = model(x_in)
        active = is_active(logits.detach().argmax(dim=1))
        logits = logits[active]
    else:
        with torch.inference_mode():
            active = is_active(model((x + v).clamp(0.0, 1.0)).argmax(dim=1))
        active = active.clone()  # a normal tensor again, usable outside inference mode
        if bool(active.any()):
            x_in = prepare(x[active])
            logits = model(x_in)
    share = float(active.float().mean())
    if share == 0.0:
        return None, 0.0
    y = (
        labels[active]
        if target is None
        else torch.full((logits.shape[0],), target, device=x.device)
    )
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y), x_in)
    return grad.sum(dim=0, keepdim=True), share


def _check_step_size(step_size: object, owner: str) -> float | None:
    if step_size is None:
        return None
    if (isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not math.isfinite(step_size)
            or step_size <= 0):
        raise param_error("step_size", owner, "a positive float (pixel units on the [0, 1] scale) or None",
                          step_size)
    return float(step_size)


def compute_uap(
    model: nn.Module,
    images: torch.Tensor,
    *,
    zeta: float = 0.04,
    norm: object = 2,
    targeted: int | None = None,
    step_size: float | None = None,
    max_passes: int = 10,
    goal_rate: float = 0.8,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
    channels_last: bool = True,
) -> UAPResult:
    """Compute a (non-)targeted universal adversarial perturbation.

    See the module docstring for the algorithm and how this batched loop relates to ART's.

    Args:
        model: maps float images (N, 3, H, W) in [0, 1] to logits (N, K); normalisation inside.
            Put in eval mode during the call (restored after); its parameters get no gradients.
        images: source images, uint8 (N, 3, H, W) or float in [0, 1]; stay on their device and are
            moved batch-wise.
        zeta: budget as a fraction of the mean Lp norm of ``images``, in (0, 1].
        norm: 2 or "inf" (also "2", float("inf")).
        targeted: None (non-targeted) or the target class index.
        step_size: Lp norm of one FGSM step in [0, 1] pixel units; default 0.1 · ξ.
        max_passes: maximum passes over the source images.
        goal_rate: stop once the fooling rate (targeted: success rate) on the source reaches this.
        batch_size: images per gradient step.
        seed: seeds the shuffling of the source images.
        device: where to run; default the model's device.
        channels_last: feed the model NHWC-strided batches (about 2× faster convolutions on CPU
            and GPU); set False for a model that calls ``.view`` on conv outputs.

    Returns:
        A :class:`UAPResult` whose ``perturbation`` is a float32 CPU tensor (3, H, W).

    Raises:
        ConfigError: a parameter is out of range (zeta, norm, targeted, step_size, max_passes,
            goal_rate, batch_size) or the model does not output (N, K) logits.
        DataError: images is not a non-empty 4-d uint8/[0, 1] tensor.

    Example:
        >>> result = compute_uap(model, train_images, zeta=0.04, norm=2)
        >>> fooled = evaluate_perturbation(model, test_x, test_y, result.perturbation)
    """
    owner = "compute_uap"
    zeta = check_fraction(zeta, "zeta", owner)
    norm = resolve_norm(norm, owner=owner)
    max_passes = check_positive_int(max_passes, "max_passes", owner)
    batch_size = check_positive_int(batch_size, "batch_size", owner)
    goal_rate = check_fraction(goal_rate, "goal_rate", owner)
    step_size = _check_step_size(step_size, owner)
    images = check_images(images)
    dev = model_device(model, device)
    start = time.perf_counter()
    xi = float(zeta * lp_norms(images, norm).mean())
    step = step_size if step_size is not None else DEFAULT_STEP_FRACTION * xi
    num = images.shape[0]
    generator = torch.Generator().manual_seed(int(seed))
    v = torch.zeros((1, *images.shape[1:]), device=dev)
    history: list[float] = []
    goal_reached = False
    active_share = 1.0

    with eval_mode(model):
        target = check_target(targeted, owner, num_classes=num_outputs(model, images, dev))
        clean = predict(
            model, images, batch_size=batch_size, device=dev, channels_last=channels_last
        )
        for _ in range(max_passes):
            order = torch.randperm(num, generator=generator)
            for sl in batches(num, batch_size):
                idx = order[sl]
                x = to_float(images[idx], dev, channels_last=channels_last)
                labels = clean[idx].to(dev) if target is None else None
                grad, active_share = _mean_gradient(
                    model,
                    x,
                    v,
                    labels,
                    target,
                    channels_last=channels_last,
                    whole_batch=active_share > 0.5,
                )
                if grad is not None:
                    # non-targeted: ascend the loss of the clean prediction; targeted: descend
                    sign = 1.0 if target is None else -1.0
                    v = project_perturbation(
                        v + sign * step * _fgsm_direction(grad, norm), xi, norm
                    )
            perturbed = predict(
                model,
                images,
                perturbation=v,
                batch_size=batch_size,
                device=dev,
                channels_last=channels_last,
            )
            rate = (perturbed != clean) if target is None else (perturbed == target)
            history.append(float(rate.double().mean()))
            if history[-1] >= goal_rate:
                goal_reached = True
                break

    return UAPResult(
        perturbation=v[0].detach().cpu(),
        zeta=zeta,
        xi=xi,
        norm=norm,
        targeted=target,
        fooling_rate_source=history,
        num_passes=len(history),
        seconds=time.perf_counter() - start,
        step_size=step,
        goal_rate=goal_rate,
        num_source_images=num,
        goal_reached=goal_reached,
    )


def compute_targeted_uaps(
    model: nn.Module,
    images: torch.Tensor,
    *,
    classes: list[int] | None = None,
    seed: int = 0,
    **params: object,
) -> dict[int, UAPResult]:
    """One targeted UAP per class (``targeted="all"``).

    Args:
        model: as in :func:`compute_uap`.
        images: as in :func:`compute_uap`.
        classes: target classes; default every output class 0..K-1.
        seed: the UAP for class t uses seed ``seed + t``.
        **params: the other keyword arguments of :func:`compute_uap` (zeta, norm, step_size, ...).

    Returns:
        {class index: UAPResult}.

    Raises:
        ConfigError: as :func:`compute_uap`; also when ``params`` holds 'targeted'.
    """
    if "targeted" in params:
        raise ConfigError(
            "compute_targeted_uaps chooses the targets itself; pass 'classes' instead of 'targeted'."
        )
    images = check_images(images)
    if classes is None:
        dev = model_device(model, params.get("device"))  # type: ignore[arg-type]
        with eval_mode(model):
            classes = list(range(num_outputs(model, images, dev)))
    return {
        int(t): compute_uap(model, images, targeted=int(t), seed=seed + int(t), **params)  # type: ignore[arg-type]
        for t in classes
    }


def random_control(perturbation: torch.Tensor, norm: object, *, seed: int) -> torch.Tensor:
    """A random perturbation with the same Lp norm as ``perturbation``.

    L2: a Gaussian vector normalised to unit length (a uniform direction on the sphere) scaled to
    ‖v‖₂. L∞: a uniformly random sign vector scaled to ‖v‖∞, i.e. a random corner of the same
    L∞ ball. FGSM-type UAPs under an L∞ budget sit mostly at the corners (±ξ), so this control also
    has about the UAP's L2 norm, unlike a uniform draw inside the box.

    Args:
        perturbation: the UAP, float tensor (C, H, W) in pixel units.
        norm: 2 or "inf".
        seed: seeds a CPU torch.Generator.

    Returns:
        float32 CPU tensor, same shape, ‖r‖ₚ == ‖v‖ₚ (to float32 rounding).

    Raises:
        ConfigError: unknown norm.
    """
    norm = resolve_norm(norm, owner="random_control")
    generator = torch.Generator().manual_seed(int(seed))
    shape = tuple(perturbation.shape)
    size = perturbation_norm(perturbation, norm)
    if norm == "2":
        r = torch.randn(shape, generator=generator, dtype=torch.float64)
        return (r * (size / float(r.norm()))).float()
    r = torch.randint(0, 2, shape, generator=generator, dtype=torch.int64).double() * 2.0 - 1.0
    return (r * size).float()


@register_attack("uap")
class UAPAttack:
    """The UAP as a registered attack: ``attack(model, images, labels) -> clip(images + v)``.

    Threat model: one input-agnostic perturbation v with ‖v‖ₚ ≤ ξ = zeta · mean‖x‖ₚ over the images
    it is computed from, added to every image in [0, 1] pixel space. Calling the attack computes v
    on the given images (labels are not used: fooling is measured against the clean prediction)
    and stores it in ``perturbation_`` and the full :class:`UAPResult` in ``result_``.

    Args: the keyword arguments of :func:`compute_uap` but ``channels_last``, validated on
    construction.

    Raises:
        ConfigError: a parameter is out of range.
    """

    name: str
    threat_model = "universal"

    def __init__(
        self,
        *,
        zeta: float = 0.04,
        norm: object = 2,
        targeted: int | None = None,
        step_size: float | None = None,
        max_passes: int = 10,
        goal_rate: float = 0.8,
        batch_size: int = 64,
        seed: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        owner = "UAPAttack"
        self.zeta = check_fraction(zeta, "zeta", owner)
        self.norm = resolve_norm(norm, owner=owner)
        self.targeted = check_target(targeted, owner)
        self.step_size = _check_step_size(step_size, owner)
        self.max_passes = check_positive_int(max_passes, "max_passes", owner)
        self.goal_rate = check_fraction(goal_rate, "goal_rate", owner)
        self.batch_size = check_positive_int(batch_size, "batch_size", owner)
        self.seed = seed
        self.device = device

    def compute(self, model: nn.Module, images: torch.Tensor) -> UAPResult:
        """Compute v on ``images`` (see :func:`compute_uap`); also kept in ``result_`` and ``perturbation_``."""
        self.result_ = compute_uap(
            model,
            images,
            zeta=self.zeta,
            norm=self.norm,
            targeted=self.targeted,
            step_size=self.step_size,
            max_passes=self.max_passes,
            goal_rate=self.goal_rate,
            batch_size=self.batch_size,
            seed=self.seed,
            device=self.device,
        )
        self.perturbation_ = self.result_.perturbation
        return self.result_

    def __call__(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Compute v on ``images`` and return clip(images + v, 0, 1), float32 (N, 3, H, W)."""
        return apply_perturbation(images, self.compute(model, images).perturbation)
