"""Successive halving vs the full grid, back to back on one machine: epochs trained, wall time, the
validation-best LR per strategy and the validation-best configuration both ways, and the forecast
each sweep logs before it starts beside its measured wall time.

Defaults: the demo data, EfficientNet-Lite0 with its real ImageNet weights, Davila et al.'s eight
strategies × 3 LRs, 2 seeds, 10 epochs, patience 3, ``halving`` within lr (eta 3, first rung 1).
Every size is a flag, so a shared or small machine can run a smaller cut of it:

    python benchmarks/bench_halving.py                                   # the issue's measurement
    python benchmarks/bench_halving.py --strategies full,lp_ft --epochs 4 --img-size 32   # a smaller cut

Each sweep gets its own fresh store (nothing is shared: the halving sweep's runs are the same run ids
as the full grid's). Selection reads validation metrics only (mean over seeds of the monitored metric).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import medtune
from medtune._demo import DEMO_SWEEP
from medtune.halving import epochs_trained
from medtune.store import ResultsStore

DAVILA = "full,linear,gradual_lf,gradual_fl,lp_ft,l1_sp,l2_sp,auto_rgn"


def choices(records, monitor: str) -> tuple[dict[str, float], tuple[str, float, float]]:
    """Validation-best LR per strategy (mean over seeds) and the validation-best (strategy, lr)."""
    vals: dict[tuple[str, float], list[float]] = defaultdict(list)
    for r in records:
        vals[(r["label"], r["config"]["lr"])].append(r["val_metrics"][monitor])
    means = {k: sum(v) / len(v) for k, v in vals.items()}
    best_lr: dict[str, float] = {}
    for (label, lr), m in sorted(means.items()):
        if label not in best_lr or m > means[(label, best_lr[label])]:
            best_lr[label] = lr
    (label, lr), m = max(means.items(), key=lambda kv: kv[1])
    return best_lr, (label, lr, m)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--strategies", default=DAVILA)
    ap.add_argument("--lr", default="0.0001,0.001,0.01")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--train-fraction", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eta", type=int, default=3)
    ap.add_argument("--first-rung", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--store", default=None, help="parent folder of the two stores (default: a temp folder)")
    ap.add_argument("--out", default=None, help="write the results as JSON here too")
    ap.add_argument("--modes", default="halving,full_grid",
                    help="which sweeps to run (e.g. 'halving' alone, to re-measure it against a full grid measured before)")
    args = ap.parse_args()
    root = Path(args.store or tempfile.mkdtemp(prefix="bench_halving_"))
    base = dict(DEMO_SWEEP)
    base.pop("scratch_epochs", None)
    base.update(name="bench_halving", strategy=args.strategies, lr=args.lr, seeds=args.seeds, epochs=args.epochs,
                patience=args.patience, img_size=args.img_size, batch_size=args.batch_size, device="cpu",
                train_fraction=args.train_fraction,
                progress=False)
    out = {"settings": {k: v for k, v in vars(args).items()}, "machine": "shared 2-core CPU"}
    for mode in args.modes.split(","):
        lines: list[str] = []

        def log(msg: str, _lines=lines) -> None:
            _lines.append(msg)
            if msg.startswith(("forecast", "halving:", "sweep ")):
                print(f"[{mode}] {msg}", flush=True)

        store = ResultsStore(root / mode)
        t0 = time.perf_counter()
        extra = dict(halving=True, halving_eta=args.eta, halving_first_rung=args.first_rung) if mode == "halving" else {}
        records = medtune.sweep(dict(base), store=store, workers=args.workers, log=log, **extra)
        wall = time.perf_counter() - t0
        forecast = next(m for m in lines if m.startswith("forecast"))
        best_lr, best = choices(records, base["monitor"])
        out[mode] = {"wall_s": wall, "epochs_trained": epochs_trained(store), "runs_done": len(records),
                     "forecast": forecast, "best_lr": best_lr, "best": best}
        print(json.dumps({mode: out[mode]}, indent=1), flush=True)
    if "halving" not in out or "full_grid" not in out:
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=1))
        return
    h, f = out["halving"], out["full_grid"]
    same = sum(h["best_lr"].get(s) == lr for s, lr in f["best_lr"].items())
    out["summary"] = {"epochs_ratio": f["epochs_trained"] / max(1, h["epochs_trained"]),
                      "wall_ratio": f["wall_s"] / max(1e-9, h["wall_s"]),
                      "same_best_config": h["best"][:2] == f["best"][:2],
                      "same_lr_strategies": f"{same} of {len(f['best_lr'])}"}
    print(json.dumps(out["summary"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())
