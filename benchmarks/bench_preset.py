"""What a literature preset costs: the davila2024 sweep on a generated MedMNIST-sized set.

The preset (``medtune preset show davila2024``) is 8 strategies × ResNet-50, DenseNet-121, VGG-19 ×
3 seeds × a 3-value learning-rate grid = 216 runs of up to 10 epochs (patience 3). This script writes
a MedMNIST-format ``.npz`` (``train/val/test_images`` (N, 28, 28, 3) uint8, ``*_labels`` (N, 1);
70/10/20 splits, MedMNIST's proportions) of learnable shapes on noise (``medtune.data.make_synthetic``),
then runs the preset through the public API (``medtune.sweep``, the same path as
``medtune sweep --preset davila2024``) with random-init weights (``weights: none``: timing only) into
a temporary store, one sweep per architecture, once per ``--workers`` value, and prints wall time,
images/s and epochs per architecture (and per strategy: which ones dominate).

Input size: MedMNIST's images are 28 px, but VGG-19's five 2× max-pools need 32 px and DenseNet-121
29 px (medtune refuses smaller, naming the size), so the set is upsampled to the smallest size every
architecture of the preset takes — found by ``check_input_size``, i.e. 32 px — instead of the
preset's 224 (49× the pixels).

Threads: with ``--workers W`` each run gets ``--cores // W`` torch threads (``num_threads``), so the
pool never oversubscribes the cores.

``--quick``: one architecture (``--quick-arch``, default resnet50) and one seed: its 24 runs
(8 strategies × 3 LRs) are timed, and the full preset is extrapolated by

    T_full ≈ Σ_arch  T_quick × c_arch / c_quick × num_seeds

where c_arch is each architecture's seconds per training image, measured in the same process
by a few timed full-fine-tuning steps (forward, backward, AdamW) at the preset's batch size and
input size. It assumes every architecture stops early after as many epochs per strategy as the
quick one, and that a strategy's cost is the same share of an architecture's full-training cost on
every architecture (frozen prefixes and the linear probe cost less everywhere). Seeds cost alike.

    python benchmarks/bench_preset.py --quick --workers 1,2          # an estimate in minutes
    python benchmarks/bench_preset.py --workers 2                    # the whole preset
    python benchmarks/bench_preset.py --quick --num-images 500 --epochs 2   # a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import medtune
from medtune.data import make_synthetic
from medtune.errors import ConfigError
from medtune.models import create_model
from medtune._tensors import cpu_has_native_bf16
from medtune.models._builder import check_input_size
from medtune.presets import get_preset
from medtune.sweeps import expand_sweep, load_sweep_config

GOAL_S = 3600.0


def write_npz(path: Path, num_images: int, px: int, num_classes: int, seed: int = 0) -> None:
    """A MedMNIST-format file: learnable shapes on noise, splits 70/10/20."""
    data = make_synthetic(num_samples=num_images, img_size=px, num_classes=num_classes, seed=seed)
    images = data.images.permute(0, 2, 3, 1).numpy()  # (N, H, W, 3), as MedMNIST's RGB sets
    labels = data.labels.numpy().astype(np.uint8)[:, None]
    order = np.random.default_rng(seed).permutation(num_images)
    n_train, n_val = int(0.7 * num_images), int(0.1 * num_images)
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    np.savez(path, **{f"{s}_images": images[idx] for s, idx in parts.items()},
             **{f"{s}_labels": labels[idx] for s, idx in parts.items()})


def smallest_common_size(archs: list[str], start: int) -> int:
    """The smallest side >= ``start`` that every architecture takes (medtune's own input-size check)."""
    for size in range(start, 4096):
        try:
            for arch in archs:
                check_input_size(arch, size)
            return size
        except ConfigError:
            continue
    raise SystemExit(f"no input size below 4096 px works for {archs}")


def train_cost(arch: str, px: int, batch_size: int, threads: int, steps: int = 6, bf16: bool = False) -> float:
    """Seconds per training image of full fine-tuning: the fastest of ``steps`` timed steps after a
    warm-up (the minimum, as ``timeit`` advises: other load only ever adds time); ``bf16``: under
    CPU bfloat16 autocast, as ``amp: on``."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(arch, num_classes=3, weights="none").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    x = torch.rand(batch_size, 3, px, px)
    y = torch.randint(0, 3, (batch_size,))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    return min(times) / batch_size


def run_arch(preset: dict, arch: str, seeds: list[int], workers: int, threads: int, overrides: dict,
             store: Path) -> dict:
    """One sweep of the preset restricted to ``arch`` and ``seeds``; its wall time and what the runs report."""
    t0 = time.perf_counter()
    records = medtune.sweep(dict(preset, arch=[arch], seeds=seeds), store=str(store), workers=workers,
                            num_threads=threads, progress=False, **overrides)
    wall = time.perf_counter() - t0
    images = sum(r["images_per_s"] * r["train_seconds"] for r in records if r["train_seconds"] > 0)
    by_strategy: dict[str, float] = defaultdict(float)
    for r in records:
        by_strategy[r["strategy"]] += r["train_seconds"]
    return {"arch": arch, "workers": workers, "threads": threads, "runs": len(records), "wall_s": wall,
            "train_s": sum(r["train_seconds"] for r in records), "images": images,
            "epochs": sum(len(r["history"]) for r in records), "by_strategy": dict(by_strategy)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="davila2024")
    p.add_argument("--quick", action="store_true", help="one architecture, one seed; extrapolate to the preset")
    p.add_argument("--quick-arch", default="resnet50")
    p.add_argument("--workers", default="1,2", help="sweep --workers values to time, comma-separated")
    p.add_argument("--cores", type=int, default=2, help="CPU cores to share among the workers")
    p.add_argument("--num-images", type=int, default=5000)
    p.add_argument("--px", type=int, default=28, help="side of the generated images (MedMNIST: 28)")
    p.add_argument("--num-classes", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs (smoke tests only)")
    p.add_argument("--archs", default=None, help="override the preset's architectures, comma-separated")
    p.add_argument("--strategies", default=None, help="override the preset's strategies (smoke tests only)")
    p.add_argument("--amp", default=None, choices=("auto", "off", "on"),
                   help="the runs' amp (default: the preset's; on = bf16 autocast on a CPU with AMX/AVX-512-BF16)")
    p.add_argument("--probe-only", action="store_true",
                   help="no sweep: only the per-architecture step costs and the full-fine-tuning bound")
    p.add_argument("--store", default=None, help="a folder for the stores (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    preset = get_preset(args.preset)
    if args.strategies:
        preset["strategy"] = args.strategies.split(",")
    archs = args.archs.split(",") if args.archs else list(preset["arch"])
    seeds = list(preset["seeds"])
    workers_list = [int(w) for w in args.workers.split(",")]
    px = smallest_common_size(archs, args.px)
    tmp = tempfile.TemporaryDirectory(prefix="bench_preset_") if args.store is None else None
    root = Path(args.store or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    data = root / "benchmnist.npz"
    write_npz(data, args.num_images, args.px, args.num_classes)
    overrides = {"data": str(data), "weights": "none", "img_size": px, "device": "cpu"}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.amp is not None:
        overrides["amp"] = args.amp

    full_cfg = load_sweep_config(dict(preset, arch=archs), **overrides)
    notes: list[str] = []
    num_runs = len(expand_sweep(full_cfg, log=notes.append))
    base = full_cfg.base
    grid = len(full_cfg.strategy) * len(archs) * len(seeds) * len(full_cfg.lr)
    print(f"preset {args.preset}: {len(full_cfg.strategy)} strategies × {len(archs)} archs × {len(seeds)} seeds × "
          f"{len(full_cfg.lr)} LRs = {grid} grid cells, {num_runs} runs, up to {base.epochs} epochs each "
          f"(patience {base.patience}), batch {base.batch_size}")
    for note in notes:
        print(f"  ({note})")
    print(f"data: {args.num_images} generated images of {args.px} px ({args.num_classes} classes, 70/10/20), "
          f"fed at {px} px (the smallest size every arch takes; the preset says {preset.get('img_size')}); "
          f"weights: none; {args.cores} cores; torch {torch.__version__}")

    run_archs, run_seeds = ([args.quick_arch], seeds[:1]) if args.quick else (archs, seeds)
    rows = []
    for workers in [] if args.probe_only else workers_list:
        threads = max(1, args.cores // workers)
        for arch in run_archs:
            row = run_arch(preset, arch, run_seeds, workers, threads, overrides, root / f"store_w{workers}")
            rows.append(row)
            print(f"  workers {workers}: {arch} {row['runs']} runs in {row['wall_s']:.1f} s", flush=True)

    print()
    print(f"{'arch':<14}{'workers':>8}{'runs':>6}{'epochs':>8}{'wall s':>10}{'train s':>10}{'img/s wall':>12}"
          f"{'img/s train':>12}")
    for r in rows:
        print(f"{r['arch']:<14}{r['workers']:>8}{r['runs']:>6}{r['epochs']:>8}{r['wall_s']:>10.1f}{r['train_s']:>10.1f}"
              f"{r['images'] / r['wall_s']:>12.1f}{r['images'] / max(r['train_s'], 1e-9):>12.1f}")
    print("\ntraining seconds per strategy (all seeds and LRs), which dominate:")
    for r in rows:
        parts = sorted(r["by_strategy"].items(), key=lambda kv: -kv[1])
        print(f"  {r['arch']} (workers {r['workers']}): " + ", ".join(f"{k} {v:.0f}s" for k, v in parts))

    smoke = (args.epochs is not None or args.strategies or args.archs or args.num_images != 5000 or args.px != 28)
    if smoke:
        print("(smoke settings: epochs, strategies, architectures or the data differ from the preset's benchmark; "
              "the goal check below is for these settings, not the preset)")
    result = {"preset": args.preset, "smoke": bool(smoke), "num_runs": num_runs, "img_size": px, "num_images": args.num_images,
              "cores": args.cores, "quick": args.quick, "rows": rows}
    print()
    if args.quick or args.probe_only:
        bf16 = args.amp == "on"
        costs = {arch: train_cost(arch, px, base.batch_size, args.cores, bf16=bf16) for arch in archs}
        print(f"seconds per training image, full fine-tuning{' (bf16 autocast)' if bf16 else ''}: " +
              ", ".join(f"{a} {c * 1e3:.2f} ms" for a, c in costs.items()))
        if args.probe_only and not bf16 and cpu_has_native_bf16():
            other = {arch: train_cost(arch, px, base.batch_size, args.cores, bf16=True) for arch in archs}
            print("  under bf16 autocast (amp: on; this CPU supports it): " +
                  ", ".join(f"{a} {c * 1e3:.2f} ms ({costs[a] / c:.2f}×)" for a, c in other.items()))
            result["costs_bf16"] = other
        num_train = int(0.7 * args.num_images)
        bound = sum(costs.values()) * num_runs / len(archs) * base.epochs * num_train
        print(f"bound if every run trained all {base.epochs} epochs at full fine-tuning's cost ({num_train} training "
              f"images, evaluation not counted): {bound:.0f} s ({bound / 3600:.2f} h) on {args.cores} cores")
        result.update(costs=costs, full_ft_bound_s=bound)
        estimates = {}
        for r in rows:
            est = sum(r["wall_s"] * costs[a] / costs[args.quick_arch] * len(seeds) for a in archs)
            estimates[r["workers"]] = est
            epochs_note = (f"; without early stopping ≈ {est * r['runs'] * base.epochs / r['epochs']:.0f} s"
                           if r["epochs"] else "")
            print(f"estimated full preset, workers {r['workers']}: {est:.0f} s ({est / 3600:.2f} h){epochs_note} — "
                  f"goal ≤ {GOAL_S:.0f} s: {'met' if est <= GOAL_S else 'NOT met'}")
        result.update(costs=costs, estimates=estimates)
    else:
        for workers in workers_list:
            total = sum(r["wall_s"] for r in rows if r["workers"] == workers)
            print(f"full preset, workers {workers}: {total:.0f} s ({total / 3600:.2f} h) — goal ≤ {GOAL_S:.0f} s: "
                  f"{'met' if total <= GOAL_S else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
