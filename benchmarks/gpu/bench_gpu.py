"""The GPU path measured: medtune's fit vs a plain PyTorch loop, the feature cache and the UAP audit.

1. ``loop``: ResNet-50 at 224 px, batch 64, AdamW, uint8 data on the GPU; medtune's ``fit`` (strategy
   ``full``, bf16 autocast + channels_last, i.e. ``amp: on``, ``channels_last: on``) vs a plain loop with
   the same autocast and memory format, repeated interleaved (A/B/A/B) and compared by medians; also a
   plain float32 NCHW loop, for what AMP + channels_last buy. images/s count training steps only.
2. ``cache``: a ``top_k:1`` run on the same set three times — feature cache off, on (computes the
   frozen prefix's features), on again (finds them) — wall seconds and the largest test-metric difference.
3. ``audit``: ``medtune.robustness.audit`` of the model (training-image and natural-image UAPs at
   ζ = 4% under L2, 10 random controls each): wall seconds and fooling rates.

Writes one JSON object (``--json``) and prints a summary. Run on a CUDA machine from the repository
root (``benchmarks/gpu/run_gpu_checks.sh`` does); ``--device cpu`` with a tiny model checks the code paths:

    python benchmarks/gpu/bench_gpu.py --json out.json
    python benchmarks/gpu/bench_gpu.py --device cpu --arch medtune_tiny_cnn --img-size 32 --num-images 128 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

from medtune._tensors import resolve_device
from medtune.config import RunConfig
from medtune.data.base import ImageSet
from medtune.models import create_model, get_blocks
from medtune.strategies import create_strategy
from medtune.training.cache import FEATURE_CACHE
from medtune.training.loop import fit


def make_data(n: int, size: int, num_eval: int) -> ImageSet:
    """Random uint8 images of two classes (timing only): ``n`` train, ``num_eval`` each val and test."""
    g = torch.Generator().manual_seed(0)
    total = n + 2 * num_eval
    images = torch.randint(0, 256, (total, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(total) % 2
    splits = np.array(["train"] * n + ["val"] * num_eval + ["test"] * num_eval)
    return ImageSet(images=images, labels=labels, splits=splits, class_names=["a", "b"], task="binary",
                    ids=[str(i) for i in range(total)], name="random")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_loop(arch: str, data: ImageSet, *, epochs: int, batch_size: int, device: torch.device, amp: bool,
               channels_last: bool) -> float:
    """images/s of a minimal loop: uint8 data on the device, optional bf16 autocast and NHWC."""
    torch.manual_seed(0)
    model = create_model(arch, num_classes=2, weights="none").to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    train = data.split("train")
    images, labels = train.images.to(device), train.labels.to(device)
    g = torch.Generator().manual_seed(0)
    model.train()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=g)
        for b in range(0, len(images), batch_size):
            idx = order[b:b + batch_size].to(device)
            x = images[idx].float().div_(255)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = loss_fn(model(x).float(), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    sync(device)
    return epochs * len(images) / (time.perf_counter() - t0)


def medtune_fit(arch: str, data: ImageSet, *, spec: str = "full", epochs: int, batch_size: int, device: torch.device,
                amp: bool, channels_last: bool, feature_cache: str = "off", eval_batch_size: int = 256):
    """(FitResult, wall seconds) of medtune's fit with random-init weights."""
    torch.manual_seed(0)
    model = create_model(arch, num_classes=2, weights="none").to(device)
    strategy = create_strategy(spec)
    cfg = RunConfig(epochs=epochs, batch_size=batch_size, lr=1e-4, device=str(device), amp="on" if amp else "off",
                    channels_last="on" if channels_last else "off", feature_cache=feature_cache, patience=0,
                    eval_batch_size=eval_batch_size, progress=False)
    sync(device)
    t0 = time.perf_counter()
    result = fit(model, data, strategy, cfg, blocks=get_blocks(model, granularity=strategy.granularity))
    sync(device)
    return result, time.perf_counter() - t0


def bench_loop(args, device: torch.device, data: ImageSet) -> dict:
    common = dict(epochs=args.epochs, batch_size=args.batch_size, device=device)
    small = make_data(args.batch_size * 4, args.img_size, args.batch_size)
    plain_loop(args.arch, small, amp=True, channels_last=True, **{**common, "epochs": 1})  # warm-up (cuDNN, allocator)
    medtune_fit(args.arch, small, amp=True, channels_last=True, **{**common, "epochs": 1})
    ours, plain = [], []
    for _ in range(args.repeats):  # interleaved, so drifting clocks and load hit both alike
        ours.append(medtune_fit(args.arch, data, amp=True, channels_last=True, **common)[0].images_per_s)
        plain.append(plain_loop(args.arch, data, amp=True, channels_last=True, **common))
    fp32 = plain_loop(args.arch, data, amp=False, channels_last=False, **common)
    out = {"medtune_images_per_s": ours, "plain_images_per_s": plain, "plain_fp32_nchw_images_per_s": fp32,
           "medtune_median": statistics.median(ours), "plain_median": statistics.median(plain)}
    out["ratio_median"] = out["medtune_median"] / out["plain_median"]
    out["ratios"] = [a / b for a, b in zip(ours, plain)]
    out["amp_channels_last_speedup"] = out["plain_median"] / fp32
    return out


def bench_cache(args, device: torch.device, data: ImageSet) -> dict:
    common = dict(epochs=args.epochs, batch_size=args.batch_size, device=device, amp=True, channels_last=True,
                  spec="top_k:1")
    FEATURE_CACHE.clear()
    off, t_off = medtune_fit(args.arch, data, feature_cache="off", **common)
    first, t_first = medtune_fit(args.arch, data, feature_cache="auto", **common)
    again, t_again = medtune_fit(args.arch, data, feature_cache="auto", **common)
    diff = max(abs(off.test_metrics[k] - first.test_metrics[k]) for k in off.test_metrics
               if np.isfinite(off.test_metrics[k]) and np.isfinite(first.test_metrics[k]))
    return {"strategy": "top_k:1", "off_wall_s": t_off, "on_first_wall_s": t_first, "on_again_wall_s": t_again,
            "off_train_s": off.train_seconds, "on_first_train_s": first.train_seconds,
            "on_again_train_s": again.train_seconds, "feature_seconds": first.extras.get("feature_seconds"),
            "speedup_first": t_off / t_first, "speedup_again": t_off / t_again,
            "max_test_metric_diff": diff, "cache_hits": FEATURE_CACHE.hits, "cache_misses": FEATURE_CACHE.misses}


def bench_audit(args, device: torch.device, data: ImageSet) -> dict:
    from medtune.robustness import audit

    torch.manual_seed(0)
    model = create_model(args.arch, num_classes=2, weights="none").to(device).eval()
    train, test = data.split("train"), data.split("test")
    sync(device)
    t0 = time.perf_counter()
    result = audit(model, test_images=test.images, test_labels=test.labels, train_images=train.images,
                   sources=("train", "natural"), zetas=(0.04,), norm="2", num_source_images=args.audit_images,
                   max_passes=args.audit_passes, batch_size=args.batch_size, device=device)
    sync(device)
    seconds = time.perf_counter() - t0
    rows = [{k: r.get(k) for k in ("source", "zeta", "fooling_rate", "seconds", "num_passes")}
            for r in getattr(result, "records", [])]
    return {"wall_s": seconds, "sources": ["train", "natural"], "zeta": 0.04, "num_source_images": args.audit_images,
            "max_passes": args.audit_passes, "records": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-images", type=int, default=2048, help="training images (random uint8)")
    p.add_argument("--num-eval", type=int, default=256, help="validation and test images each")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--audit-images", type=int, default=256)
    p.add_argument("--audit-passes", type=int, default=4)
    p.add_argument("--parts", default="loop,cache,audit")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = resolve_device(args.device)
    data = make_data(args.num_images, args.img_size, args.num_eval)
    out: dict = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
                 "arch": args.arch, "img_size": args.img_size, "batch_size": args.batch_size,
                 "num_images": args.num_images, "epochs": args.epochs, "repeats": args.repeats}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["bf16_supported"] = torch.cuda.is_bf16_supported()
        out["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    for part, fn in (("loop", bench_loop), ("cache", bench_cache), ("audit", bench_audit)):
        if part not in args.parts.split(","):
            continue
        t0 = time.perf_counter()
        try:
            out[part] = fn(args, device, data)
        except Exception as exc:  # a benchmark reports what failed and goes on to the next part
            out[part] = {"error": f"{type(exc).__name__}: {exc}"}
        out[part]["part_wall_s"] = time.perf_counter() - t0
        if device.type == "cuda":
            out[part]["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        print(f"{part}: {json.dumps(out[part], default=str)}", flush=True)
    if "loop" in out and "ratio_median" in out["loop"]:
        lp = out["loop"]
        print(f"\n{args.arch} {args.img_size}px batch {args.batch_size} on {out.get('gpu', device)}: medtune fit "
              f"{lp['medtune_median']:.0f} images/s, plain loop {lp['plain_median']:.0f} (bf16 + channels_last), "
              f"ratio {lp['ratio_median']:.3f} (goal >= 0.95); plain fp32 NCHW {lp['plain_fp32_nchw_images_per_s']:.0f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
