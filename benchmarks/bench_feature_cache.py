"""A Kandel-style top-k sweep (every k) and a linear probe, with and without the frozen-prefix feature cache.

Every run is trained both ways, the two sweeps interleaved (off/on, then on/off, ...) so load
noise hits both; each run's figures are medians over the repeats. Per run it prints:

- ``cost`` : the run's charged training seconds (``train_seconds``: epochs plus, when cached, the
  prefix extraction stored with the features; order-independent by design), without and with the
  cache, and their ratio with/without (the cost of a cache-eligible run relative to its uncached
  version; < 1 is cheaper) and the speed-up without/with;
- ``wall`` : the seconds ``fit`` took end to end (a run that finds its prefix cached skips the pass);
- the storage dtype and the largest |test metric difference| against the uncached run.

Then the end-to-end seconds of both sweeps and their ratio. The cached sweep announces its cuts
(the plan's ``cache_cuts``), so the first (longest-prefix) run's pass stores every shorter cut.

    python benchmarks/bench_feature_cache.py [--arch resnet18] [--images 2000] [--img-size 64] [--epochs 5]
        [--repeats 2] [--storage auto|fp32] [--threads N] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import _clock  # noqa: E402  (benchmarks/_clock.py: --threads and --clock)
from medtune.config import RunConfig
from medtune.data import make_synthetic
from medtune.models import create_model, get_blocks
from medtune.strategies import create_strategy, probing
from medtune.training.cache import FEATURE_CACHE
from medtune.training.loop import fit

CLOCK = time.perf_counter


def sweep(arch: str, data, cfg: RunConfig, specs: list[str], state: dict, cuts=()) -> tuple[float, dict[str, dict]]:
    """Train every spec from the same initial weights; (wall seconds, per-spec figures)."""
    FEATURE_CACHE.clear()
    probing._REUSED.clear()  # every sweep solves its own probe
    t0 = CLOCK()
    out = {}
    for spec in specs:
        model = create_model(arch, num_classes=data.num_classes, weights="none")
        model.load_state_dict(state)  # the same "pretrained" weights for every run
        strategy = create_strategy(spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            t_run = CLOCK()
            result = fit(model, data, strategy, cfg, blocks=get_blocks(model, granularity=strategy.granularity),
                         cache_cuts=cuts)
            wall = CLOCK() - t_run
        cached = next(iter(result.extras.get("feature_cache", {}).values()), None)
        out[spec] = {"cost": result.train_seconds, "wall": wall, "metrics": result.test_metrics,
                     "dtype": cached["dtype"] if cached else None,
                     "cut": f"{cached['cut']} {tuple(cached['feature_shape'])}" if cached else None}
    return CLOCK() - t0, out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--storage", default="auto", choices=("auto", "fp32"))
    _clock.add_args(p)
    args = p.parse_args()
    global CLOCK
    CLOCK = _clock.setup(args)
    data = make_synthetic(num_samples=args.images, img_size=args.img_size, num_classes=4, seed=0)
    cfg = RunConfig(epochs=args.epochs, batch_size=64, lr=1e-3, img_size=args.img_size, device="cpu", augment="none",
                    progress=False, store="/tmp/medtune-bench-feature-cache")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        probe = create_model(args.arch, num_classes=data.num_classes, weights="none")
    num_blocks = len(get_blocks(probe))
    specs = ["linear", *[f"top_k:{k}" for k in range(num_blocks)]]
    modes = {"off": cfg.replace(feature_cache="off"), "on": cfg.replace(feature_cache=args.storage)}
    walls: dict[str, list[float]] = {"off": [], "on": []}
    runs: dict[str, dict[str, list[dict]]] = {"off": {s: [] for s in specs}, "on": {s: [] for s in specs}}
    for r in range(args.repeats):
        for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):  # interleaved: A/B, B/A, ...
            cuts = [num_blocks - 1 - k for k in range(num_blocks)] if mode == "on" else []
            wall, out = sweep(args.arch, data, modes[mode], specs, probe.state_dict(), cuts)
            walls[mode].append(wall)
            for spec, row in out.items():
                runs[mode][spec].append(row)

    def med(mode: str, spec: str, field: str) -> float:
        return statistics.median(row[field] for row in runs[mode][spec])

    print(f"{args.arch} at {args.img_size}px, {args.images} images ({(data.splits == 'train').sum()} train), "
          f"{args.epochs} epochs, {num_blocks} blocks, storage {args.storage}, {args.repeats} interleaved repeats, "
          f"{torch.get_num_threads()} threads; medians")
    print(f"{'run':10} {'cut (features)':28} {'dtype':8} {'cost off':>9} {'cost on':>8} {'on/off':>7} {'speed-up':>8} "
          f"{'wall off':>9} {'wall on':>8} {'max |dmetric|':>13}")
    for spec in specs:
        first = runs["on"][spec][0]
        diff = max(abs(a["metrics"][k] - b["metrics"][k]) for a, b in zip(runs["off"][spec], runs["on"][spec])
                   for k in a["metrics"])
        c_off, c_on = med("off", spec, "cost"), med("on", spec, "cost")
        ratio, speedup = (f"{c_on / c_off:7.2f}", f"{c_off / c_on:7.2f}x") if first["cut"] else ("-", "-")
        print(f"{spec:10} {first['cut'] or 'not cache-eligible':28} {first['dtype'] or '-':8} {c_off:9.2f} {c_on:8.2f} "
              f"{ratio:>7} {speedup:>8} {med('off', spec, 'wall'):9.2f} {med('on', spec, 'wall'):8.2f} {diff:13.2e}")
    t_off, t_on = statistics.median(walls["off"]), statistics.median(walls["on"])
    per_repeat = "; ".join(f"{mode} {', '.join(f'{w:.1f}' for w in walls[mode])}" for mode in ("off", "on"))
    print(f"whole sweep: without cache {t_off:.1f} s, with {t_on:.1f} s: {t_off / t_on:.2f}x (per repeat: {per_repeat})")


if __name__ == "__main__":
    main()
