"""Wall time of medtune's UAP against IBM ART's per-image UniversalPerturbation(fgsm), on a real backbone.

The model: EfficientNet-Lite0 with its offline ImageNet weights, fully fine-tuned here for a few
epochs on the built-in demo data (IHC patches, 64 px). Source: the demo's training split; test:
its test split. Same ξ (ζ·mean‖x_train‖ₚ), FGSM step and seed for every method; every perturbation is
scored by the same ``evaluate_perturbation``. Two comparisons, each repeated and interleaved
(ART, medtune, ART, medtune, ...; medians):

* equal passes: ART and medtune (batched and reference) run ``--passes`` passes (goal 1.0, so
  none stops early);
* equal test fooling: the time medtune's batched loop needs to reach ART's test fooling rate after
  ``--passes`` passes: medtune runs 1, 2, ... passes (each run from scratch, timed whole) until the v
  it returns fools at least as many test images as ART's.

Each comparison is made for every ``--step-scales`` value of medtune's batched loop (``sqrt_batch``, the
default: √(images still to fool in the batch) × the step size; ``fixed``: the step size of every step;
``batch``: n × it) and every ``--pushes`` value (``dominant``, the default: towards the class v already
sends most fooled images to; ``away``: from each image's label, ART's), against the same ART runs.
``--batch-size`` is medtune's images per step (default the library's, 16); ART steps per image. ``--arch`` picks the model (Lite0, Lite1 or Lite2).
``--seeds N`` runs both loops with shuffle seeds 0..N-1 and compares mean test fooling over seeds: one
run of either loop is a single sample (on one model, ART's fooling after 2 passes moved from 0.33 to
0.57 between a 1- and a 2-thread run of the same seed, float noise flipping its accept decisions).

ART is a test/benchmark dependency (``pip install -e ".[test]"``).

    PYTHONPATH=src python benchmarks/bench_uap_vs_art.py [--threads 2] [--passes 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np
import torch
from torch import nn

from medtune.data.demo import make_demo
from medtune.models import create_model
from medtune.robustness import AuditConfig, UAPParams, budget_xi, compute_uap, evaluate_perturbation


def fine_tune(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, epochs: int,
              arch: str = "tf_efficientnet_lite0") -> nn.Module:
    torch.manual_seed(0)  # a script, not library code
    model = create_model(arch, num_classes=num_classes, weights=arch.removeprefix("tf_"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = train_x.float() / 255
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(x.shape[0]).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), train_y[idx]).backward()
            opt.step()
    return model.eval()


def run_art(model, images, *, xi, norm, step, passes, num_classes, seed=0):
    from art.attacks.evasion import UniversalPerturbation
    from art.estimators.classification import PyTorchClassifier

    art_norm = 2 if norm == "2" else np.inf
    classifier = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(images.shape[1:]),
                                   nb_classes=num_classes, clip_values=(0.0, 1.0), device_type="cpu")
    attack = UniversalPerturbation(classifier, attacker="fgsm", attacker_params={"eps": step, "norm": art_norm},
                                   delta=0.0, max_iter=passes, eps=xi, norm=art_norm, verbose=False)
    x = (images.float() / 255).numpy()
    random.seed(seed)  # ART shuffles with the global `random` module
    start = time.perf_counter()
    attack.generate(x)
    return torch.from_numpy(attack.noise[0]).float(), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="tf_efficientnet_lite0",
                        help="tf_efficientnet_lite0/1/2 (offline ImageNet weights)")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--passes", type=int, default=2, help="ART's passes (and medtune's at equal passes)")
    parser.add_argument("--max-medtune-passes", type=int, default=15)
    parser.add_argument("--zeta", type=float, default=0.04)
    parser.add_argument("--step-fraction", type=float, default=0.2, help="ART's FGSM step as a fraction of ξ")
    parser.add_argument("--medtune-step-fraction", type=float, default=None,
                        help="medtune's step as a fraction of ξ (default: the audit's, AuditConfig.step_fraction)")
    parser.add_argument("--batch-size", type=int, default=UAPParams().batch_size, help="medtune's (default: the library's)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=1,
                        help="shuffle seeds 0..N-1 of both loops: fooling is the mean over seeds (one run of either "
                             "loop is one sample: float noise alone moves ART's accept decisions), times the median")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--norms", default="2,inf")
    parser.add_argument("--num-source-images", type=int, default=96, help="first N training images")
    parser.add_argument("--reference", action="store_true", help="also time medtune's reference mode (once)")
    parser.add_argument("--step-scales", default="sqrt_batch,fixed,batch",
                        help="batched step scales to compare (sqrt_batch: the default)")
    parser.add_argument("--pushes", default="dominant,away",
                        help="batched pushes to compare, each with every step scale (dominant: the default)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = make_demo(img_size=args.img_size)
    train, test = data.split("train"), data.split("test")
    num_classes = len(data.class_names)
    t0 = time.perf_counter()
    model = fine_tune(train.images, train.labels, num_classes, args.epochs, args.arch)
    with torch.no_grad():
        acc = (model(test.images.float() / 255).argmax(1) == test.labels).float().mean().item()
    print(f"{args.arch} (offline ImageNet weights) fine-tuned {args.epochs} epochs at {args.img_size} px in "
          f"{time.perf_counter() - t0:.0f} s; clean test accuracy {acc:.3f}; {min(args.num_source_images, len(train.images))} source / "
          f"{test.images.shape[0]} test images; ζ={args.zeta}, ART step={args.step_fraction}·ξ, medtune step="
          f"{args.medtune_step_fraction or AuditConfig().step_fraction}·ξ, batch {args.batch_size}, "
          f"{torch.get_num_threads()} thread(s), {args.repeats} interleaved repeats × {args.seeds} seed(s) "
          "(fooling: mean over seeds [min, max]; seconds: median)")
    source = train.images[: args.num_source_images]

    def fooling(v: torch.Tensor) -> float:
        return evaluate_perturbation(model, test.images, None, v)["fooling_rate"]

    ours_fraction = args.medtune_step_fraction or AuditConfig().step_fraction

    def ours(norm: str, passes: int, algorithm: str = "batched", variant: tuple[str, str] = ("fixed", "away"),
             seed: int = 0):
        fraction = args.step_fraction if algorithm == "reference" else ours_fraction
        step_scale, push = variant if algorithm == "batched" else ("fixed", "away")
        res = compute_uap(model, source, zeta=args.zeta, norm=norm, step_size=fraction * budget_xi(
            source, args.zeta, norm), max_passes=passes, goal_rate=1.0, batch_size=args.batch_size,
            algorithm=algorithm, step_scale=step_scale, push=push, seed=seed)
        return res.perturbation, res.seconds

    def summary(values: list[float]) -> tuple[float, float, float]:
        return statistics.mean(values), min(values), max(values)

    scales = [(scale, push) for scale in args.step_scales.split(",") for push in args.pushes.split(",")]
    rows = []
    for norm in args.norms.split(","):
        xi = budget_xi(source, args.zeta, norm)
        art_s, ref_s, art_f = [], [], {}
        bat_s: dict[str, list[float]] = {scale: [] for scale in scales}
        bat_f: dict[str, dict[int, float]] = {scale: {} for scale in scales}
        for _ in range(args.repeats):  # interleaved, so load changes hit all alike
            for seed in range(args.seeds):
                v_art, s = run_art(model, source, xi=xi, norm=norm, step=args.step_fraction * xi, passes=args.passes,
                                   num_classes=num_classes, seed=seed)
                art_s.append(s)
                art_f[seed] = fooling(v_art)
                for scale in scales:
                    v, s = ours(norm, args.passes, variant=scale, seed=seed)
                    bat_s[scale].append(s)
                    bat_f[scale][seed] = fooling(v)
        if args.reference:
            v_ref, s = ours(norm, args.passes, "reference")
            ref_s.append(s)
        art_fool = summary(list(art_f.values()))
        ref_fool = fooling(v_ref) if args.reference else float("nan")
        for scale in scales:
            # equal test fooling: fewest batched passes whose mean v over seeds reaches ART's mean test fooling
            reach_passes, reach_s, reach_fool = None, None, None
            for k in range(1, args.max_medtune_passes + 1):
                times, fools = [], []
                for seed in range(args.seeds):
                    for _ in range(args.repeats):
                        v_k, s = ours(norm, k, variant=scale, seed=seed)
                        times.append(s)
                    fools.append(fooling(v_k))
                if statistics.mean(fools) >= art_fool[0]:
                    reach_passes, reach_s, reach_fool = k, statistics.median(times), summary(fools)
                    break
            rows.append((norm, scale, statistics.median(art_s), art_fool, statistics.median(bat_s[scale]),
                         summary(list(bat_f[scale].values())), statistics.median(ref_s) if ref_s else float("nan"),
                         ref_fool, reach_passes, reach_s, reach_fool))

    print(f"\n| norm | step scale, push | ART s ({args.passes} passes) | ART test fooling | medtune batched s | fooling | "
          "ART/medtune (equal passes) | medtune reference s | fooling | ART/reference | batched passes to ART's "
          "fooling | s | fooling | ART/medtune (equal fooling) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    def rate(f: tuple[float, float, float]) -> str:
        return f"{f[0]:.3f}" if args.seeds == 1 else f"{f[0]:.3f} [{f[1]:.3f}, {f[2]:.3f}]"

    for norm, scale, art, af, bat, bf, ref, rf, kp, ks, kf in rows:
        reach = (f"{kp} | {ks:.2f} | {rate(kf)} | **{art / ks:.1f}×**" if kp is not None else
                 f"not reached in {args.max_medtune_passes} | – | – | –")
        print(f"| L{norm} | {scale[0]}, {scale[1]} | {art:.2f} | {rate(af)} | {bat:.2f} | {rate(bf)} | **{art / bat:.1f}×** | {ref:.2f} | "
              f"{rf:.3f} | {art / ref:.1f}× | {reach} |")


if __name__ == "__main__":
    main()
