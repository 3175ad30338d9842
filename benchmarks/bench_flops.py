"""Achieved FLOP/s of full fine-tuning as a fraction of a float32 matmul's FLOP/s, in the same run.

The model's FLOPs per training step are counted by ``torch.utils.flop_counter.FlopCounterMode``
(forward + backward of one batch); the step rate comes from medtune's ``fit``; the hardware
reference is a large float32 matmul timed here. Goal on CPU: >= 0.5.

    python benchmarks/bench_flops.py [--arch resnet18] [--img-size 64] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from medtune.config import RunConfig
from medtune.models import create_model, get_blocks
from medtune.strategies import create_strategy
from medtune._tensors import resolve_device
from medtune.training.loop import fit

from bench_loop_vs_plain import make_data  # noqa: E402  (same in-memory data as the loop benchmark)


def matmul_flops(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0)


def step_flops(model: torch.nn.Module, batch: int, size: int, device: torch.device) -> int:
    x = torch.rand(batch, 3, size, size, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = resolve_device(args.device)
    model = create_model(args.arch, num_classes=2, weights="none").to(device)
    flops = step_flops(model, args.batch_size, args.img_size, device)
    data = make_data(args.images, args.img_size)
    cfg = RunConfig(epochs=2, batch_size=args.batch_size, lr=1e-3, device=str(device), amp="off")
    result = fit(model, data, create_strategy("full"), cfg, blocks=get_blocks(model))
    achieved = result.images_per_s / args.batch_size * flops
    peak = matmul_flops(device)
    print(f"device {device}, {args.arch} at {args.img_size}px, batch {args.batch_size}, {torch.get_num_threads()} threads")
    print(f"training step FLOPs (fwd+bwd, flop_counter): {flops / 1e9:.2f} GFLOP per batch")
    print(f"achieved: {achieved / 1e9:.1f} GFLOP/s ({result.images_per_s:.1f} images/s)")
    print(f"float32 matmul 2048x2048: {peak / 1e9:.1f} GFLOP/s")
    print(f"fraction of matmul FLOP/s: {achieved / peak:.2f}  (goal >= 0.5 on CPU)")


if __name__ == "__main__":
    main()
