"""Wall time of medtune's batched UAP against IBM ART's per-image UniversalPerturbation(fgsm).

Same model, source images, norm, budget ξ, FGSM step and number of passes (goal 1.0 so neither
stops early); both perturbations are scored with the same ``evaluate_perturbation``. ART is a
benchmark-only dependency: ``pip install adversarial-robustness-toolbox``.

    PYTHONPATH=src python benchmarks/bench_uap_vs_art.py [--num-images 256] [--passes 3]
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch
from torch import nn

from medtune.robustness import budget_xi, compute_uap, evaluate_perturbation

NUM_CLASSES = 3


class SmallCNN(nn.Module):
    """Normalize -> [conv3x3 -> BN -> ReLU -> maxpool] x 2 -> conv -> global pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((x - self.mean) / self.std))


def colour_task(
    num: int, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy grey images whose class is the channel raised by a random margin (uint8, int64)."""
    labels = torch.randint(0, NUM_CLASSES, (num,), generator=generator)
    delta = 0.02 + 0.06 * torch.rand(num, generator=generator)
    offset = -0.5 * delta[:, None].repeat(1, 3)
    offset[torch.arange(num), labels] = delta
    x = 0.5 + 0.1 * torch.randn(num, 3, size, size, generator=generator) + offset[:, :, None, None]
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), labels


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x = images.float() / 255
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), labels).backward()
        opt.step()
    return model.eval()


def run_art(model, images, *, xi, norm, step, passes):
    from art.attacks.evasion import UniversalPerturbation
    from art.estimators.classification import PyTorchClassifier

    art_norm = 2 if norm == "2" else np.inf
    classifier = PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(images.shape[1:]),
        nb_classes=NUM_CLASSES,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )
    attack = UniversalPerturbation(
        classifier,
        attacker="fgsm",
        attacker_params={"eps": step, "norm": art_norm},
        delta=0.0,
        max_iter=passes,
        eps=xi,
        norm=art_norm,
        verbose=False,
    )
    x = (images.float() / 255).numpy()
    random.seed(0)  # ART shuffles with the global `random` module
    start = time.perf_counter()
    attack.generate(x)
    return torch.from_numpy(attack.noise[0]).float(), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--zeta", type=float, default=0.08)
    parser.add_argument("--step-fraction", type=float, default=0.3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # model init; a script, not library code
    train_x, train_y = colour_task(512, args.img_size, generator)
    test_x, test_y = colour_task(256, args.img_size, generator)
    model = train(SmallCNN(), train_x, train_y, steps=60)
    source = train_x[: args.num_images]
    with torch.no_grad():
        acc = (model(test_x.float() / 255).argmax(1) == test_y).float().mean().item()
    params = sum(p.numel() for p in model.parameters())
    print(
        f"SmallCNN ({params} params), {args.num_images} source images of {args.img_size}px, "
        f"{args.passes} passes, zeta={args.zeta}, step={args.step_fraction}*xi, "
        f"{torch.get_num_threads()} thread(s); clean test accuracy {acc:.3f}"
    )
    print(
        f"{'norm':>5} {'medtune s':>10} {'ART s':>8} {'ART/medtune':>12} {'fool medtune':>13} {'fool ART':>9}"
    )
    for norm in ("2", "inf"):
        xi = budget_xi(source, args.zeta, norm)
        step = args.step_fraction * xi
        ours = compute_uap(
            model,
            source,
            zeta=args.zeta,
            norm=norm,
            step_size=step,
            max_passes=args.passes,
            goal_rate=1.0,
            batch_size=args.batch_size,
        )
        theirs, art_seconds = run_art(
            model, source, xi=xi, norm=norm, step=step, passes=args.passes
        )
        if ours.num_passes != args.passes:
            raise RuntimeError("medtune stopped early; the comparison needs equal passes")
        fool_ours = evaluate_perturbation(model, test_x, None, ours.perturbation)["fooling_rate"]
        fool_art = evaluate_perturbation(model, test_x, None, theirs)["fooling_rate"]
        print(
            f"{norm:>5} {ours.seconds:10.3f} {art_seconds:8.3f} {art_seconds / ours.seconds:12.1f} "
            f"{fool_ours:13.3f} {fool_art:9.3f}"
        )


if __name__ == "__main__":
    main()
