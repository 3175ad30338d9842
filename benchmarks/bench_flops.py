"""Achieved FLOP/s of full fine-tuning as a fraction of a matmul's FLOP/s, in float32 and bf16 autocast.

The model's FLOPs per training step are counted by ``torch.utils.flop_counter.FlopCounterMode``
(forward + backward of one batch); the step rate comes from medtune's ``fit`` (``amp: off`` for
float32, ``amp: on`` for bf16 autocast); the hardware references are large float32 and bfloat16
matmuls timed in the same run. Repeats are interleaved (fp32 run, bf16 run, matmuls, ...) and the
medians reported. Goal on CPU: float32 training ≥ 0.5 of the float32 matmul.

    PYTHONPATH=src python benchmarks/bench_flops.py [--arch resnet18] [--img-size 64] [--batch-size 64] \
        [--repeats 3] [--threads N] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import _clock  # noqa: E402  (benchmarks/_clock.py: --threads and --clock)
import bench_loop_vs_plain as loop_bench  # noqa: E402  (same in-memory data as the loop benchmark)
from medtune._tensors import resolve_device
from medtune.config import RunConfig
from medtune.models import get_blocks
from medtune.strategies import create_strategy
from medtune.training.loop import fit

CLOCK = time.perf_counter


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = CLOCK()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * repeats / (CLOCK() - t0)


def step_flops(model: torch.nn.Module, batch: int, size: int, device: torch.device) -> int:
    x = torch.rand(batch, 3, size, size, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    global CLOCK
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    _clock.add_args(p)
    args = p.parse_args()
    CLOCK = _clock.setup(args)
    device = resolve_device(args.device)
    flops = step_flops(loop_bench.fresh_model(args.arch, device), args.batch_size, args.img_size, device)
    data = loop_bench.make_data(args.images, args.img_size)
    rates: dict[str, list[float]] = {"fp32": [], "bf16": [], "matmul fp32": [], "matmul bf16": []}
    for _ in range(args.repeats):
        for amp, name in (("off", "fp32"), ("on", "bf16")):
            model = loop_bench.fresh_model(args.arch, device)
            cfg = RunConfig(epochs=args.epochs, batch_size=args.batch_size, lr=1e-3, device=str(device), amp=amp,
                            channels_last="off", feature_cache="off")
            result = fit(model, data, create_strategy("full"), cfg, blocks=get_blocks(model))
            rates[name].append(result.images_per_s)
        rates["matmul fp32"].append(matmul_flops(device, torch.float32))
        rates["matmul bf16"].append(matmul_flops(device, torch.bfloat16))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"device {device}, {args.arch} at {args.img_size}px, batch {args.batch_size}, {torch.get_num_threads()} "
          f"threads, {args.clock} clock, {args.repeats} interleaved repeats (medians)")
    print(f"training step FLOPs (fwd+bwd, flop_counter): {flops / 1e9:.2f} GFLOP per batch")
    print(f"matmul 2048x2048: float32 {med['matmul fp32'] / 1e9:.1f} GFLOP/s, bfloat16 {med['matmul bf16'] / 1e9:.1f} GFLOP/s")
    print("| training | images/s | achieved GFLOP/s | / float32 matmul | / matmul of its dtype |")
    print("|---|---|---|---|---|")
    for name in ("fp32", "bf16"):
        achieved = med[name] / args.batch_size * flops
        print(f"| {name} | {med[name]:.1f} | {achieved / 1e9:.1f} | {achieved / med['matmul fp32']:.2f} | "
              f"{achieved / med['matmul ' + name]:.2f} |")
    print("(goal on CPU: fp32 training >= 0.5 of the float32 matmul)")


if __name__ == "__main__":
    main()
