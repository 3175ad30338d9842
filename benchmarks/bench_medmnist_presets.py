"""What the MedMNIST presets cost: seconds per run and per sweep, from timed steps at their input sizes.

``medmnist_plus`` feeds every MedMNIST+ size at 224 px (zero-padded), so a run costs the same at 28 and at
224 px: per epoch, the training images through forward + backward + AdamW (end-to-end) or a forward pass
in train mode with the head's update (the linear probe, whose BatchNorm runs in train mode as theirs, so
nothing is cached), and the validation images through a forward pass. ``medmnist_v2`` trains ResNet-18/50
from scratch at 28 px or 224 px (Adam, batch 128, 100 epochs, no early stopping).

Per architecture this script times a few steps (the fastest of ``--steps`` after a warm-up, random
weights; as ``bench_preset.train_cost``) and extrapolates to a dataset's split sizes (PneumoniaMNIST by
default: 4,708 / 524 / 624) and to the epoch budget (the cap, 100; MedMNIST+ stops earlier on its
validation loss, so its real cost is below the cap's, by the epochs it runs).

    python benchmarks/bench_medmnist_presets.py                       # CPU, this machine's threads
    python benchmarks/bench_medmnist_presets.py --device cuda --batch 64
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from medtune.models import create_model

SPLITS = {"pneumoniamnist": (4708, 524, 624), "dermamnist": (7007, 1003, 2005), "breastmnist": (546, 78, 156),
          "bloodmnist": (11959, 1712, 3421), "pathmnist": (89996, 10004, 7180)}


def step_cost(arch: str, px: int, batch: int, device: str, steps: int, *, backward: bool) -> float:
    """Seconds per image of one step: forward + backward + AdamW (``backward``) or a forward pass."""
    torch.manual_seed(0)
    model = create_model(arch, num_classes=2, weights="none").to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    x, y = torch.rand(batch, 3, px, px, device=device), torch.randint(0, 2, (batch,), device=device)
    times = []
    for i in range(steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if backward:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            with torch.no_grad():
                model(x)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return min(times) / batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8, help="images per timed step (per-image cost; default 8)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dataset", default="pneumoniamnist", choices=sorted(SPLITS))
    ap.add_argument("--epochs", type=int, default=100)
    args = ap.parse_args()
    n_train, n_val, n_test = SPLITS[args.dataset]
    rows = []
    cases = [("medmnist_plus", a, 224) for a in ("resnet18", "densenet121", "vgg16")]
    cases += [("medmnist_v2", a, px) for a in ("resnet18", "resnet50") for px in (28, 224)]
    for preset, arch, px in cases:
        train = step_cost(arch, px, args.batch, args.device, args.steps, backward=True)
        fwd = step_cost(arch, px, args.batch, args.device, args.steps, backward=False)
        epoch = n_train * train + n_val * fwd
        row = {"preset": preset, "arch": arch, "px": px, "train_img_per_s": round(1 / train, 1),
               "eval_img_per_s": round(1 / fwd, 1), "epoch_min": round(epoch / 60, 2),
               "run_h_at_cap": round((args.epochs * epoch + n_test * fwd) / 3600, 2)}
        if preset == "medmnist_plus":  # the linear probe: forward in train mode + the head (≈ a forward)
            row["lp_run_h_at_cap"] = round((args.epochs * (n_train + n_val) * fwd + n_test * fwd) / 3600, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    plus = [r for r in rows if r["preset"] == "medmnist_plus"]
    sweep = 3 * sum(r["run_h_at_cap"] + r["lp_run_h_at_cap"] for r in plus)
    print(json.dumps({"device": args.device, "threads": torch.get_num_threads(), "dataset": args.dataset,
                      "medmnist_plus_sweep_h_at_cap": round(sweep, 1),
                      "note": "one size of one dataset, 3 archs x (end-to-end + linear) x 3 seeds, every run at "
                              "the 100-epoch cap; early stopping on validation loss ends runs sooner"}))


if __name__ == "__main__":
    main()
