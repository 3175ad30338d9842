"""The UAP audit: for each image source × budget, a UAP, its random controls and their metrics.

Threat model (Hirano et al. 2021; Minagi et al. 2022): ξ = ζ·mean‖x_train‖ₚ over the model's
training images, whatever the source the UAP is computed from; on a grey task (R = G = B over the
training images) the UAP, the natural images and the random controls are grey, so v is the
perturbation of the grey image the model receives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from medtune._tensors import eval_mode, model_device
from medtune.errors import ConfigError
from medtune.progress import progress_bar
from medtune.robustness._common import check_images, check_target, lp_norms, num_outputs, predict
from medtune.robustness._registry import create_attack
from medtune.robustness.config import AuditConfig
from medtune.robustness.evaluate import evaluate_perturbation, mcnemar_test
from medtune.robustness.sources import mixed_source, natural_image_chunks, rgb_to_grey
from medtune.robustness.uap import (
    DEFAULT_GOAL_RATE,
    DEFAULT_MAX_PASSES,
    DEFAULT_STEP_FRACTION,
    is_grey,
    perturbation_norm,
    random_control,
)

if TYPE_CHECKING:
    from medtune.data.diskcache import DiskImages

__all__ = ["AuditResult", "audit", "resolve_channels"]


@dataclass
class AuditResult:
    """What :func:`audit` returns.

    Attributes:
        records: one flat JSON-serialisable dict per (source, zeta, target); see :func:`audit`.
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


def _build_source(name: str, cfg: AuditConfig, train_images: torch.Tensor | DiskImages, size: tuple[int, int],
                  grey: bool) -> _Source:
    """The source ``name``; only its drawn rows of ``train_images`` are read (a ``DiskImages`` stays on disk)."""
    photos = cfg.natural_folder if cfg.natural_folder is not None else "builtin"
    num = cfg.num_source_images
    if name == "train":
        generator = torch.Generator().manual_seed(int(cfg.seed))
        pick = torch.randperm(train_images.shape[0], generator=generator)[:num].sort().values
        return _Source(_fixed(train_images[pick], 0, cfg.chunk_size), int(pick.shape[0]))
    stream = dict(folder=cfg.natural_folder, seed=cfg.seed, grey=grey)
    if name == "natural":
        if num > cfg.chunk_size:  # streamed: photos are read again for every UAP, in bounded memory
            return _Source(lambda: ((c.images, c.num_photos) for c in
                                    natural_image_chunks(num, size, chunk_size=cfg.chunk_size, **stream)),
                           num, num_natural=num, photos=photos)
        only = next(natural_image_chunks(num, size, chunk_size=num, **stream))
        return _Source(_fixed(only.images, only.num_photos, cfg.chunk_size), num, num_natural=num, photos=photos)
    num_natural = max(1, int(round(cfg.mix_fraction * num)))
    if num - num_natural > train_images.shape[0]:
        raise ConfigError(f"The 'mixed' source needs {num - num_natural} training images but the run has "
                          f"{train_images.shape[0]}; lower num_source_images or raise mix_fraction.")
    natural = next(natural_image_chunks(num_natural, size, chunk_size=num_natural, **stream))
    mixed = mixed_source(train_images, natural.images, num_natural / num, seed=cfg.seed, num_images=num)
    if grey:  # grey after drawing, so only the drawn training images are read: rgb_to_grey leaves a grey
        mixed = rgb_to_grey(mixed)  # pixel as it is (all 256 values, tested), e.g. the natural crops
    return _Source(_fixed(mixed, natural.num_photos, cfg.chunk_size), num, num_natural=num_natural, photos=photos)


def audit(
    model: nn.Module,
    *,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    train_images: torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    sources: Sequence[str] = ("train", "natural"),
    zetas: Sequence[float] = (0.02, 0.04, 0.08),
    norm: object = "2",
    targeted: int | str | None = None,
    natural_folder: str | Path | None = None,
    num_source_images: int = 256,
    mix_fraction: float = 0.5,
    chunk_size: int = 1024,
    algorithm: str = "batched",
    channels: str = "auto",
    step_fraction: float = DEFAULT_STEP_FRACTION,
    step_norm: str | None = None,
    step_decay: float = 1.0,
    step_scale: str = "fixed",
    max_passes: int = DEFAULT_MAX_PASSES,
    goal_rate: float = DEFAULT_GOAL_RATE,
    batch_size: int = 32,
    num_random: int = 10,
    random_linf: str = "uniform",
    seed: int = 0,
    device: str | torch.device | None = None,
) -> AuditResult:
    """UAP audit of one model (Hirano et al. 2021; Minagi et al. 2022).

    For each source in ``sources`` and each ζ in ``zetas`` (and each target class when
    ``targeted="all"``): compute a UAP from the source images within ξ = ζ·mean‖x_train‖ₚ, draw
    ``num_random`` random controls of its size, evaluate all on the test set and compare the UAP
    with the strongest control by McNemar's exact test on the same test images. A source larger
    than ``chunk_size`` is streamed chunk by chunk, v carried over (Minagi et al.).

    Args:
        model: maps float (N, 3, H, W) in [0, 1] to logits (N, K); normalisation inside.
        test_images: uint8 (N, 3, H, W) or float in [0, 1]; the UAPs are evaluated here. It and
            ``train_images`` may be ``DiskImages`` (the decode cache): they are read in batches and only
            the drawn source rows are held, with the same results as in memory.
        test_labels: int64 (N,) true classes.
        train_images: the model's training images: they set ξ for every source, decide ``auto``
            channels and are the ``train`` source (``num_source_images`` drawn, seeded).
        class_names: K names for the per-class rates; default "0".."K-1".
        sources, zetas, norm, targeted, natural_folder, num_source_images, mix_fraction, chunk_size,
            algorithm, channels, step_fraction, step_norm, step_decay, step_scale, max_passes, goal_rate,
            batch_size, num_random, random_linf, seed: the :class:`AuditConfig` fields of the same
            names (same defaults), validated by building one.
        device: default the model's device.

    Returns:
        An :class:`AuditResult`. Each record has the keys ``source``, ``zeta``, ``xi`` (pixel units),
        ``norm`` ("2" or "inf"), ``targeted``, ``algorithm``, ``channels``, ``perturbation_key``,
        ``perturbation_norm``; the budget: ``budget_source`` ("train"), ``budget_mean_norm``,
        ``budget_num_images``; the source: ``num_source_images``, ``num_natural_images``,
        ``num_photos`` (distinct natural photos the crops came from; None for ``train``), ``natural_photos`` ("builtin" or the folder), ``num_chunks``, ``source_curve``
        ([[source images so far, test rate]] after each chunk); the loop: ``num_passes``,
        ``num_updates``, ``goal_reached``, ``goal_rate``, ``fooling_rate_source`` (per pass),
        ``source_rate_exact`` (per pass), ``source_rate_best``, ``best_pass``, ``step_size``,
        ``step_norm``, ``step_scale``, ``seconds``, ``seed``; for the UAP: ``fooling_rate``, ``fooling_ci_low``,
        ``fooling_ci_high``, ``ci_method``, ``targeted_success`` (+ ``targeted_ci_low``/``_high``),
        ``clean_target_share``, ``clean_accuracy``, ``perturbed_accuracy``, ``per_class``,
        ``confusion``; the random controls: ``random_num_draws``, ``random_linf``,
        ``random_fooling_rate`` (mean over the draws), ``random_fooling_rate_max``,
        ``random_fooling_rates``, ``random_targeted_success`` (mean) and ``_max``, and of the
        strongest draw ``random_ci_low``, ``random_ci_high``, ``random_perturbed_accuracy``,
        ``random_per_class``, ``random_confusion``; McNemar's exact test UAP vs the strongest draw:
        ``mcnemar_p``, ``mcnemar_discordant`` ([UAP only, random only]), ``mcnemar_outcome``
        ("fooled" or "target").

    Raises:
        ConfigError: any invalid field (as :class:`AuditConfig`), no train_images, a ``mixed``
            source larger than the training set allows, or any parameter the registered ``uap``
            attack rejects.
        DataError: bad images or labels, or an unreadable natural-image file.
    """
    cfg = AuditConfig(sources=tuple(sources), zetas=tuple(zetas) if not isinstance(zetas, str) else zetas,
                      norm=norm, targeted=targeted, natural_folder=natural_folder,
                      num_source_images=num_source_images, mix_fraction=mix_fraction, chunk_size=chunk_size,
                      algorithm=algorithm, channels=channels, step_fraction=step_fraction, step_norm=step_norm,
                      step_decay=step_decay, step_scale=step_scale, max_passes=max_passes, goal_rate=goal_rate, batch_size=batch_size,
                      num_random=num_random, random_linf=random_linf, seed=seed)
    test_images = check_images(test_images, "test_images", stream=True)
    if train_images is None:
        raise ConfigError("audit needs train_images: the budget ξ = ζ·mean‖x_train‖ₚ is set by the model's "
                          "training images for every source (Minagi et al.); pass them.")
    train_images = check_images(train_images, "train_images", stream=True)
    dev = model_device(model, device)
    with eval_mode(model):
        num_classes = num_outputs(model, test_images, dev)
    targets = _resolve_targets(cfg.targeted, num_classes)
    mode = resolve_channels(cfg.channels, train_images)
    grey = mode == "grey"
    mean_norm = float(lp_norms(train_images, cfg.norm).mean())
    size = tuple(test_images.shape[-2:])
    with eval_mode(model):
        clean_test = predict(model, test_images, batch_size=cfg.batch_size, device=dev)

    result = AuditResult()
    bar = progress_bar(len(cfg.sources) * len(cfg.zetas) * len(targets), "audit", unit="UAP")
    for source_idx, name in enumerate(cfg.sources):
        source = _build_source(name, cfg, train_images, size, grey)
        for zeta_idx, zeta in enumerate(cfg.zetas):
            xi = zeta * mean_norm
            for target in targets:
                uap_seed = seed + 1000 * source_idx + 100 * zeta_idx + (0 if target is None else target + 1)
                attack = create_attack(
                    "uap", zeta=zeta, norm=cfg.norm, xi=xi, targeted=target, algorithm=cfg.algorithm,
                    channels=mode, step_size=cfg.step_fraction * xi, step_norm=cfg.step_norm,
                    step_decay=cfg.step_decay, step_scale=cfg.step_scale, max_passes=cfg.max_passes, goal_rate=cfg.goal_rate,
                    batch_size=cfg.batch_size, seed=uap_seed, device=dev)
                key = _perturbation_key(name, zeta, cfg.norm, target)
                record, v, control = _one_uap(model, attack, source, cfg, test_images, test_labels, clean_test,
                                              class_names, dev, uap_seed, target)
                record = {"source": name, "zeta": zeta, "xi": xi, "norm": cfg.norm, "targeted": target,
                          "algorithm": cfg.algorithm, "channels": mode, "perturbation_key": key,
                          "budget_source": "train", "budget_mean_norm": mean_norm,
                          "budget_num_images": int(train_images.shape[0]), **record}
                result.records.append(record)
                result.perturbations[key] = v
                result.random_perturbations[key] = control
                bar.set_postfix_str(f"{name} ζ={zeta} fooling {record.get('fooling_rate', float('nan')):.3f}")
                bar.update()
    bar.close()
    return result


def _one_uap(model, attack, source: _Source, cfg: AuditConfig, test_images, test_labels, clean_test, class_names,
             dev, uap_seed: int, target: int | None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Compute one UAP over the source's chunks, its random controls and all their metrics."""
    v, history, exact, curve = None, [], [], []
    seen = passes = updates = num_photos = 0
    seconds, res = 0.0, None
    for chunk_idx, (images, new_photos) in enumerate(source.chunks()):
        num_photos += new_photos
        res = attack.compute(model, images, init=v, seed=uap_seed + 7919 * chunk_idx)
        v = res.perturbation
        history += res.fooling_rate_source
        exact += res.source_rate_exact
        passes, updates, seconds = passes + res.num_passes, updates + res.num_updates, seconds + res.seconds
        seen += images.shape[0]
        if seen < source.num_images:  # the last point is the final evaluation below
            curve.append([seen, float(_test_hits(model, test_images, v, clean_test, target, cfg, dev).double().mean())])
    metrics = evaluate_perturbation(model, test_images, test_labels, v, targeted=target, class_names=class_names,
                                    batch_size=cfg.batch_size, device=dev)
    uap_hits = _test_hits(model, test_images, v, clean_test, target, cfg, dev)
    rate = metrics["fooling_rate"] if target is None else metrics["targeted_success"]
    curve.append([seen, rate])
    draws, draw_hits, draw_fooling, draw_success = [], [], [], []
    with eval_mode(model):
        for d in range(cfg.num_random):
            r = random_control(v, cfg.norm, seed=uap_seed * 10007 + d, channels=res.channels, linf=cfg.random_linf)
            adv = predict(model, test_images, perturbation=r, batch_size=cfg.batch_size, device=dev)
            draws.append(r)
            draw_hits.append(_hits(adv, clean_test, target))
            draw_fooling.append(float((adv != clean_test).double().mean()))
            draw_success.append(None if target is None else float((adv == target).double().mean()))
    strongest = max(range(cfg.num_random), key=lambda d: float(draw_hits[d].double().mean()))
    control = draws[strongest]
    random_metrics = evaluate_perturbation(model, test_images, test_labels, control, targeted=target,
                                           class_names=class_names, batch_size=cfg.batch_size, device=dev)
    test = mcnemar_test(uap_hits, draw_hits[strongest])
    record = {
        "perturbation_norm": perturbation_norm(v, cfg.norm),
        "num_source_images": source.num_images,
        "num_natural_images": source.num_natural,
        "num_photos": num_photos if source.photos is not None else None,
        "natural_photos": source.photos,
        "num_chunks": len(curve),
        "source_curve": curve,
        "num_test_images": metrics["num_images"],
        "num_passes": passes,
        "num_updates": updates,
        "goal_reached": res.goal_reached,
        "goal_rate": res.goal_rate,
        "fooling_rate_source": history,
        "source_rate_exact": exact,
        "source_rate_best": res.best_rate,
        "best_pass": res.best_pass,
        "step_size": res.step_size,
        "step_norm": res.step_norm,
        "step_scale": res.step_scale,
        "seconds": seconds,
        "seed": uap_seed,
    }
    record.update({k: val for k, val in metrics.items() if k not in ("num_images", "targeted")})
    record.update({
        "random_num_draws": cfg.num_random,
        "random_linf": cfg.random_linf,
        "random_fooling_rate": sum(draw_fooling) / len(draw_fooling),
        "random_fooling_rate_max": max(draw_fooling),
        "random_fooling_rates": draw_fooling,
        "random_targeted_success": None if target is None else sum(draw_success) / len(draw_success),
        "random_targeted_success_max": None if target is None else max(draw_success),
        "random_ci_low": random_metrics["fooling_ci_low"],
        "random_ci_high": random_metrics["fooling_ci_high"],
        "random_perturbed_accuracy": random_metrics["perturbed_accuracy"],
        "random_per_class": random_metrics["per_class"],
        "random_confusion": random_metrics["confusion"],
        "mcnemar_p": test["p_value"],
        "mcnemar_discordant": [test["only_a"], test["only_b"]],
        "mcnemar_outcome": "fooled" if target is None else "target",
    })
    return record, v, control


def _hits(adv: torch.Tensor, clean: torch.Tensor, target: int | None) -> torch.Tensor:
    """Per test image: fooled (non-targeted) or predicted as the target (targeted), bool (N,)."""
    return (adv != clean) if target is None else (adv == target)


def _test_hits(model, test_images, v, clean_test, target, cfg: AuditConfig, dev) -> torch.Tensor:
    with eval_mode(model):
        adv = predict(model, test_images, perturbation=v, batch_size=cfg.batch_size, device=dev)
    return _hits(adv, clean_test, target)
