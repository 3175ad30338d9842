"""Hand-made records, under the keys the results store writes, with known metrics, for the report tests.

``build_runs`` makes strategies × seeds × archs × datasets with AUC = the label's mean plus a
fixed, sign-balanced per-block jitter, so which configuration a test expects is known by
construction, not by running the code under test.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

# label: (strategy, strategy_params, params on resnet18, seconds on resnet18)
LABELS = {
    "linear": ("linear", {}, 1_000, 1.0),
    "top_k:1": ("top_k", {"k": 1}, 1_000_000, 3.0),
    "top_k:2": ("top_k", {"k": 2}, 3_000_000, 5.0),
    "full": ("full", {}, 10_000_000, 10.0),
    "scratch": ("scratch", {}, 10_000_000, 10.0),
    "auto_rgn": ("auto_rgn", {}, 10_000_000, 12.0),
}
ARCHS = {"resnet18": (6, 1.0), "tf_efficientnet_lite0": (9, 0.4)}  # num_blocks, cost scale
BLOCK_NAMES = {6: ["stem", "stage_1", "stage_2", "stage_3", "stage_4", "head"],
               9: ["stem", *[f"stage_{i}" for i in range(1, 8)], "head"]}


def _depth(strategy: str, params: dict, num_blocks: int) -> int | None:
    if strategy == "linear":
        return 0
    if strategy == "full":
        return num_blocks - 1
    if strategy in ("top_k", "layers_k"):
        return int(params["k"])
    return None


def jitter(block_idx: int, label_idx: int, amplitude: float) -> float:
    """Deterministic noise in [-amplitude, amplitude], different per block and per label."""
    return amplitude * math.sin(1.7 * block_idx + 2.3 * label_idx)


def build_runs(
    means: dict[str, float],
    *,
    datasets=("demo", "derm"),
    archs=("resnet18", "tf_efficientnet_lite0"),
    seeds=(0, 1, 2),
    amplitude: dict[str, float] | None = None,
    fractions=(1.0,),
    predictions: bool = False,
    auto_rgn: bool = False,
) -> list[dict]:
    """Run records: AUC = means[label] + jitter(block, label, amplitude[label]) (default 0.004).

    Accuracy is AUC − 0.05, balanced accuracy AUC − 0.06, F1 AUC − 0.07, so every metric
    orders the labels the same way.
    """
    amplitude = amplitude or {}
    runs = []
    block = 0
    for dataset in datasets:
        for arch in archs:
            num_blocks, scale = ARCHS[arch]
            for seed in seeds:
                for frac in fractions:
                    for label_idx, (label, mean) in enumerate(means.items()):
                        strategy, sparams, params, seconds = LABELS[label]
                        auc = mean + jitter(block, label_idx, amplitude.get(label, 0.004)) - 0.1 * (1 - frac) * (
                            2 if strategy == "scratch" else 1)
                        run = {
                            "run_id": f"{dataset}-{arch[:3]}-{seed}-{label}-{frac}".replace(":", ""),
                            "status": "done", "created": "2026-11-22T04:10:00Z",
                            "dataset": dataset, "data_fingerprint": f"fp-{dataset}", "arch": arch,
                            "weights": "none" if strategy == "scratch" else "imagenet",
                            "strategy": strategy, "strategy_params": sparams, "label": label,
                            "depth": _depth(strategy, sparams, num_blocks), "seed": seed,
                            "train_fraction": frac,
                            "config": {"arch": arch, "strategy": label, "seed": seed, "lr": 1e-3},
                            "metrics": {"auc": auc, "accuracy": auc - 0.05, "balanced_accuracy": auc - 0.06,
                                        "f1": auc - 0.07, "loss": 1 - auc},
                            # validation orders the labels as test does (selection tests set it apart)
                            "val_metrics": {"auc": auc + 0.01, "accuracy": auc - 0.04,
                                            "balanced_accuracy": auc - 0.05, "f1": auc - 0.06, "loss": 0.99 - auc},
                            "trainable_params": int(params * scale), "total_params": int(10_000_000 * scale),
                            "train_seconds": seconds * scale * frac, "images_per_s": 100.0,
                            "num_blocks": num_blocks,
                            "history": [{"epoch": e, "train_loss": 0.6 / (e + 1), "val_loss": 0.5,
                                         "val_auc": auc - 0.01 * (2 - e), "lr": 1e-3, "seconds": 1.0}
                                        for e in range(3)],
                            "extras": {},
                            "versions": {"medtune": "0.1.0", "torch": "2.14.1", "timm": "1.0.31", "python": "3.11.7"},
                        }
                        if auto_rgn and strategy == "auto_rgn":
                            names = BLOCK_NAMES[num_blocks]
                            run["extras"]["auto_rgn"] = [
                                {"epoch": e, "block_weights": {n: (i + 1) / len(names) * (1 - 0.1 * e)
                                                               for i, n in enumerate(names)}}
                                for e in range(3)]
                        if predictions:
                            rng = np.random.default_rng(block)
                            y = np.array([0] * 20 + [1] * 20)
                            p1 = np.clip(y * (mean - 0.6) + rng.uniform(0, 0.7, 40), 0, 1)  # overlapping
                            run["predictions"] = {"y_true": y.tolist(),
                                                  "y_prob": np.stack([1 - p1, p1], 1).tolist(),
                                                  "class_names": ["benign", "malignant"]}
                        runs.append(run)
                block += 1
    return runs


def write_png(path: Path, width: int = 8, height: int = 8) -> Path:
    """Write a tiny valid RGB PNG with the stdlib (a gradient), for ``uap_png`` fields."""
    raw = b"".join(b"\x00" + bytes(v for x in range(width) for v in (x * 30 % 256, y * 30 % 256, 128))
                   for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    path.write_bytes(png)
    return path


def build_attacks(runs: list[dict], png_dir: Path | None = None) -> list[dict]:
    """Non-targeted UAP audits at ζ ∈ {0.02, 0.04, 0.08} from 3 sources, plus one targeted one.

    Fooling rate = 0.2 + 6·ζ for 'train', 0.1 + 5·ζ for 'natural', 0.02 + ζ for 'random',
    minus 0.1 for linear probes (their rate is lower by construction), clipped at 0.
    """
    attacks = []
    base = {"train": (0.2, 6.0), "natural": (0.1, 5.0), "random": (0.02, 1.0)}
    chosen = [r for r in runs if r["dataset"] == "demo" and r["arch"] == "resnet18" and r["seed"] in (0, 1)
              and r["label"] in ("linear", "top_k:1", "full") and r["train_fraction"] == 1.0]
    for r in chosen:
        for source, (a, b) in base.items():
            for zeta in (0.02, 0.04, 0.08):
                rate = max(0.0, a + b * zeta - (0.1 if r["label"] == "linear" else 0.0))
                png = None
                if png_dir is not None and zeta == 0.04 and r["seed"] == 0:
                    png = str(write_png(png_dir / f"uap_{r['run_id']}_{source}.png"))
                attacks.append({
                    "attack_id": f"{r['run_id']}-{source}-{zeta}", "run_id": r["run_id"], "source": source,
                    "zeta": zeta, "xi": zeta * 30.0, "norm": "2", "targeted": None, "fooling_rate": rate,
                    "fooling_ci_low": rate - 0.05, "fooling_ci_high": rate + 0.05,
                    "random_fooling_rate": 0.03, "random_ci_low": 0.01, "random_ci_high": 0.06,
                    "targeted_success": None, "clean_target_share": None,
                    "confusion": [[10, 5], [3, 12]], "uap_png": png, "examples_png": None})
    r = chosen[0]
    attacks.append({"attack_id": "targeted", "run_id": r["run_id"], "source": "natural", "zeta": 0.04,
                    "xi": 1.2, "norm": "2", "targeted": 1, "fooling_rate": 0.5, "fooling_ci_low": 0.4,
                    "fooling_ci_high": 0.6, "random_fooling_rate": 0.03, "random_ci_low": 0.01,
                    "random_ci_high": 0.06, "targeted_success": 0.8, "clean_target_share": 0.5,
                    "confusion": None, "uap_png": None, "examples_png": None})
    return attacks


def build_search() -> dict:
    names = BLOCK_NAMES[6][:-1]
    return {"search_id": "s1", "dataset": "demo", "arch": "resnet18", "granularity": "block",
            "unit_names": names,
            "history": [{"generation": g, "best_fitness": 0.8 + 0.02 * g, "mean_fitness": 0.7 + 0.03 * g,
                         "best_mask": [0, 0, 0, 1, 1][: len(names)], "trainable_fraction": 0.3}
                        for g in range(5)],
            "best_mask": [0, 0, 1, 0, 1], "best_fitness": 0.88, "seconds": 300.0,
            "comparison": [{"label": "deft", "auc": 0.9}, {"label": "full", "auc": 0.895},
                           {"label": "linear", "auc": 0.8}]}


STANDARD_MEANS = {"linear": 0.80, "top_k:1": 0.90, "top_k:2": 0.90, "full": 0.90, "scratch": 0.75,
                  "auto_rgn": 0.90}


@pytest.fixture
def runs() -> list[dict]:
    """2 datasets × 2 archs × 3 seeds × 6 labels; top_k:1 ties full, linear is clearly worse."""
    return build_runs(STANDARD_MEANS, predictions=True, auto_rgn=True)


@pytest.fixture
def full_records(tmp_path):
    """(runs incl. a train-size sweep, attacks with UAP PNGs on disk, searches)."""
    runs = build_runs(STANDARD_MEANS, predictions=True, auto_rgn=True)
    runs += build_runs({"scratch": 0.75, "full": 0.90, "top_k:1": 0.90}, fractions=(0.25, 0.5),
                       datasets=("demo",))
    png_dir = tmp_path / "uaps"
    png_dir.mkdir()
    attacks = build_attacks(runs, png_dir)
    return runs, attacks, [build_search()]


@pytest.fixture(scope="session")
def built_report(tmp_path_factory):
    """The full HTML report of ``full_records``-like data, built once per session.

    Returns:
        (path of report.html, runs, attacks, searches)
    """
    root = tmp_path_factory.mktemp("report")
    runs = build_runs(STANDARD_MEANS, predictions=True, auto_rgn=True)
    runs += build_runs({"scratch": 0.75, "full": 0.90, "top_k:1": 0.90}, fractions=(0.25, 0.5), datasets=("demo",))
    runs.append({**runs[0], "run_id": "failed-run", "status": "failed", "metrics": {}})
    png_dir = root / "uaps"
    png_dir.mkdir()
    attacks = build_attacks(runs, png_dir)
    searches = [build_search()]
    from medtune.reporting import build_report

    path = build_report(runs, attacks, searches, title="Demo <study> & co", out_path=root / "out" / "report.html")
    return path, runs, attacks, searches


@pytest.fixture
def make_runs():
    """The :func:`build_runs` factory (tests take it as a fixture instead of importing conftest)."""
    return build_runs


@pytest.fixture
def make_attacks():
    """The :func:`build_attacks` factory."""
    return build_attacks


@pytest.fixture
def make_search():
    """The :func:`build_search` factory."""
    return build_search


@pytest.fixture
def make_png():
    """The :func:`write_png` helper."""
    return write_png
