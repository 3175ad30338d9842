"""Universal adversarial perturbations (UAPs) and their random controls.

The algorithm is the universal-perturbation loop of Moosavi-Dezfooli et al. (2017, arXiv:1610.08401)
with an FGSM-type inner step, as used by Hirano & Takemoto (2020), Hirano, Minagi & Takemoto (2021,
BMC Med Imaging) and Minagi et al. (2022) through IBM ART's ``UniversalPerturbation(attacker="fgsm")``.
Two algorithms, named in every result (``algorithm``):

``reference`` — the per-image loop of the papers' code (ART), in plain torch. Each pass visits the
source images one at a time in a seeded random order (``random.Random(seed).sample``, the order ART
draws after ``random.seed(seed)``); where x+v still has its clean prediction (targeted: is not yet
the target) it takes one FGSM step from x+v, keeps it only if that flips the image
(targeted: reaches the target), sets v to the clipped adversarial image minus x (the re-clip) and
projects v onto the ξ-ball. Each pass ends with an exact scoring of v on all source images of
clip(x+v, 0, 1). As in ART, the accept test and the FGSM step use x+v unclipped, and a
gradient whose float32 squares underflow (a saturated softmax) gives no step: on the same model,
images and seed the per-pass trajectory is ART's (tested), only the returned v differs (the best,
where ART returns the last; ``last_perturbation`` holds that one).

``batched`` (default) — the same loop over seeded, shuffled mini-batches: *one* FGSM step per batch
along the summed loss gradient of the batch's images not yet fooled, always kept (mini-batch instead
of per-sample updates, as SGD relates to per-sample steps); projection and clipping as above. It
makes N/batch_size updates per pass where the reference makes up to N, so at equal passes it may
need a larger step (``step_scale="sqrt_batch"`` lengthens each batched step by √(images in the
batch still to fool), the length of that many per-image steps added in independent directions; the
default ``fixed`` keeps the step size); in exchange the reference moves only when one step flips one image. The
gradient is taken w.r.t. clip(x+v), straight through the clip. No end-of-pass evaluation: a pass's
source rate is counted from the forwards it already made (each image under the v it met); v is
scored exactly only when that count is within ``CHECK_MARGIN`` of the goal (or with
``exact_rates=True``). No per-step host synchronisation (masks, counts and the projection stay on
the device); on CPU, once most images are fooled, a gradient-free forward picks the images still to
fool so the backward pass skips the others (exact either way).

Both keep the best v seen (by the source rate) and return it, not the last: with a fixed step the
loop can overshoot and the fooling rate fall again over later passes. ``step_decay`` shrinks the step
after every pass. Grey tasks: ``channels="grey"`` keeps v in the grey subspace (R = G = B exactly),
so it is the perturbation of the 1-channel image the papers' models receive.

Parameters of the papers' code (Hirano et al. 2021): ``max_iter=15`` passes, ``delta=1e-6`` (goal
fooling rate 1 − 10⁻⁶, i.e. 1.0), FGSM ``eps=0.0024`` on their [-1, 1] pixel scale (0.0012 on the
[0, 1] scale) with ART's default FGSM norm L∞ — sign steps under L2 budgets too (``step_norm="inf"``);
ξ = ζ·mean‖x_train‖ₚ. The defaults here are the goal and the passes; the step is set relative to ξ
(``step_size``, default 0.1·ξ) so it scales with the image size.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from medtune._checks import check_choice, check_fraction, check_positive_int, param_error
from medtune._tensors import batches, eval_mode, model_device, to_float
from medtune.errors import ConfigError, DataError
from medtune.progress import progress_bar
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
    "ALGORITHMS",
    "STEP_SCALES",
    "UAPAttack",
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

#: The UAP algorithms, default first.
ALGORITHMS = ("batched", "reference")
#: How long a batched step is: the step size (the papers'), or the step size × √(images the step is
#: taken for) — as long as the sum of that many per-image steps in independent directions.
STEP_SCALES = ("fixed", "sqrt_batch")
#: Perturbation spaces of :func:`compute_uap`: colour, or grey (R = G = B).
CHANNEL_MODES = ("rgb", "grey")
#: Random controls under an L∞ budget: uniform in the cube (as the papers' code), or its corners.
RANDOM_LINF = ("uniform", "corners")

# Default FGSM step as a fraction of the budget ξ: ten unclipped steps span the ball's radius.
DEFAULT_STEP_FRACTION = 0.1
# Defaults of the papers' code (Hirano et al. 2021: ART max_iter=15, delta=1e-6).
DEFAULT_MAX_PASSES = 15
DEFAULT_GOAL_RATE = 1.0
# A batched pass is scored exactly once the count from its own forwards is this close to the goal.
CHECK_MARGIN = 0.05


@dataclass
class UAPResult:
    """A universal perturbation and how it was found.

    Attributes:
        perturbation: float32 tensor (3, H, W) on CPU, in [0, 1] pixel units; ‖v‖ₚ ≤ xi. The best
            v seen, not the last.
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
        step_size: the FGSM step in the budget's norm, [0, 1] pixel units (first pass).
        step_norm: the norm of the FGSM step: "2" or "inf" (sign steps).
        step_decay: factor applied to the step after every pass.
        step_scale: "fixed" or "sqrt_batch" (batched steps × √(images stepped for)).
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
    step_norm: str = "2"
    step_decay: float = 1.0
    step_scale: str = "fixed"
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
    zeta = check_fraction(zeta, "zeta", "budget_xi")
    norm = resolve_norm(norm, owner="budget_xi")
    images = check_images(images, stream=True)
    return float(zeta * lp_norms(images, norm).mean())


def perturbation_norm(perturbation: torch.Tensor, norm: object) -> float:
    """‖v‖ₚ of the flattened perturbation (float)."""
    norm = resolve_norm(norm, owner="perturbation_norm")
    v = perturbation.detach().double().flatten()
    return float(v.norm() if norm == "2" else v.abs().max())


def _project(v: torch.Tensor, xi: float, norm: str) -> torch.Tensor:
    """Projection onto the ξ-ball without a host sync (the L2 factor stays a device tensor)."""
    if norm == "inf":
        return v.clamp(-xi, xi)
    length = v.norm()
    return v * torch.where(length > xi, xi / (length + 1e-7), torch.ones_like(length))


def project_perturbation(perturbation: torch.Tensor, xi: float, norm: object) -> torch.Tensor:
    """Project v onto the Lp ball of radius ξ (new detached tensor; the batch dimension is not used).

    For L2 the scaled vector is shrunk by a further 1e-6 relative so float32 rounding cannot leave
    it outside the ball; a v already inside is returned unchanged.
    """
    norm = resolve_norm(norm, owner="project_perturbation")
    return _project(perturbation.detach(), float(xi), norm).clone()


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


class _Stepper:
    """One FGSM step of v along a gradient: direction, size, grey subspace, projection."""

    def __init__(self, *, norm: str, step_norm: str, step: float, xi: float, grey: bool, numel: int,
                 targeted: bool) -> None:
        self.norm, self.step_norm, self.xi, self.grey = norm, step_norm, xi, grey
        self.sign = -1.0 if targeted else 1.0  # targeted: descend the target's loss
        self.numel = numel
        self.set_step(step)

    def set_step(self, step: float) -> None:
        # sign steps under an L2 budget: L∞ size step/√d, so the step's L2 length is ``step``
        self.step = step
        self.elementwise = step / math.sqrt(self.numel) if (self.step_norm == "inf" and self.norm == "2") else step

    def direction(self, grad: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        if self.grey:
            grad = grad.mean(dim=1, keepdim=True).expand_as(grad)
        if self.step_norm == "inf":
            return (self.elementwise * scale) * grad.sign()
        # ART's float32 normalisation: a gradient whose squares underflow (a saturated softmax) is
        # zero, not a unit direction, so such an image is not stepped
        length = grad.square().sum().sqrt()
        return torch.where(length > 0, self.step * scale / length.clamp_min(1e-38), torch.zeros_like(length)) * grad

    def __call__(self, v: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        """v one step along ``grad`` (``scale`` × the step size), projected onto the ξ-ball."""
        return _project(v + self.sign * self.direction(grad, scale), self.xi, self.norm)


def _source_rate(model, images, v, clean, target, *, batch_size, device, channels_last) -> float:
    perturbed = predict(model, images, perturbation=v, batch_size=batch_size, device=device,
                        channels_last=channels_last)
    hit = (perturbed != clean) if target is None else (perturbed == target)
    return float(hit.double().mean())


def _batched_pass(model, images, order, v, clean_dev, target, stepper, *, batch_size, device, channels_last,
                  mask_first: bool, sqrt_batch: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass of the batched loop; returns (v, number of images met fooled, number of updates).

    ``mask_first`` (CPU, most images fooled): a gradient-free forward finds the images still to
    fool and only those go through forward/backward. Otherwise one forward/backward over the whole
    batch, whose logits also give the mask, with no host sync. ``sqrt_batch``: the step is
    √(images still to fool in the batch) times the step size (a device tensor, no sync).
    """
    from medtune.data.diskcache import DiskImages

    fooled = torch.zeros((), dtype=torch.int64, device=device)
    updates = torch.zeros((), dtype=torch.int64, device=device)

    def is_active(pred: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return (pred == labels) if target is None else (pred != target)

    if isinstance(images, DiskImages):  # read this pass's shuffled batches ahead from the decode cache
        images.prefetch([order[sl] for sl in batches(images.shape[0], batch_size)])
    for sl in batches(images.shape[0], batch_size):
        idx = order[sl]
        x = to_float(images[idx], device, channels_last=channels_last)
        labels = clean_dev[idx.to(device)] if target is None else None
        if mask_first:
            with torch.inference_mode():
                active = is_active(model((x + v).clamp(0.0, 1.0)).argmax(dim=1), labels).clone()
            fooled += (~active).sum()
            if not bool(active.any()):
                continue
            x, labels = x[active], (None if labels is None else labels[active])
        x_in = (x + v).clamp(0.0, 1.0)
        if channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        x_in.requires_grad_(True)
        logits = model(x_in)
        y = labels if target is None else torch.full((x.shape[0],), target, device=device)
        loss = F.cross_entropy(logits, y, reduction="none")
        if mask_first:
            updates += 1
            scale = math.sqrt(x.shape[0]) if sqrt_batch else 1.0
        else:
            active = is_active(logits.detach().argmax(dim=1), labels)
            fooled += (~active).sum()
            updates += active.any()
            loss = loss * active
            scale = active.sum().sqrt() if sqrt_batch else 1.0
        (grad,) = torch.autograd.grad(loss.sum(), x_in)
        v = stepper(v, grad.sum(dim=0, keepdim=True), scale)  # a zero gradient (nothing left to fool) keeps v
    return v, fooled, updates


def _reference_pass(model, images, order, v, clean, target, stepper, *, device) -> tuple[torch.Tensor, int]:
    """One pass of the per-image loop (ART's); returns (v, number of kept steps)."""
    kept = 0
    for i in order:
        x = to_float(images[i:i + 1], device)
        start = x + v
        with torch.inference_mode():
            current = int(model(start).argmax(dim=1))
        if (current != int(clean[i])) if target is None else (current == target):
            continue
        start = start.clone().requires_grad_(True)
        label = int(clean[i]) if target is None else target
        loss = F.cross_entropy(model(start), torch.tensor([label], device=device))
        (grad,) = torch.autograd.grad(loss, start)
        adv = (start.detach() + stepper.sign * stepper.direction(grad)).clamp(0.0, 1.0)
        with torch.inference_mode():
            new = int(model(adv).argmax(dim=1))
        if (new != current) if target is None else (new == target):
            v = _project(adv - x, stepper.xi, stepper.norm)  # the re-clip: v = clip(x+v+step) - x
            kept += 1
    return v, kept


class _no_param_grads:
    """Context manager: the model's parameters need no gradient during the attack (restored after)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._flags: list[tuple[torch.Tensor, bool]] = []

    def __enter__(self) -> None:
        self._flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self._flags:
            p.requires_grad_(False)

    def __exit__(self, *exc: object) -> None:
        for p, flag in self._flags:
            p.requires_grad_(flag)


def _check_step_size(step_size: object, owner: str) -> float | None:
    if step_size is None:
        return None
    if (isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not math.isfinite(step_size)
            or step_size <= 0):
        raise param_error("step_size", owner, "a positive float (pixel units on the [0, 1] scale) or None",
                          step_size)
    return float(step_size)


def _check_xi(xi: object, owner: str) -> float | None:
    if xi is None:
        return None
    if isinstance(xi, bool) or not isinstance(xi, (int, float)) or not math.isfinite(xi) or xi <= 0:
        raise param_error("xi", owner, "a positive float (the budget in [0, 1] pixel units) or None", xi,
                          " Compute it with budget_xi(train_images, zeta, norm).")
    return float(xi)


def _check_step_norm(step_norm: object, norm: str, owner: str) -> str:
    if step_norm is None:
        return norm
    resolved = resolve_norm(step_norm, owner=owner)
    if resolved == "2" and norm == "inf":
        raise param_error("step_norm", owner, "None or 'inf' under an L-infinity budget", step_norm,
                          " L2 steps under an L-infinity budget are not supported.")
    return resolved


def _check_options(owner: str, *, algorithm: str, channels: str, step_decay: object,
                   step_scale: object = "fixed") -> float:
    check_choice(algorithm, "algorithm", ALGORITHMS, owner=owner)
    check_choice(channels, "channels", CHANNEL_MODES, owner=owner)
    check_step_scale(step_scale, algorithm, owner)
    return check_fraction(step_decay, "step_decay", owner)


def check_step_scale(step_scale: object, algorithm: str, owner: str) -> None:
    """``step_scale`` is one of STEP_SCALES, and ``sqrt_batch`` only with the batched algorithm."""
    check_choice(step_scale, "step_scale", STEP_SCALES, owner=owner)
    if step_scale != "fixed" and algorithm != "batched":
        raise ConfigError(f"The 'step_scale' parameter of {owner} is {step_scale!r}, which applies to the batched "
                          f"algorithm only; the {algorithm!r} algorithm takes one step per image: "
                          "use step_scale='fixed'.")


def compute_uap(
    model: nn.Module,
    images: torch.Tensor,
    *,
    zeta: float = 0.04,
    norm: object = 2,
    xi: float | None = None,
    targeted: int | None = None,
    algorithm: str = "batched",
    channels: str = "rgb",
    step_size: float | None = None,
    step_norm: object = None,
    step_decay: float = 1.0,
    step_scale: str = "fixed",
    max_passes: int = DEFAULT_MAX_PASSES,
    goal_rate: float = DEFAULT_GOAL_RATE,
    batch_size: int = 64,
    exact_rates: bool = False,
    init: torch.Tensor | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    channels_last: bool = True,
) -> UAPResult:
    """Compute a (non-)targeted universal adversarial perturbation.

    See the module docstring for the two algorithms and how they relate to ART's.

    Args:
        model: maps float images (N, 3, H, W) in [0, 1] to logits (N, K); normalisation inside.
            Put in eval mode during the call (restored after); its parameters get no gradients.
        images: source images, uint8 (N, 3, H, W) or float in [0, 1]; stay on their device and are
            moved batch-wise. A ``DiskImages`` (the decode cache) is read a batch at a time, never whole.
        zeta: budget as a fraction of the mean Lp norm of the images that set ξ, in (0, 1].
        norm: 2 or "inf" (also "2", float("inf")).
        xi: the absolute budget in [0, 1] pixel units; default ζ·mean‖images‖ₚ. The audit passes
            ζ·mean‖x_train‖ₚ (Minagi et al.: natural-image UAPs get the training images' budget).
        targeted: None (non-targeted) or the target class index.
        algorithm: "batched" (default) or "reference" (the papers'/ART's per-image loop).
        channels: "rgb", or "grey" to keep v in the grey subspace (R = G = B); ``init`` must then be grey.
        step_size: size of one FGSM step in the budget's norm, [0, 1] pixel units; default 0.1·ξ.
        step_norm: None (the budget's norm) or "inf": sign steps, as ART's FGSM default that the
            papers' code used under L2 budgets too (L∞ size step_size/√(C·H·W) under an L2 budget).
        step_decay: the step is multiplied by this after every pass, in (0, 1]; 1 keeps it fixed.
        step_scale: "fixed" (default: every step has length ``step_size``) or "sqrt_batch" (batched
            only: a batch's step is √(its images still to fool) × ``step_size``, the length of that
            many per-image steps summed in independent directions; fewer passes to a given fooling rate).
        max_passes: maximum passes over the source images.
        goal_rate: stop once the exactly scored fooling rate (targeted: success rate) on the source
            reaches this, in (0, 1].
        batch_size: images per gradient step (batched) and per scoring forward.
        exact_rates: batched only: score v exactly after every pass (as ART), about a quarter more compute.
        init: the starting v (C, H, W), e.g. from the previous chunk of a streamed source; default 0.
            Projected onto the ξ-ball; scored on the source as pass 0.
        seed: seeds the order of the source images.
        device: where to run; default the model's device.
        channels_last: feed the model NHWC-strided batches (about 2× faster convolutions on CPU
            and GPU); set False for a model that calls ``.view`` on conv outputs.

    Returns:
        A :class:`UAPResult` whose ``perturbation`` is a float32 CPU tensor (3, H, W).

    Raises:
        ConfigError: a parameter is out of range (zeta, norm, xi, targeted, algorithm, channels,
            step_size, step_norm, step_decay, step_scale, max_passes, goal_rate, batch_size) or the model does not
            output (N, K) logits.
        DataError: images is not a non-empty 4-d uint8/[0, 1] tensor, or ``init`` does not fit them.

    Example:
        >>> result = compute_uap(model, train_images, zeta=0.04, norm=2)
        >>> fooled = evaluate_perturbation(model, test_x, test_y, result.perturbation)
    """
    owner = "compute_uap"
    zeta = check_fraction(zeta, "zeta", owner)
    norm = resolve_norm(norm, owner=owner)
    xi = _check_xi(xi, owner)
    step_decay = _check_options(owner, algorithm=algorithm, channels=channels, step_decay=step_decay,
                                step_scale=step_scale)
    step_norm = _check_step_norm(step_norm, norm, owner)
    max_passes = check_positive_int(max_passes, "max_passes", owner)
    batch_size = check_positive_int(batch_size, "batch_size", owner)
    goal_rate = check_fraction(goal_rate, "goal_rate", owner)
    step_size = _check_step_size(step_size, owner)
    images = check_images(images, stream=True)
    if init is not None and tuple(init.shape) not in (tuple(images.shape[1:]), (1, *images.shape[1:])):
        raise DataError(f"init has shape {tuple(init.shape)} but the images are {tuple(images.shape[1:])}.")
    grey = channels == "grey"
    if grey and init is not None and not is_grey(init.reshape(images.shape[1:])):
        raise DataError("init is not grey (R = G = B) but channels='grey'; pass project_to_grey(init).")
    dev = model_device(model, device)
    start = time.perf_counter()
    if xi is None:
        xi = float(zeta * lp_norms(images, norm).mean())
    step = step_size if step_size is not None else DEFAULT_STEP_FRACTION * xi
    num = images.shape[0]
    v = torch.zeros((1, *images.shape[1:]), device=dev)
    if init is not None:
        v = _project(init.reshape(v.shape).to(dev, torch.float32), xi, norm)
    history: list[float] = []
    exact: list[bool] = []
    goal_reached = False
    num_updates = 0
    score = dict(batch_size=batch_size, device=dev, channels_last=channels_last)

    with eval_mode(model), _no_param_grads(model):
        target = check_target(targeted, owner, num_classes=num_outputs(model, images, dev))
        stepper = _Stepper(norm=norm, step_norm=step_norm, step=step, xi=xi, grey=grey, numel=v.numel(),
                           targeted=target is not None)
        clean = predict(model, images, **score)
        clean_dev = clean.to(dev)
        best_v, best_rate, best_pass, best_exact = v.clone(), -1.0, 0, True
        if init is not None:
            best_rate = _source_rate(model, images, v, clean, target, **score)
        generator = torch.Generator().manual_seed(int(seed))
        order_rng = random.Random(int(seed))
        share_left = 1.0
        bar = progress_bar(max_passes, f"UAP ζ={zeta}" + ("" if target is None else f" target {target}"),
                           unit="pass")
        for pass_idx in range(1, max_passes + 1):
            if algorithm == "reference":
                v, kept = _reference_pass(model, images, order_rng.sample(range(num), num), v, clean, target,
                                          stepper, device=dev)
                num_updates += kept
                rate, is_exact = _source_rate(model, images, v, clean, target, **score), True
            else:
                order = torch.randperm(num, generator=generator)
                v, fooled, updates = _batched_pass(model, images, order, v, clean_dev, target, stepper,
                                                   batch_size=batch_size, device=dev, channels_last=channels_last,
                                                   mask_first=dev.type == "cpu" and share_left < 0.5,
                                                   sqrt_batch=step_scale == "sqrt_batch")
                counted = float(fooled) / num  # one host sync per pass
                num_updates += int(updates)
                share_left = 1.0 - counted
                is_exact = exact_rates or counted >= goal_rate - CHECK_MARGIN
                rate = _source_rate(model, images, v, clean, target, **score) if is_exact else counted
            history.append(rate)
            exact.append(is_exact)
            bar.set_postfix_str(f"fooling {rate:.3f}")
            bar.update()
            if rate > best_rate:
                best_v, best_rate, best_pass, best_exact = v.clone(), rate, pass_idx, is_exact
            if is_exact and rate >= goal_rate:
                goal_reached = True
                break
            if step_decay != 1.0:
                stepper.set_step(stepper.step * step_decay)
        bar.close()
        last_rate = history[-1] if exact[-1] else _source_rate(model, images, v, clean, target, **score)
        if not best_exact and best_pass == len(history):  # the best is the last v: scored just above
            best_rate, best_exact = last_rate, True
        if not best_exact:
            best_rate = _source_rate(model, images, best_v, clean, target, **score)
        if last_rate > best_rate:  # a counted rate can rank a v too high; never return worse than the last
            best_v, best_rate, best_pass = v.clone(), last_rate, len(history)

    return UAPResult(
        perturbation=best_v[0].detach().cpu(),
        zeta=zeta,
        xi=xi,
        norm=norm,
        targeted=target,
        algorithm=algorithm,
        channels=channels,
        fooling_rate_source=history,
        source_rate_exact=exact,
        best_rate=best_rate,
        best_pass=best_pass,
        last_rate=last_rate,
        num_passes=len(history),
        num_updates=num_updates,
        seconds=time.perf_counter() - start,
        step_size=step,
        step_norm=step_norm,
        step_decay=step_decay,
        step_scale=step_scale,
        goal_rate=goal_rate,
        num_source_images=num,
        goal_reached=goal_reached,
        last_perturbation=v[0].detach().cpu(),
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
    images = check_images(images, stream=True)
    if classes is None:
        dev = model_device(model, params.get("device"))  # type: ignore[arg-type]
        with eval_mode(model):
            classes = list(range(num_outputs(model, images, dev)))
    return {
        int(t): compute_uap(model, images, targeted=int(t), seed=seed + int(t), **params)  # type: ignore[arg-type]
        for t in classes
    }


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
    pixel space (grey tasks: v has R = G = B). ξ = ``xi`` when given (the audit passes
    ζ·mean‖x_train‖ₚ), else ζ·mean‖x‖ₚ over the images v is computed from. Calling the attack computes
    v on the given images (labels are not used: fooling is measured against the clean prediction)
    and stores it in ``perturbation_`` and the full :class:`UAPResult` in ``result_``.

    Args: the keyword arguments of :func:`compute_uap` but ``init`` and ``channels_last``, validated
    on construction.

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
        xi: float | None = None,
        targeted: int | None = None,
        algorithm: str = "batched",
        channels: str = "rgb",
        step_size: float | None = None,
        step_norm: object = None,
        step_decay: float = 1.0,
        step_scale: str = "fixed",
        max_passes: int = DEFAULT_MAX_PASSES,
        goal_rate: float = DEFAULT_GOAL_RATE,
        batch_size: int = 64,
        exact_rates: bool = False,
        seed: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        owner = "UAPAttack"
        self.zeta = check_fraction(zeta, "zeta", owner)
        self.norm = resolve_norm(norm, owner=owner)
        self.xi = _check_xi(xi, owner)
        self.targeted = check_target(targeted, owner)
        self.step_decay = _check_options(owner, algorithm=algorithm, channels=channels, step_decay=step_decay,
                                         step_scale=step_scale)
        self.algorithm, self.channels, self.step_scale = algorithm, channels, step_scale
        self.step_size = _check_step_size(step_size, owner)
        self.step_norm = None if step_norm is None else _check_step_norm(step_norm, self.norm, owner)
        self.max_passes = check_positive_int(max_passes, "max_passes", owner)
        self.goal_rate = check_fraction(goal_rate, "goal_rate", owner)
        self.batch_size = check_positive_int(batch_size, "batch_size", owner)
        self.exact_rates = bool(exact_rates)
        self.seed = seed
        self.device = device

    def compute(self, model: nn.Module, images: torch.Tensor, *, init: torch.Tensor | None = None,
                seed: int | None = None) -> UAPResult:
        """Compute v on ``images`` (see :func:`compute_uap`); also kept in ``result_`` and ``perturbation_``.

        ``init`` starts from a given v (a streamed source's previous chunk); ``seed`` overrides the
        attack's seed for this call.
        """
        self.result_ = compute_uap(
            model,
            images,
            zeta=self.zeta,
            norm=self.norm,
            xi=self.xi,
            targeted=self.targeted,
            algorithm=self.algorithm,
            channels=self.channels,
            step_size=self.step_size,
            step_norm=self.step_norm,
            step_decay=self.step_decay,
            step_scale=self.step_scale,
            max_passes=self.max_passes,
            goal_rate=self.goal_rate,
            batch_size=self.batch_size,
            exact_rates=self.exact_rates,
            init=init,
            seed=self.seed if seed is None else seed,
            device=self.device,
        )
        self.perturbation_ = self.result_.perturbation
        return self.result_

    def __call__(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Compute v on ``images`` and return clip(images + v, 0, 1), float32 (N, 3, H, W)."""
        return apply_perturbation(images, self.compute(model, images).perturbation)
