"""The linear probe's solve: Kumar et al.'s warm-started path (the default) vs. a capped path and a
converged fit per C.

medtune's ``linear`` fits logistic regression on frozen features as Kumar et al.'s ``log_reg_sk.py``
does: 50 values of C (1e-7 … 1e2, ascending), one warm-started scikit-learn ``LogisticRegression``
refitted at each with ``max_iter=200`` (``linear``, as ``test_log_reg_warm_starting``). medtune's
earlier defaults are compared on the same features: the same path capped at 20 iterations
(``linear:max_iter=20``) and a converged fit per C (10 values, ``max_iter=1000``, ``tol=1e-6``:
``linear:num_c=10,max_iter=1000`` with that tolerance). This script extracts the classifier inputs once per case and times both solves on the same features,
interleaved (A/B/A/B), and prints the seconds, the chosen C and the validation and test metrics of
each — selection on validation as always, test reported:

- ``demo``: the demo set with EfficientNet-Lite0's offline ImageNet weights (real pretrained
  features, 1,280-d), 64 px as the demo;
- ``preset``: the davila2024 benchmark's generated 5,000-image MedMNIST-format set
  (``bench_preset.py``) through a random-init ResNet-50 at 32 px (2,048-d), the preset benchmark's
  ``linear`` runs.

    python benchmarks/bench_linear_probe.py [--cases demo,preset] [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

import _clock
from bench_preset import write_npz
from medtune.data import load_data
from medtune.models import create_model
from medtune.strategies.probing import c_grid, fit_logistic_head
from medtune.training.metrics import compute_metrics

SOLVES = {  # name: (num_c, max_iter, tol)
    "Kumar path, max_iter 200 (default)": (50, 200, 1e-4),
    "path capped at 20 (max_iter=20)": (50, 20, 1e-4),
    "converged per C": (10, 1000, 1e-6),
}


@torch.no_grad()
def classifier_inputs(model, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(images), batch):
        x = model.normalize(images[i:i + batch].float() / 255)
        out.append(model.backbone.forward_head(model.backbone.forward_features(x), pre_logits=True))
    return torch.cat(out).double().numpy()


def case(name: str, tmp: Path):
    if name == "demo":
        data = load_data("demo", img_size=64)
        model = create_model("tf_efficientnet_lite0", num_classes=data.num_classes, weights="efficientnet_lite0")
    else:
        torch.manual_seed(0)
        write_npz(tmp / "benchmnist.npz", 5000, 28, 3)
        data = load_data(str(tmp / "benchmnist.npz"), img_size=32)
        model = create_model("resnet50", num_classes=data.num_classes, weights="none")
    return data, {s: (classifier_inputs(model, data.split(s).images), data.split(s).labels.numpy())
                  for s in ("train", "val", "test")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="demo,preset")
    p.add_argument("--repeats", type=int, default=2)
    _clock.add_args(p)
    args = p.parse_args()
    clock = _clock.setup(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            data, feats = case(name, Path(tmp))
            (xt, yt), (xv, yv), (xs, ys) = feats["train"], feats["val"], feats["test"]
            names = [str(i) for i in range(data.num_classes)]
            times: dict[str, list[float]] = {k: [] for k in SOLVES}
            heads = {}
            for _ in range(args.repeats):
                for solve, (num_c, max_iter, tol) in SOLVES.items():
                    t0 = clock()
                    heads[solve] = fit_logistic_head(xt, yt, xv, yv, task=data.task, num_classes=data.num_classes,
                                                     select="accuracy", cs=c_grid(num_c), max_iter=max_iter, tol=tol)
                    times[solve].append(clock() - t0)
            for solve, head in heads.items():
                def metrics(x, y):
                    logits = x @ head.weight.T + head.bias
                    z = np.exp(logits - logits.max(1, keepdims=True))
                    return compute_metrics(y, z / z.sum(1, keepdims=True), task=data.task, class_names=names)
                val, test = metrics(xv, yv), metrics(xs, ys)
                rows.append((name, f"{xt.shape[0]}×{xt.shape[1]}", solve, statistics.median(times[solve]), head.c,
                             val["accuracy"], val.get("auc", float("nan")), test["accuracy"],
                             test.get("auc", float("nan"))))
                print(f"{name}: {solve} {times[solve]}", flush=True)
    print(f"\n| case | train features | solve | seconds (median of {args.repeats}, {args.clock}) | C | val acc | "
          "val AUC | test acc | test AUC |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.3g} | {r[5]:.3f} | {r[6]:.3f} | {r[7]:.3f} | "
              f"{r[8]:.3f} |")


if __name__ == "__main__":
    main()
