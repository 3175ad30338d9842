"""CPU (or GPU) float32 vs. bfloat16 autocast: training and evaluation images/s and the test-metric difference.

On the built-in demo data (IHC patches; 240 train / 90 val / 90 test images) at ``--img-size``, each
backbone is fine-tuned with strategy ``full`` by medtune's ``fit`` once with ``amp: off`` (float32)
and once with ``amp: on`` (bf16 autocast), same seed, same data order. Repeats are interleaved
(fp32, bf16, bf16, fp32, ...) so load from other processes falls on both alike; the table gives the
medians. Training images/s is ``FitResult.images_per_s`` (training epochs only); evaluation
images/s times ``evaluate`` on the test split in the same precision. The test metrics of one
precision are the same in every repeat (same seed, deterministic CPU kernels), so their difference
is the effect of bf16, not of noise between seeds; ``--seeds`` adds seeds to show the seed-to-seed
spread it should be compared with.

    PYTHONPATH=src python benchmarks/bench_bf16.py [--archs resnet18,tf_efficientnet_lite0] \
        [--img-size 64] [--epochs 3] [--repeats 3] [--seeds 0] [--channels-last off] \
        [--threads N] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import _clock  # noqa: E402  (benchmarks/_clock.py: --threads and --clock)
from medtune._tensors import cpu_has_native_bf16, resolve_amp_dtype
from medtune.config import RunConfig
from medtune.runner import build_run, prepare_data
from medtune.training.loop import evaluate, fit

CLOCK = time.perf_counter

#: offline weights for the backbones that have them (README: ``weights: efficientnet_lite0``)
WEIGHTS = {"tf_efficientnet_lite0": "efficientnet_lite0"}


def one_run(arch: str, amp: str, args, seed: int) -> dict:
    cfg = RunConfig(data="demo", arch=arch, weights=WEIGHTS.get(arch, "none"), strategy="full", epochs=args.epochs,
                    img_size=args.img_size, batch_size=args.batch_size, lr=args.lr, seed=seed, device=args.device,
                    amp=amp, channels_last=args.channels_last, feature_cache="off", progress=False)
    data = prepare_data(cfg)
    device = torch.device(args.device)
    _, model, blocks = build_run(cfg, data, device)
    result = fit(model, data, cfg.strategy.create(), cfg, blocks=blocks)
    test = data.split("test")
    dtype = resolve_amp_dtype(amp, device)
    channels_last = args.channels_last == "on"
    evaluate(model, test, batch_size=args.batch_size, channels_last=channels_last, autocast_dtype=dtype)  # warm
    t0 = CLOCK()
    for _ in range(args.eval_repeats):
        evaluate(model, test, batch_size=args.batch_size, channels_last=channels_last, autocast_dtype=dtype)
    eval_ips = args.eval_repeats * len(test) / (CLOCK() - t0)
    return {"train": result.images_per_s, "eval": eval_ips, "precision": result.precision,
            "acc": result.test_metrics["accuracy"], "auc": result.test_metrics["auc"]}


def main() -> None:
    global CLOCK
    p = argparse.ArgumentParser()
    p.add_argument("--archs", default="resnet18,tf_efficientnet_lite0")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eval-repeats", type=int, default=3)
    p.add_argument("--seeds", default="0", help="comma-separated; the first is timed, every one is scored")
    p.add_argument("--channels-last", default="off", choices=("off", "on"))
    p.add_argument("--device", default="cpu")
    _clock.add_args(p)
    args = p.parse_args()
    CLOCK = _clock.setup(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"device {args.device}, {torch.get_num_threads()} threads, native bf16 (AMX / AVX-512-BF16): "
          f"{cpu_has_native_bf16()}; demo data at {args.img_size}px, full fine-tuning {args.epochs} epochs, "
          f"batch {args.batch_size}, channels_last {args.channels_last}, {args.clock} clock, {args.repeats} interleaved repeats")
    rows = []
    for arch in args.archs.split(","):
        runs: dict[str, list[dict]] = {"off": [], "on": []}
        for r in range(args.repeats):
            for amp in (("off", "on") if r % 2 == 0 else ("on", "off")):
                runs[amp].append(one_run(arch, amp, args, seeds[0]))
                x = runs[amp][-1]
                print(f"  {arch} repeat {r + 1} {x['precision']}: train {x['train']:.1f} img/s, eval "
                      f"{x['eval']:.1f} img/s, test acc {x['acc']:.4f} auc {x['auc']:.4f}", flush=True)
        scores = {amp: [(runs[amp][0]["acc"], runs[amp][0]["auc"])] + [
            (x["acc"], x["auc"]) for x in (one_run(arch, amp, args, s) for s in seeds[1:])] for amp in runs}
        med = {amp: {k: statistics.median(x[k] for x in runs[amp]) for k in ("train", "eval")} for amp in runs}
        train_ratios = [b["train"] / a["train"] for a, b in zip(runs["off"], runs["on"])]
        eval_ratios = [b["eval"] / a["eval"] for a, b in zip(runs["off"], runs["on"])]
        rows.append((arch, med, statistics.median(train_ratios), statistics.median(eval_ratios), scores))
    print("\n| backbone | fp32 train img/s | bf16 train img/s | bf16/fp32 train | fp32 eval img/s | bf16 eval img/s "
          "| bf16/fp32 eval | test acc fp32 → bf16 | test AUC fp32 → bf16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arch, med, tr, ev, scores in rows:
        acc = " ; ".join(f"{a[0]:.3f} → {b[0]:.3f}" for a, b in zip(scores["off"], scores["on"]))
        auc = " ; ".join(f"{a[1]:.4f} → {b[1]:.4f}" for a, b in zip(scores["off"], scores["on"]))
        print(f"| {arch} | {med['off']['train']:.1f} | {med['on']['train']:.1f} | **{tr:.2f}×** | {med['off']['eval']:.1f} "
              f"| {med['on']['eval']:.1f} | **{ev:.2f}×** | {acc} | {auc} |")
    print(f"(seeds {args.seeds} for the metrics; ratios are medians of the per-repeat ratios)")


if __name__ == "__main__":
    main()
