"""The UAP audit: for each image source × budget, a UAP, its random controls and their metrics.

Threat model (Hirano et al. 2021; Minagi et al. 2022): ξ = ζ·mean‖x_train‖ₚ over the model's
training images, whatever the source the UAP is computed from; on a grey task (R = G = B over the
training images) the UAP, the natural images and the random controls are grey, so v is the
perturbation of the grey image the model receives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from medtune._tensors import eval_mode, model_device
from medtune.config import load_config
from medtune.errors import ConfigError
from medtune.progress import progress_bar
from medtune.robustness._common import check_images, check_target, lp_norms, num_outputs, predict
from medtune.robustness._registry import create_attack
from medtune.robustness.config import AuditConfig
from medtune.robustness.evaluate import evaluate_perturbation, mcnemar_test
from medtune.robustness.sources import count_photos, mixed_source, natural_image_chunks, rgb_to_grey
from medtune.robustness.uap import is_grey, perturbation_norm, random_control

if TYPE_CHECKING:
    from medtune.data.diskcache import DiskImages

__all__ = ["AuditResult", "audit", "resolve_channels"]


@dataclass
class AuditResult:
    """What :func:`audit` returns.

    Each record has the keys ``source``, ``zeta``, ``xi`` (pixel units), ``norm`` ("2" or "inf"), ``targeted``,
    ``algorithm``, ``channels``, ``perturbation_key``, ``perturbation_norm``; the budget: ``budget_source``
    ("train"), ``budget_mean_norm``, ``budget_num_images``; the source: ``num_source_images``,
    ``num_natural_images``, ``num_photos`` (distinct natural photos the crops came from; None for ``train``),
    ``natural_photos`` ("builtin" or the folder), ``num_chunks``, ``source_curve`` ([[source images so far, test
    rate]] after each chunk); the loop: ``num_passes``, ``num_updates``, ``goal_reached``, ``goal_rate``,
    ``fooling_rate_source`` (per pass), ``source_rate_exact`` (per pass), ``source_rate_best``, ``best_pass``,
    ``step_size``, ``step_norm``, ``step_scale``, ``push``, ``seconds``, ``seed``; for the UAP: ``fooling_rate``,
    ``fooling_ci_low``, ``fooling_ci_high``, ``ci_method``, ``targeted_success`` (+
    ``targeted_ci_low``/``_high``), ``clean_target_share``, ``clean_accuracy``, ``perturbed_accuracy``,
    ``per_class``, ``confusion``; the random controls: ``random_num_draws``, ``random_linf``,
    ``random_fooling_rate`` (mean over the draws), ``random_fooling_rate_max``, ``random_fooling_rates``,
    ``random_targeted_success`` (mean) and ``_max``, and of the strongest draw ``random_ci_low``,
    ``random_ci_high``, ``random_perturbed_accuracy``, ``random_per_class``, ``random_confusion``; McNemar's
    exact test UAP vs the strongest draw: ``mcnemar_p``, ``mcnemar_discordant`` ([UAP only, random only]),
    ``mcnemar_outcome`` ("fooled" or "target").

    Attributes:
        records: one flat JSON-serialisable dict per (source, zeta, target), keys as above.
        perturbations: {record["perturbation_key"]: UAP, float32 CPU tensor (3, H, W)}.
        random_perturbations: {record["perturbation_key"]: its strongest random control, same shape}.
    """

    records: list[dict] = field(default_factory=list)
    perturbations: dict[str, torch.Tensor] = field(default_factory=dict)
    random_perturbations: dict[str, torch.Tensor] = field(default_factory=dict)


def _resolve_targets(targeted: object, num_classes: int) -> list[int | None]:
    target = check_target(targeted, "audit", num_classes=num_classes, allow_all=True)
    return list(range(num_classes)) if target == "all" else [target]


def _perturbation_key(source: str, zeta: float, norm: str, target: int | None) -> str:
    return f"{source}/zeta={zeta:g}/norm={norm}/target={'none' if target is None else target}"


def resolve_channels(channels: str, train_images: torch.Tensor | DiskImages) -> str:
    """``auto`` → ``grey`` when every training image has R = G = B exactly, else ``rgb``."""
    if channels != "auto":
        return channels
    return "grey" if is_grey(train_images) else "rgb"


@dataclass
class _Source:
    """A UAP source: a factory of its chunks, (uint8 images, photos first used in them), and its size."""

    chunks: Callable[[], Iterator[tuple[torch.Tensor, int]]]
    num_images: int
    num_natural: int | None = None
    photos: str | None = None


def _fixed(images: torch.Tensor, num_photos: int, chunk_size: int) -> Callable[[], Iterator[tuple[torch.Tensor, int]]]:
    """Chunks of an in-memory source; its photos are counted with the first chunk."""
    return lambda: ((images[i:i + chunk_size], num_photos if i == 0 else 0)
                    for i in range(0, images.shape[0], chunk_size))


def _slices(images, chunk_size: int) -> Callable[[], Iterator[tuple[torch.Tensor, int]]]:
    """Chunks of every image in order, read chunk by chunk (a ``DiskImages`` as views, read by the loop)."""
    from medtune.data.diskcache import DiskImages

    num = images.shape[0]
    take = (lambda i: images.view(np.arange(i, min(i + chunk_size, num)))) if isinstance(images, DiskImages) else (
        lambda i: images[i:i + chunk_size])
    return lambda: ((take(i), 0) for i in range(0, num, chunk_size))


def _build_source(name: str, cfg: AuditConfig, train_images: torch.Tensor | DiskImages, size: tuple[int, int],
                  grey: bool) -> _Source:
    """The source ``name``; only its drawn rows of ``train_images`` are read (a ``DiskImages`` stays on disk)."""
    photos = cfg.natural_folder if cfg.natural_folder is not None else "builtin"
    num_train = int(train_images.shape[0])
    if name == "train" and cfg.num_source_images == "all":
        return _Source(_slices(train_images, num_train if cfg.chunk_size == "all" else cfg.chunk_size), num_train)
    num = cfg.num_source_images
    if num == "all":
        num = count_photos(cfg.natural_folder) if name == "natural" else num_train
    chunk_size = num if cfg.chunk_size == "all" else cfg.chunk_size
    if name == "train":
        generator = torch.Generator().manual_seed(int(cfg.seed))
        pick = torch.randperm(num_train, generator=generator)[:num].sort().values
        return _Source(_fixed(train_images[pick], 0, chunk_size), int(pick.shape[0]))
    stream = dict(folder=cfg.natural_folder, seed=cfg.seed, grey=grey, resize=cfg.natural_resize)
    if name == "natural":
        if num > chunk_size:  # streamed: photos are read again for every UAP, in bounded memory
            return _Source(lambda: ((c.images, c.num_photos) for c in
                                    natural_image_chunks(num, size, chunk_size=chunk_size, **stream)),
                           num, num_natural=num, photos=photos)
        only = next(natural_image_chunks(num, size, chunk_size=num, **stream))
        return _Source(_fixed(only.images, only.num_photos, chunk_size), num, num_natural=num, photos=photos)
    num_natural = max(1, int(round(cfg.mix_fraction * num)))
    if num - num_natural > num_train:
        raise ConfigError(f"The 'mixed' source needs {num - num_natural} training images but the run has "
                          f"{num_train}; lower num_source_images or raise mix_fraction.")
    natural = next(natural_image_chunks(num_natural, size, chunk_size=num_natural, **stream))
    mixed = mixed_source(train_images, natural.images, num_natural / num, seed=cfg.seed, num_images=num)
    if grey:  # grey after drawing, so only the drawn training images are read: rgb_to_grey leaves a grey
        mixed = rgb_to_grey(mixed)  # pixel as it is (all 256 values, tested), e.g. the natural crops
    return _Source(_fixed(mixed, natural.num_photos, chunk_size), num, num_natural=num_natural, photos=photos)


def audit(
    model: nn.Module,
    config: AuditConfig | Mapping | None = None,
    *,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    train_images: torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    **overrides: object,
) -> AuditResult:
    """UAP audit of one model (Hirano et al. 2021; Minagi et al. 2022).

    Per source, ζ (and target class with ``targeted="all"``): a UAP from the source images within
    ξ = ζ·mean‖x_train‖ₚ (chunk by chunk, v carried over), ``num_random`` random controls of its size,
    all evaluated on the test set, the UAP against the strongest control by McNemar's exact test.

    Args:
        model: maps float (N, 3, H, W) in [0, 1] to logits (N, K); normalisation inside.
        config: an :class:`AuditConfig` (the driver's), a mapping of its keys, or None (its defaults).
        test_images: uint8 (N, 3, H, W) or float in [0, 1], or a ``DiskImages`` (read in batches, as
            ``train_images``); the UAPs are evaluated here.
        test_labels: int64 (N,) true classes.
        train_images: the model's training images: ξ for every source, ``auto`` channels, the ``train`` source.
        class_names: K names for the per-class rates; default "0".."K-1".
        device: default the model's device.
        **overrides: :class:`AuditConfig` fields replacing ``config``'s (``zetas=(0.04,)``, ...).

    Returns:
        An :class:`AuditResult` (its ``records`` keys are listed there).

    Raises:
        ConfigError: any invalid field (as :class:`AuditConfig`), no train_images, or a ``mixed``
            source larger than the training set allows.
        DataError: bad images or labels, or an unreadable natural-image file.
    """
    cfg = load_config(AuditConfig, config, **overrides)
    test_images = check_images(test_images, "test_images", stream=True)
    if train_images is None:
        raise ConfigError("audit needs train_images: the budget ξ = ζ·mean‖x_train‖ₚ is set by the model's "
                          "training images for every source (Minagi et al.); pass them.")
    train_images = check_images(train_images, "train_images", stream=True)
    setup = _Setup.build(model, cfg, test_images, train_images, device)
    result = AuditResult()
    bar = progress_bar(len(cfg.sources) * len(cfg.zetas) * len(setup.targets), "audit", unit="UAP")
    for source_idx, name in enumerate(cfg.sources):
        source = _build_source(name, cfg, train_images, setup.size, setup.channels == "grey")
        for zeta_idx, zeta in enumerate(cfg.zetas):
            for target in setup.targets:
                uap_seed = cfg.seed + 1000 * source_idx + 100 * zeta_idx + (0 if target is None else target + 1)
                params = cfg.uap.derive(zeta=zeta, xi=zeta * setup.mean_norm, targeted=target, channels=setup.channels)
                key = _perturbation_key(name, zeta, cfg.norm, target)
                attack = create_attack("uap", params=params, seed=uap_seed, device=setup.device)
                record, v, control = _one_uap(model, attack, source, cfg, setup, test_images, test_labels,
                                              class_names)
                result.records.append({"source": name, "zeta": zeta, "xi": params.xi, "norm": cfg.norm,
                                       "targeted": target, "algorithm": cfg.algorithm, "channels": setup.channels,
                                       "perturbation_key": key, **setup.budget, **record})
                result.perturbations[key] = v
                result.random_perturbations[key] = control
                bar.set_postfix_str(f"{name} ζ={zeta} fooling {record.get('fooling_rate', float('nan')):.3f}")
                bar.update()
    bar.close()
    return result


@dataclass
class _Setup:
    """What every UAP of one audit shares: the device, targets, channels, ξ's mean norm, clean test predictions."""

    device: torch.device
    targets: list[int | None]
    channels: str
    mean_norm: float
    size: tuple[int, int]
    clean_test: torch.Tensor
    budget: dict

    @classmethod
    def build(cls, model: nn.Module, cfg: AuditConfig, test_images, train_images, device) -> _Setup:
        dev = model_device(model, device)
        with eval_mode(model):
            num_classes = num_outputs(model, test_images, dev)
        targets = _resolve_targets(cfg.targeted, num_classes)
        mode = resolve_channels(cfg.channels, train_images)
        mean_norm = float(lp_norms(train_images, cfg.norm).mean())
        with eval_mode(model):
            clean_test = predict(model, test_images, batch_size=cfg.batch_size, device=dev)
        budget = {"budget_source": "train", "budget_mean_norm": mean_norm,
                  "budget_num_images": int(train_images.shape[0])}
        return cls(dev, targets, mode, mean_norm, tuple(test_images.shape[-2:]), clean_test, budget)


def _one_uap(model, attack, source: _Source, cfg: AuditConfig, setup: _Setup, test_images, test_labels,
             class_names) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Compute one UAP over the source's chunks, its random controls and all their metrics."""
    target, dev = attack.params.targeted, setup.device
    run = _over_chunks(model, attack, source, cfg, setup, test_images)
    v, res = run["v"], run["last"]
    clip = cfg.clip == "pixel"
    metrics = evaluate_perturbation(model, test_images, test_labels, v, targeted=target, class_names=class_names,
                                    batch_size=cfg.batch_size, device=dev, clip=clip)
    uap_hits = _test_hits(model, test_images, v, setup.clean_test, target, cfg, dev)
    run["curve"].append([run["seen"], metrics["fooling_rate"] if target is None else metrics["targeted_success"]])
    controls = _random_controls(model, v, cfg, setup, test_images, target, attack.seed, res.channels)
    control = controls["draws"][controls["strongest"]]
    random_metrics = evaluate_perturbation(model, test_images, test_labels, control, targeted=target,
                                           class_names=class_names, batch_size=cfg.batch_size, device=dev, clip=clip)
    test = mcnemar_test(uap_hits, controls["hits"][controls["strongest"]])
    record = {
        "perturbation_norm": perturbation_norm(v, cfg.norm),
        "num_source_images": source.num_images,
        "num_natural_images": source.num_natural,
        "num_photos": run["num_photos"] if source.photos is not None else None,
        "num_distinct_natural_images": _distinct_natural(source, run["num_photos"], cfg),
        "natural_photos": source.photos,
        "natural_resize": cfg.natural_resize if source.photos is not None else None,
        "num_chunks": len(run["curve"]),
        "source_curve": run["curve"],
        "num_test_images": metrics["num_images"],
        "num_passes": run["passes"],
        "num_updates": run["updates"],
        "goal_reached": res.goal_reached,
        "goal_rate": res.goal_rate,
        "fooling_rate_source": run["history"],
        "source_rate_exact": run["exact"],
        "source_rate_best": res.best_rate,
        "best_pass": res.best_pass,
        "step_size": res.step_size,
        "step_eps": res.step_eps,
        "step_norm": res.step_norm,
        "step_scale": res.step_scale,
        "push": res.push,
        "protocol": cfg.protocol,
        "clip": res.clip,
        "return_v": res.return_v,
        "passes_per_chunk": cfg.max_passes,
        "chunk_size": cfg.chunk_size,
        "seconds": run["seconds"],
        "seed": attack.seed,
    }
    record.update({k: val for k, val in metrics.items() if k not in ("num_images", "targeted")})
    record.update(_random_record(cfg, controls, random_metrics, target))
    record.update({"mcnemar_p": test["p_value"], "mcnemar_discordant": [test["only_a"], test["only_b"]],
                   "mcnemar_outcome": "fooled" if target is None else "target"})
    return record, v, control


def _distinct_natural(source: _Source, num_photos: int, cfg: AuditConfig) -> int | None:
    """Distinct natural images the UAP saw: every crop is one; a photo resized whole is one however often drawn."""
    if source.photos is None:
        return None
    return min(source.num_natural, num_photos) if cfg.natural_resize == "whole" else source.num_natural


def _over_chunks(model, attack, source: _Source, cfg: AuditConfig, setup: _Setup, test_images) -> dict:
    """Run the attack on each chunk of the source, v carried over; the test rate after each chunk but the last."""
    v, history, exact, curve = None, [], [], []
    seen = passes = updates = num_photos = 0
    seconds, res = 0.0, None
    for chunk_idx, (images, new_photos) in enumerate(source.chunks()):
        num_photos += new_photos
        res = attack.compute(model, images, init=v, seed=attack.seed + 7919 * chunk_idx)
        v = res.perturbation
        history += res.fooling_rate_source
        exact += res.source_rate_exact
        passes, updates, seconds = passes + res.num_passes, updates + res.num_updates, seconds + res.seconds
        seen += images.shape[0]
        if seen < source.num_images:  # the last point is the final evaluation
            hits = _test_hits(model, test_images, v, setup.clean_test, attack.params.targeted, cfg, setup.device)
            curve.append([seen, float(hits.double().mean())])
    return {"v": v, "last": res, "history": history, "exact": exact, "curve": curve, "seen": seen, "passes": passes,
            "updates": updates, "num_photos": num_photos, "seconds": seconds}


def _random_controls(model, v, cfg: AuditConfig, setup: _Setup, test_images, target, uap_seed: int,
                     channels: str) -> dict:
    """``num_random`` random perturbations of v's size, their test hits and rates, and the strongest draw."""
    draws, hits, fooling, success = [], [], [], []
    with eval_mode(model):
        for d in range(cfg.num_random):
            r = random_control(v, cfg.norm, seed=uap_seed * 10007 + d, channels=channels, linf=cfg.random_linf)
            adv = predict(model, test_images, perturbation=r, batch_size=cfg.batch_size, device=setup.device,
                          clip=cfg.clip == "pixel")
            draws.append(r)
            hits.append(_hits(adv, setup.clean_test, target))
            fooling.append(float((adv != setup.clean_test).double().mean()))
            success.append(None if target is None else float((adv == target).double().mean()))
    strongest = max(range(cfg.num_random), key=lambda d: float(hits[d].double().mean()))
    return {"draws": draws, "hits": hits, "fooling": fooling, "success": success, "strongest": strongest}


def _random_record(cfg: AuditConfig, controls: dict, random_metrics: dict, target: int | None) -> dict:
    fooling, success = controls["fooling"], controls["success"]
    return {
        "random_num_draws": cfg.num_random,
        "random_linf": cfg.random_linf,
        "random_fooling_rate": sum(fooling) / len(fooling),
        "random_fooling_rate_max": max(fooling),
        "random_fooling_rates": fooling,
        "random_targeted_success": None if target is None else sum(success) / len(success),
        "random_targeted_success_max": None if target is None else max(success),
        "random_ci_low": random_metrics["fooling_ci_low"],
        "random_ci_high": random_metrics["fooling_ci_high"],
        "random_perturbed_accuracy": random_metrics["perturbed_accuracy"],
        "random_per_class": random_metrics["per_class"],
        "random_confusion": random_metrics["confusion"],
    }


def _hits(adv: torch.Tensor, clean: torch.Tensor, target: int | None) -> torch.Tensor:
    """Per test image: fooled (non-targeted) or predicted as the target (targeted), bool (N,)."""
    return (adv != clean) if target is None else (adv == target)


def _test_hits(model, test_images, v, clean_test, target, cfg: AuditConfig, dev) -> torch.Tensor:
    with eval_mode(model):
        adv = predict(model, test_images, perturbation=v, batch_size=cfg.batch_size, device=dev,
                      clip=cfg.clip == "pixel")
    return _hits(adv, clean_test, target)
