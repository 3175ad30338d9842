"""Machinery of the UAP loop: the FGSM step, one pass of each algorithm, and the pass loop that keeps
the best v. :func:`medtune.robustness.uap.compute_uap` is its public face; the algorithms are
described in the README ("DEFT and the UAP audit")."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from medtune.progress import progress_bar
from medtune._tensors import batches, to_float
from medtune.robustness._common import predict
from medtune.robustness.params import UAPParams

__all__: list[str] = []

# A batched pass is scored exactly once the count from its own forwards is this close to the goal.
CHECK_MARGIN = 0.05


def project(v: torch.Tensor, xi: float, norm: str) -> torch.Tensor:
    """Projection onto the ξ-ball without a host sync (the L2 factor stays a device tensor)."""
    if norm == "inf":
        return v.clamp(-xi, xi)
    length = v.norm()
    return v * torch.where(length > xi, xi / (length + 1e-7), torch.ones_like(length))



class _Stepper:
    """One FGSM step of v along a gradient: direction, size, grey subspace, projection."""

    def __init__(self, *, norm: str, step_norm: str, step: float, xi: float, grey: bool, numel: int,
                 targeted: bool, clip: bool = True, elementwise: float | None = None) -> None:
        self.norm, self.step_norm, self.xi, self.grey, self.clip = norm, step_norm, xi, grey, clip
        self.sign = -1.0 if targeted else 1.0  # targeted: descend the target's loss
        self.numel = numel
        self.set_step(step, elementwise)

    def set_step(self, step: float, elementwise: float | None = None) -> None:
        # sign steps under an L2 budget: L∞ size step/√d, so the step's L2 length is ``step``; an absolute
        # FGSM eps (ART's) is the sign step's size itself, kept exact
        self.step = step
        if elementwise is None:
            elementwise = step / math.sqrt(self.numel) if (self.step_norm == "inf" and self.norm == "2") else step
        self.elementwise = elementwise

    def perturb(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x + v, clipped to [0, 1] unless the loop runs unclipped (the papers' code)."""
        return (x + v).clamp(0.0, 1.0) if self.clip else x + v

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
        return project(v + self.sign * self.direction(grad, scale), self.xi, self.norm)


def _source_rate(model, images, v, clean, target, *, batch_size, device, channels_last, clip=True) -> float:
    perturbed = predict(model, images, perturbation=v, batch_size=batch_size, device=device,
                        channels_last=channels_last, clip=clip)
    hit = (perturbed != clean) if target is None else (perturbed == target)
    return float(hit.double().mean())


def _batched_pass(model, images, order, v, clean_dev, target, stepper, *, batch_size, device, channels_last,
                  mask_first: bool, step_scale: str = "fixed", push: str = "away",
                  counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One pass of the batched loop; returns (v, number of images met fooled, number of updates, counts).

    ``mask_first`` (CPU, most images fooled): a gradient-free forward finds the images still to
    fool and only those go through forward/backward. Otherwise one forward/backward over the whole
    batch, whose logits also give the mask, with no host sync. ``step_scale``: the step is
    1, √n or n times the step size for n images still to fool in the batch (:func:`_scale`).
    ``push`` (non-targeted): ``away`` ascends each image's cross-entropy of its clean label (ART's);
    ``dominant`` pulls each image towards the dominant label, the class the fooled images met so far are
    predicted as most often (``counts`` per class, carried across passes), and pushes the images of that
    class (and every image until one is fooled) away from their label (:func:`_push_loss`).
    """
    from medtune.data.diskcache import DiskImages

    fooled = torch.zeros((), dtype=torch.int64, device=device)
    updates = torch.zeros((), dtype=torch.int64, device=device)

    def is_active(pred: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return (pred == labels) if target is None else (pred != target)

    tally = target is None and push == "dominant"
    if isinstance(images, DiskImages):  # read this pass's shuffled batches ahead from the decode cache
        images.prefetch([order[sl] for sl in batches(images.shape[0], batch_size)])
    for sl in batches(images.shape[0], batch_size):
        idx = order[sl]
        x = to_float(images[idx], device, channels_last=channels_last)
        labels = clean_dev[idx.to(device)] if target is None else None
        if mask_first:
            with torch.inference_mode():
                seen = model(stepper.perturb(x, v))
                pred = seen.argmax(dim=1)
                active = is_active(pred, labels).clone()
            fooled += (~active).sum()
            if tally:
                counts = _tally(counts, pred, active, seen.shape[1])
            if not bool(active.any()):
                continue
            x, labels = x[active], (None if labels is None else labels[active])
        x_in = stepper.perturb(x, v)
        if channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        x_in.requires_grad_(True)
        logits = model(x_in)
        if mask_first:
            updates += 1
            scale = _scale(step_scale, float(x.shape[0]))
        else:
            pred = logits.detach().argmax(dim=1)
            active = is_active(pred, labels)
            fooled += (~active).sum()
            updates += active.any()
            scale = _scale(step_scale, active.sum())
            if tally:
                counts = _tally(counts, pred, active, logits.shape[1])
        if target is not None:
            loss = F.cross_entropy(logits, torch.full((x.shape[0],), target, device=device), reduction="none")
        elif tally:
            loss = _push_loss(logits, labels, counts)
        else:
            loss = F.cross_entropy(logits, labels, reduction="none")
        if not mask_first:
            loss = loss * active
        (grad,) = torch.autograd.grad(loss.sum(), x_in)
        v = stepper(v, grad.sum(dim=0, keepdim=True), scale)  # a zero gradient (nothing left to fool) keeps v
    return v, fooled, updates, counts


def _tally(counts: torch.Tensor | None, pred: torch.Tensor, active: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``counts`` (per class: the fooled images met predicted as it) with this batch's fooled images
    added, on the device without a host sync; created on first use."""
    if counts is None:
        counts = torch.zeros(num_classes, device=pred.device)
    return counts.index_add(0, pred, (~active).to(counts.dtype))


def _push_loss(logits: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per image, the loss a ``dominant`` step ascends: log p(dominant label) where there is one and it is
    not the image's label, else the cross-entropy of the label (away from it, as ART's FGSM).

    Moosavi-Dezfooli et al. (2017) observed that a UAP sends most images to a few dominant labels; the
    per-image loop finds one because it steps for one image at a time on top of v, whereas the summed
    away-gradients of a batch point towards different wrong classes and partly cancel. Pulling every image
    towards the label v already sends fooled images to makes a batch's gradients agree
    (``benchmarks/bench_uap_vs_art.py``)."""
    logp = F.log_softmax(logits, dim=1)
    away = -logp.gather(1, labels[:, None])[:, 0]
    dominant = counts.argmax()
    pull = (counts.sum() > 0) & (labels != dominant)
    return torch.where(pull, logp.index_select(1, dominant.view(1))[:, 0], away)


def _scale(step_scale: str, num_active):
    """The batched step's multiple of the step size for ``num_active`` images still to fool (a float or a
    device tensor, no host sync): 1, √n, or n (that many aligned per-image steps)."""
    if step_scale == "sqrt_batch":
        return math.sqrt(num_active) if isinstance(num_active, float) else num_active.sqrt()
    return num_active if step_scale == "batch" else 1.0


def fgsm_step(model: nn.Module, start: torch.Tensor, label: int, stepper: _Stepper) -> torch.Tensor:
    """ART's FGSM step from ``start`` (1, C, H, W) on the cross-entropy of ``label`` (targeted: towards it),
    clipped to [0, 1] unless the stepper runs unclipped."""
    start = start.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(model(start), torch.tensor([label], device=start.device))
    (grad,) = torch.autograd.grad(loss, start)
    adv = start.detach() + stepper.sign * stepper.direction(grad)
    return adv.clamp(0.0, 1.0) if stepper.clip else adv


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
        adv = fgsm_step(model, start, int(clean[i]) if target is None else target, stepper)
        with torch.inference_mode():
            new = int(model(adv).argmax(dim=1))
        if (new != current) if target is None else (new == target):
            v = project(adv - x, stepper.xi, stepper.norm)  # the re-clip: v = clip(x+v+step) - x
            kept += 1
    return v, kept


class no_param_grads:
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



@dataclass
class LoopState:
    """Where the pass loop stands: the current v, the per-pass rates and the best v so far."""

    v: torch.Tensor
    best_v: torch.Tensor
    best_rate: float = -1.0
    best_pass: int = 0
    best_exact: bool = True
    history: list[float] = field(default_factory=list)
    exact: list[bool] = field(default_factory=list)
    num_updates: int = 0
    goal_reached: bool = False
    share_left: float = 1.0
    last_rate: float = 0.0
    counts: torch.Tensor | None = None  # the ``dominant`` push's tally of fooled images per predicted class


class UAPLoop:
    """The passes of one UAP over one set of source images, with the model in eval mode and its
    parameters frozen (the caller's contexts), ξ and the target resolved."""

    def __init__(self, model: nn.Module, images, params: UAPParams, *, xi: float, target: int | None,
                 device: torch.device, channels_last: bool) -> None:
        self.model, self.images, self.params, self.target, self.device = model, images, params, target, device
        self.num = images.shape[0]
        self.score = dict(batch_size=params.batch_size, device=device, channels_last=channels_last,
                          clip=params.clip == "pixel")
        self.channels_last = channels_last
        numel = math.prod(images.shape[1:])
        self.stepper_step = params.step_for(xi, numel)  # the first pass's step length, recorded
        self.stepper = _Stepper(norm=params.norm, step_norm=params.step_norm, step=params.step_for(xi, numel), xi=xi,
                                grey=params.channels == "grey", numel=numel, targeted=target is not None,
                                clip=params.clip == "pixel",
                                elementwise=params.step_eps if params.step_norm == "inf" else None)

    def source_rate(self, v: torch.Tensor) -> float:
        """Exact fooling rate (targeted: success) of v on the source images."""
        return _source_rate(self.model, self.images, v, self.clean, self.target, **self.score)

    def run(self, v: torch.Tensor, *, scored_start: bool, seed: int) -> LoopState:
        """Up to ``max_passes`` passes from v (scored as pass 0 when ``scored_start``); stops at the goal."""
        self.clean = predict(self.model, self.images, **self.score)
        self.clean_dev = self.clean.to(self.device)
        state = LoopState(v=v, best_v=v.clone())
        if scored_start:
            state.best_rate = self.source_rate(v)
        generator = torch.Generator().manual_seed(int(seed))
        order_rng = random.Random(int(seed))
        bar = progress_bar(self.params.max_passes, f"UAP ζ={self.params.zeta}"
                           + ("" if self.target is None else f" target {self.target}"), unit="pass")
        for pass_idx in range(1, self.params.max_passes + 1):
            if self.params.algorithm == "reference":
                rate, is_exact = self._reference_pass(state, order_rng.sample(range(self.num), self.num))
            else:
                rate, is_exact = self._batched_pass(state, torch.randperm(self.num, generator=generator))
            state.history.append(rate)
            state.exact.append(is_exact)
            bar.set_postfix_str(f"fooling {rate:.3f}")
            bar.update()
            if rate > state.best_rate:
                state.best_v, state.best_rate = state.v.clone(), rate
                state.best_pass, state.best_exact = pass_idx, is_exact
            if is_exact and rate >= self.params.goal_rate:
                state.goal_reached = True
                break
            if self.params.step_decay != 1.0:
                decay = self.params.step_decay
                self.stepper.set_step(self.stepper.step * decay,
                                      None if self.params.step_eps is None else self.stepper.elementwise * decay)
        bar.close()
        self._settle(state)
        return state

    def _reference_pass(self, state: LoopState, order: list[int]) -> tuple[float, bool]:
        state.v, kept = _reference_pass(self.model, self.images, order, state.v, self.clean, self.target,
                                        self.stepper, device=self.device)
        state.num_updates += kept
        return self.source_rate(state.v), True

    def _batched_pass(self, state: LoopState, order: torch.Tensor) -> tuple[float, bool]:
        state.v, fooled, updates, state.counts = _batched_pass(
            self.model, self.images, order, state.v, self.clean_dev, self.target, self.stepper,
            batch_size=self.params.batch_size, device=self.device, channels_last=self.channels_last,
            mask_first=self.device.type == "cpu" and state.share_left < 0.5,
            step_scale=self.params.step_scale, push=self.params.push, counts=state.counts)
        counted = float(fooled) / self.num  # one host sync per pass
        state.num_updates += int(updates)
        state.share_left = 1.0 - counted
        is_exact = self.params.exact_rates or counted >= self.params.goal_rate - CHECK_MARGIN
        return (self.source_rate(state.v) if is_exact else counted), is_exact

    def _settle(self, state: LoopState) -> None:
        """Score the last and the best v exactly; the returned v is never worse than the last."""
        state.last_rate = state.history[-1] if state.exact[-1] else self.source_rate(state.v)
        if not state.best_exact and state.best_pass == len(state.history):  # the best is the last v: scored above
            state.best_rate, state.best_exact = state.last_rate, True
        if not state.best_exact:
            state.best_rate = self.source_rate(state.best_v)
        if state.last_rate > state.best_rate:  # a counted rate can rank a v too high
            state.best_v, state.best_rate, state.best_pass = state.v.clone(), state.last_rate, len(state.history)
