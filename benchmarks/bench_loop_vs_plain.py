"""medtune's training loop vs. a minimal hand-written PyTorch loop: same model, batch, optimiser, data.

Prints images/s of both and the ratio medtune/plain (goal ≥ 0.95), measured in the same run.

    python benchmarks/bench_loop_vs_plain.py [--arch resnet18] [--img-size 64] [--batch-size 64] [--images 1024]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from medtune.config import RunConfig
from medtune.data.base import ImageSet
from medtune.models import create_model, get_blocks
from medtune.strategies import create_strategy
from medtune._tensors import resolve_device
from medtune.training.loop import fit


def make_data(n: int, size: int) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n + 64, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 2, (n + 64,), generator=g)
    splits = np.array(["train"] * n + ["val"] * 32 + ["test"] * 32)
    return ImageSet(images=images, labels=labels, splits=splits, class_names=["a", "b"], task="binary",
                    ids=[str(i) for i in range(n + 64)])


def plain_loop(model, images, labels, epochs, batch_size, lr, device):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    images, labels = images.to(device), labels.to(device)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=g)
        for b in range(0, len(images), batch_size):
            idx = order[b:b + batch_size].to(device)
            x = images[idx].float().div_(255)
            loss = loss_fn(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return epochs * len(images) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = resolve_device(args.device)
    data = make_data(args.images, args.img_size)
    train = data.split("train")

    torch.manual_seed(0)
    model = create_model(args.arch, num_classes=2, weights="none").to(device)
    plain_loop(model, train.images[:args.batch_size * 2], train.labels[:args.batch_size * 2], 1, args.batch_size,
               1e-3, device)  # warm-up
    plain = plain_loop(model, train.images, train.labels, args.epochs, args.batch_size, 1e-3, device)

    torch.manual_seed(0)
    model = create_model(args.arch, num_classes=2, weights="none").to(device)
    strategy = create_strategy("full")
    cfg = RunConfig(epochs=args.epochs, batch_size=args.batch_size, lr=1e-3, weight_decay=1e-4, device=str(device),
                    amp="off", channels_last="off")
    result = fit(model, data, strategy, cfg, blocks=get_blocks(model))
    ours = result.images_per_s

    print(f"device {device}, {args.arch} at {args.img_size}px, batch {args.batch_size}, {args.images} images, "
          f"{args.epochs} epochs, {torch.get_num_threads()} threads")
    print(f"plain PyTorch loop : {plain:8.1f} images/s")
    print(f"medtune fit()      : {ours:8.1f} images/s (training steps only; validation timed separately)")
    print(f"ratio medtune/plain: {ours / plain:.3f}  (goal >= 0.95)")


if __name__ == "__main__":
    main()
