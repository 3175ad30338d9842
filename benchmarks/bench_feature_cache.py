"""A Kandel-style top-k sweep (every k) with and without the frozen-prefix feature cache.

ResNet-18 at 64 px on a few thousand in-memory images, 5 epochs, no augmentation: prints the end
to end seconds of both sweeps, their ratio (goal >= 3x) and the largest difference between the
two sweeps' test metrics (they must agree to float tolerance).

    python benchmarks/bench_feature_cache.py [--arch resnet18] [--images 2000] [--epochs 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from medtune.config import RunConfig
from medtune.data import make_synthetic
from medtune.models import create_model, get_blocks
from medtune.strategies import create_strategy
from medtune.training.cache import FEATURE_CACHE
from medtune.training.loop import fit


def sweep(arch: str, data, cfg: RunConfig) -> tuple[float, list[dict]]:
    FEATURE_CACHE.clear()
    t0 = time.perf_counter()
    metrics = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        probe = create_model(arch, num_classes=data.num_classes, weights="none")
    for k in range(len(get_blocks(probe))):
        model = create_model(arch, num_classes=data.num_classes, weights="none")
        model.load_state_dict(probe.state_dict())  # the same "pretrained" weights for every k
        strategy = create_strategy(f"top_k:{k}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            result = fit(model, data, strategy, cfg, blocks=get_blocks(model))
        metrics.append(result.test_metrics)
    return time.perf_counter() - t0, metrics


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=5)
    args = p.parse_args()
    data = make_synthetic(num_samples=args.images, img_size=args.img_size, num_classes=4, seed=0)
    cfg = RunConfig(epochs=args.epochs, batch_size=64, lr=1e-3, img_size=args.img_size, device="cpu", augment="none")
    t_off, m_off = sweep(args.arch, data, cfg.replace(feature_cache="off"))
    t_on, m_on = sweep(args.arch, data, cfg)
    diff = max(abs(a[k] - b[k]) for a, b in zip(m_off, m_on) for k in a)
    print(f"{args.arch} at {args.img_size}px, {args.images} images ({(data.splits == 'train').sum()} train), "
          f"{args.epochs} epochs, top_k for k = 0..{len(m_on) - 1}, {torch.get_num_threads()} threads")
    print(f"without cache: {t_off:7.1f} s")
    print(f"with cache   : {t_on:7.1f} s")
    print(f"speed-up     : {t_off / t_on:.2f}x  (goal >= 3x); max |test metric difference| = {diff:.2e}")


if __name__ == "__main__":
    main()
