"""medtune's training loop vs. a minimal hand-written PyTorch loop: same model, batch, optimiser, data.

The two are run in interleaved repeats (plain, medtune, plain, medtune, ...; the order within a
pair alternates), each from a fresh model with the same seed, so load from other processes falls
on both alike; each pair gives one ratio medtune/plain and the median ratio is the result (goal
≥ 0.95). medtune's images/s is ``FitResult.images_per_s``: its training epochs (the strategy's
epoch-start hook included), validation timed separately and left out; the plain loop's is its
epochs' wall time. ``--clock cpu`` times both by the process's CPU seconds instead
(``time.process_time``, for medtune by pointing its loop's clock there): on cores shared with other
jobs, wall time measures their load as much as either loop, CPU time what each loop computes (use
it with ``--threads 1``, where no thread spins waiting for a descheduled one).

    PYTHONPATH=src python benchmarks/bench_loop_vs_plain.py [--arch resnet18] [--img-size 64] \
        [--batch-size 64] [--images 1024] [--epochs 2] [--repeats 5] [--amp off|on] \
        [--threads N] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import _clock  # noqa: E402  (benchmarks/_clock.py: --threads and --clock)
from medtune._tensors import resolve_amp_dtype, resolve_device
from medtune.config import RunConfig
from medtune.data.base import ImageSet
from medtune.models import create_model, get_blocks
from medtune.strategies import create_strategy
from medtune.training.loop import fit

CLOCK = time.perf_counter


def make_data(n: int, size: int) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n + 64, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 2, (n + 64,), generator=g)
    splits = np.array(["train"] * n + ["val"] * 32 + ["test"] * 32)
    return ImageSet(images=images, labels=labels, splits=splits, class_names=["a", "b"], task="binary",
                    ids=[str(i) for i in range(n + 64)])


def plain_loop(model, images, labels, epochs, batch_size, lr, device, amp_dtype=None) -> float:
    """images/s of a minimal PyTorch loop (AdamW, cross-entropy, optional autocast)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    images, labels = images.to(device), labels.to(device)
    g = torch.Generator().manual_seed(0)
    t0 = CLOCK()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=g)
        for b in range(0, len(images), batch_size):
            idx = order[b:b + batch_size].to(device)
            x = images[idx].float().div_(255)
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                out = model(x)
            loss = loss_fn(out.float(), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return epochs * len(images) / (CLOCK() - t0)


def fresh_model(arch: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)  # a script, not library code: the same initial weights for both loops
    return create_model(arch, num_classes=2, weights="none").to(device)


def medtune_loop(arch, data, epochs, batch_size, device, amp) -> float:
    model = fresh_model(arch, device)
    cfg = RunConfig(epochs=epochs, batch_size=batch_size, lr=1e-3, weight_decay=1e-4, device=str(device),
                    amp=amp, channels_last="off", feature_cache="off")
    return fit(model, data, create_strategy("full"), cfg, blocks=get_blocks(model)).images_per_s


def main() -> None:
    global CLOCK
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--amp", default="off", choices=("off", "on"))
    p.add_argument("--device", default="auto")
    _clock.add_args(p)
    args = p.parse_args()
    CLOCK = _clock.setup(args)
    device = resolve_device(args.device)
    amp_dtype = resolve_amp_dtype(args.amp, device)
    data = make_data(args.images, args.img_size)
    train = data.split("train")

    def plain() -> float:
        return plain_loop(fresh_model(args.arch, device), train.images, train.labels, args.epochs, args.batch_size,
                          1e-3, device, amp_dtype)

    def ours() -> float:
        return medtune_loop(args.arch, data, args.epochs, args.batch_size, device, args.amp)

    # warm-up of both (allocator, oneDNN/cuDNN primitive caches), untimed
    warm = make_data(args.batch_size * 2, args.img_size)
    plain_loop(fresh_model(args.arch, device), warm.split("train").images, warm.split("train").labels, 1,
               args.batch_size, 1e-3, device, amp_dtype)
    medtune_loop(args.arch, warm, 1, args.batch_size, device, args.amp)

    print(f"device {device}, {args.arch} at {args.img_size}px, batch {args.batch_size}, {args.images} images, "
          f"{args.epochs} epochs, amp {args.amp}, {torch.get_num_threads()} threads, {args.clock} clock, {args.repeats} interleaved repeats")
    print("repeat  order          plain img/s  medtune img/s  ratio")
    ratios = []
    for r in range(args.repeats):
        if r % 2 == 0:
            a, b = plain(), ours()
        else:
            b, a = ours(), plain()
        ratios.append(b / a)
        print(f"{r + 1:6d}  {'plain,medtune' if r % 2 == 0 else 'medtune,plain':13s}  {a:11.1f}  {b:13.1f}  {b / a:5.3f}")
    print(f"median ratio medtune/plain: {statistics.median(ratios):.3f}  (goal >= 0.95; "
          f"min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
