"""Figures of a medtune report, drawn from plain run/attack/search records.

Every function returns a :class:`matplotlib.figure.Figure`, or None when the records hold
nothing to draw (no top-k runs, a single train fraction, no predictions, ...). Figures are
built with the object API on the Agg canvas, never through ``pyplot``, so drawing a report
changes no global matplotlib state and leaks no open figures.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from medtune.reporting._records import attacks_frame, done_runs, main_fraction_runs, runs_frame
from medtune.training.metrics import higher_is_better

__all__ = [
    "compact",
    "pareto_front",
    "plot_auto_rgn",
    "plot_confusion",
    "plot_cost",
    "plot_data_size",
    "plot_efficiency_frontier",
    "plot_deft",
    "plot_depth",
    "plot_fooling",
    "plot_reliability",
    "plot_roc",
    "plot_train_fraction",
    "plot_uaps",
]

Record = Mapping[str, Any]
_SOURCE_STYLE = {"train": ("#d62728", "o"), "natural": ("#1f77b4", "s"), "random": ("#ff7f0e", "^")}


def _label_panel(ax, xlabel: str, metric: str, title: str, *, legend_size: int) -> None:
    """A metric panel's axis labels, title, grid and legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"test {metric}")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)

def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _label_colors(labels: Sequence[str]) -> dict[str, Any]:
    """A stable colour per label (sorted, tab10 then tab20), the same in every figure."""
    from matplotlib import colormaps

    labels = sorted({str(x) for x in labels})
    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}


def pareto_front(cost: Sequence[float], value: Sequence[float], *, higher_is_better: bool = True) -> np.ndarray:
    """Boolean mask of the points no other point dominates (cost no higher, value no worse, one strictly).

    Args:
        cost: cost per point (trainable parameters, seconds); smaller is better.
        value: metric per point.
        higher_is_better: direction of ``value``.

    Returns:
        bool array (N,), True on the Pareto front. NaN points are never on it.
    """
    c = np.asarray(cost, dtype=float)
    v = np.asarray(value, dtype=float) * (1.0 if higher_is_better else -1.0)
    ok = ~(np.isnan(c) | np.isnan(v))
    front = np.zeros(len(c), dtype=bool)
    for i in np.flatnonzero(ok):
        others = ok & (c <= c[i]) & (v >= v[i]) & ((c < c[i]) | (v > v[i]))
        front[i] = not others.any()
    return front


def _group_stats(frame: pd.DataFrame, by: list[str], metric: str) -> pd.DataFrame:
    g = frame.groupby(by, dropna=False)
    out = g.agg(mean=(metric, "mean"), sd=(metric, "std"), n=(metric, "count"),
                params=("trainable_params", "mean"), seconds=("train_seconds", "mean")).reset_index()
    out["sd"] = out["sd"].fillna(0.0)
    return out


def plot_depth(runs: Sequence[Record], metric: str = "auc") -> Figure | None:
    """Metric vs fine-tuning depth per arch, mean ± sd over seeds (Kandel & Castelli's plot).

    Depth is the record's ``depth``: top_k/layers_k runs at k, ``linear`` at 0 and ``full`` at
    its depth (all non-head blocks). One panel per (dataset, family) with top_k and layers_k
    apart, since blocks and layers are different units; ``full`` joins only the block panels.
    Runs at smaller train fractions are left out.

    Returns:
        Figure, or None without top_k/layers_k runs.
    """
    main, _ = main_fraction_runs(done_runs(runs))
    frame = runs_frame(main, [metric]).dropna(subset=[metric])
    if frame.empty or not frame["strategy"].isin(["top_k", "layers_k"]).any():
        return None
    panels = []
    for (dataset,), _ in frame.groupby(["dataset"], sort=True):
        for family in ("top_k", "layers_k"):
            if ((frame["dataset"] == dataset) & (frame["strategy"] == family)).any():
                panels.append((dataset, family))
    ncols = min(len(panels), 2)
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(5.0 * ncols, 3.6 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax, (dataset, family) in zip(axes, panels):
        keep = ["linear", family] + (["full"] if family == "top_k" else [])
        sel = frame[(frame["dataset"] == dataset) & frame["strategy"].isin(keep)].copy()
        # older records may lack depth for the end points: linear = 0, full = all non-head blocks
        sel.loc[sel["depth"].isna() & (sel["strategy"] == "linear"), "depth"] = 0
        is_full = sel["depth"].isna() & (sel["strategy"] == "full")
        sel.loc[is_full, "depth"] = sel.loc[is_full, "num_blocks"] - 1
        sel = sel[sel["depth"].notna()]
        sel["depth"] = sel["depth"].astype(float)
        for arch, g in sel.groupby("arch", sort=True):
            st = _group_stats(g, ["depth"], metric).sort_values("depth")
            ax.errorbar(st["depth"], st["mean"], yerr=st["sd"], marker="o", capsize=3, label=str(arch))
            full = g[g["strategy"] == "full"]
            if len(full):
                ax.annotate("full", (float(full["depth"].iloc[0]), float(full[metric].mean())),
                            textcoords="offset points", xytext=(4, -12), fontsize=8)
        _label_panel(ax, f"trainable top {'blocks' if family == 'top_k' else 'layers'} (0 = head only)", metric,
                     f"{dataset}: {family}", legend_size=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return fig


def plot_train_fraction(runs: Sequence[Record], metric: str = "auc") -> Figure | None:
    """Metric vs training-set fraction, scratch vs fine-tuned, mean ± sd (Tajbakhsh's plot).

    Draws every label that has runs at two or more fractions; ``scratch`` dashed.

    Returns:
        Figure, or None when no label has runs at two or more fractions.
    """
    frame = runs_frame(done_runs(runs), [metric]).dropna(subset=[metric])
    if frame.empty:
        return None
    counts = frame.groupby(["dataset", "arch", "label"])["train_fraction"].nunique()
    keys = counts[counts >= 2].index
    if not len(keys):
        return None
    panels = sorted({(d, a) for d, a, _ in keys})
    ncols = min(len(panels), 2)
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(5.0 * ncols, 3.6 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = _label_colors([k[2] for k in keys])
    for ax, (dataset, arch) in zip(axes, panels):
        for d, a, label in keys:
            if (d, a) != (dataset, arch):
                continue
            g = frame[(frame["dataset"] == d) & (frame["arch"] == a) & (frame["label"] == label)]
            st = _group_stats(g, ["train_fraction"], metric).sort_values("train_fraction")
            ax.errorbar(st["train_fraction"], st["mean"], yerr=st["sd"], marker="o", capsize=3,
                        color=colors[label], linestyle="--" if label == "scratch" else "-", label=label)
        _label_panel(ax, "fraction of the training set", metric, f"{dataset} / {arch}", legend_size=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return fig


def plot_cost(runs: Sequence[Record], metric: str = "auc") -> Figure | None:
    """Metric vs trainable parameters and vs training time, Pareto front marked.

    One point per (arch, label), mean ± sd over seeds and datasets at each dataset's largest
    train fraction; the front (cheapest for its metric) is joined by a line and circled.

    Returns:
        Figure, or None without runs that have the metric.
    """
    main, _ = main_fraction_runs(done_runs(runs))
    frame = runs_frame(main, [metric]).dropna(subset=[metric])
    if frame.empty:
        return None
    st = _group_stats(frame, ["arch", "label"], metric)
    colors = _label_colors(st["label"])
    markers = dict(zip(sorted(st["arch"].astype(str).unique()), "osD^vP*X"))
    fig = _figure(10.0, 4.0)
    axes = fig.subplots(1, 2)
    better = higher_is_better(metric)
    for ax, cost, xlabel in ((axes[0], "params", "trainable parameters"), (axes[1], "seconds", "training time (s)")):
        for row in st.itertuples():
            ax.errorbar(getattr(row, cost), row.mean, yerr=row.sd, marker=markers[str(row.arch)],
                        color=colors[row.label], capsize=2, linestyle="none")
        front = pareto_front(st[cost], st["mean"], higher_is_better=better)
        f = st[front].sort_values(cost)
        ax.plot(f[cost], f["mean"], color="black", linewidth=1, drawstyle="steps-post", zorder=0,
                label="Pareto front")
        ax.scatter(f[cost], f["mean"], s=160, facecolors="none", edgecolors="black", linewidths=1.2)
        named = set()
        for row in f.itertuples():
            if row.label in named:
                continue  # one name per label: the arch markers tell the points apart
            named.add(row.label)
            ax.annotate(f"{row.label}", (getattr(row, cost), row.mean), textcoords="offset points",
                        xytext=(5, 5), fontsize=8)
        if (st[cost] > 0).all() and st[cost].max() / max(st[cost].min(), 1e-12) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test {metric}")
        ax.grid(alpha=0.3)
    handles = [axes[0].plot([], [], marker="o", linestyle="none", color=c, label=lab)[0] for lab, c in colors.items()]
    handles += [axes[0].plot([], [], marker=m, linestyle="none", color="black", label=a)[0] for a, m in markers.items()]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    return fig


#: Strategies that train (or fit) a small part of every block rather than whole blocks.
PEFT_STRATEGIES = ("bitfit", "norm", "lora", "knn")
_SHOTS_SUFFIX = re.compile(r" \[\d+/class\]$")


def base_label(label: str) -> str:
    """A run label without its k-shot suffix (``full [5/class]`` → ``full``)."""
    return _SHOTS_SUFFIX.sub("", str(label))


def efficiency_frontier(runs: Sequence[Record], metric: str = "auc") -> pd.DataFrame:
    """One row per (dataset, arch, label) at the main data size: mean trainable parameters, the mean
    validation metric (what selects) and the mean test metric, the family (``peft`` or ``depth``) and
    whether the point is on the validation Pareto front (fewest trainable parameters for its
    validation metric) of its dataset and arch."""
    main, _ = main_fraction_runs(done_runs(runs))
    frame = runs_frame(main, [metric])
    frame["val"] = runs_frame(main, [metric], split="val")[metric].values
    frame = frame.dropna(subset=["val"])
    if frame.empty:
        return pd.DataFrame(columns=["dataset", "arch", "label", "family", "params", "val", "test", "n", "pareto"])
    out = frame.groupby(["dataset", "arch", "label"], sort=True).agg(
        strategy=("strategy", "first"), params=("trainable_params", "mean"), val=("val", "mean"),
        test=(metric, "mean"), test_sd=(metric, "std"), n=("val", "size")).reset_index()
    out["family"] = np.where(out["strategy"].isin(PEFT_STRATEGIES), "peft", "depth")
    out["pareto"] = False
    for _, idx in out.groupby(["dataset", "arch"]).groups.items():
        sub = out.loc[idx]
        out.loc[idx, "pareto"] = pareto_front(sub["params"], sub["val"], higher_is_better=higher_is_better(metric))
    return out


def plot_efficiency_frontier(runs: Sequence[Record], metric: str = "auc") -> Figure | None:
    """The parameter-efficiency frontier: validation metric (left; what selects) and test metric
    (right) vs trainable parameters, one point per configuration at the main data size, PEFT
    strategies (squares) beside the depth strategies (circles); the validation Pareto set is circled
    in both panels (it is chosen on validation only).

    Returns:
        Figure, or None without a PEFT run or without two configurations.
    """
    st = efficiency_frontier(runs, metric)
    if len(st) < 2 or not (st["family"] == "peft").any():
        return None
    colors = _label_colors(st["label"])
    fig = _figure(10.5, 4.2)
    axes = fig.subplots(1, 2, sharex=True)
    # a kNN probe trains nothing: drawn at 1 parameter so the log axis can show it
    x = st["params"].clip(lower=1)
    for ax, col, title in ((axes[0], "val", "validation (selects)"), (axes[1], "test", "test (reported)")):
        for i, row in enumerate(st.itertuples()):
            ax.plot(x.iloc[i], getattr(row, col), marker="s" if row.family == "peft" else "o", markersize=7,
                    color=colors[row.label], linestyle="none")
        front = st["pareto"].values
        f = st[front].assign(x=x[front]).sort_values("x")
        ax.plot(f["x"], f[col], color="black", linewidth=1, drawstyle="steps-post", zorder=0)
        ax.scatter(f["x"], f[col], s=170, facecolors="none", edgecolors="black", linewidths=1.2)
        for row in f.itertuples():
            ax.annotate(row.label, (row.x, getattr(row, col)), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log; kNN at 1)")
        ax.set_ylabel(f"{col} {metric}")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    handles = [axes[0].plot([], [], marker="s" if st.loc[st["label"] == lab, "family"].iloc[0] == "peft" else "o",
                            linestyle="none", color=c, label=lab)[0] for lab, c in colors.items()]
    handles.append(axes[0].scatter([], [], s=170, facecolors="none", edgecolors="black", label="Pareto set (val)"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    return fig


def data_size_frame(runs: Sequence[Record], metric: str = "auc") -> pd.DataFrame:
    """Per (dataset, arch, strategy label without its k-shot suffix, images per class): the mean
    and sd of the test metric, the mean validation metric and the run count; images per class is
    the run's training images over its classes (the k-shot K, or the whole split's mean)."""
    rows = []
    for r in done_runs(runs):
        test, val = (r.get("metrics") or {}).get(metric), (r.get("val_metrics") or {}).get(metric)
        if test is None or not r.get("num_train") or not r.get("num_classes"):
            continue
        frac = r.get("train_fraction")
        if frac is not None and not np.isclose(float(frac), 1.0):
            continue  # the train-fraction plot shows those
        rows.append({"dataset": r.get("dataset"), "arch": r.get("arch"), "label": base_label(r.get("label") or ""),
                     "per_class": float(r["num_train"]) / float(r["num_classes"]), "test": float(test),
                     "val": float("nan") if val is None else float(val)})
    frame = pd.DataFrame(rows, columns=["dataset", "arch", "label", "per_class", "test", "val"])
    if frame.empty:
        return frame.assign(sd=[], n=[])
    out = frame.groupby(["dataset", "arch", "label", "per_class"], sort=True).agg(
        mean=("test", "mean"), sd=("test", "std"), val=("val", "mean"), n=("test", "size")).reset_index()
    out["sd"] = out["sd"].fillna(0.0)
    return out


def overtakes(frame: pd.DataFrame, challenger: str = "full", reference: str = "linear") -> tuple[float, float] | None:
    """The interval of images per class where ``challenger`` overtakes ``reference`` on the mean
    validation metric (the last size where it is not better, the first from which it stays better),
    from one (dataset, arch) of :func:`data_size_frame`; None when it never does or always did."""
    a = frame[frame["label"] == challenger].set_index("per_class")["val"]
    b = frame[frame["label"] == reference].set_index("per_class")["val"]
    sizes = sorted(set(a.index) & set(b.index))
    better = [bool(a[s] > b[s]) for s in sizes]
    if len(sizes) < 2 or not better[-1] or all(better):
        return None
    first = max(i for i, ok in enumerate(better) if not ok) + 1
    return float(sizes[first - 1]), float(sizes[first])


def plot_data_size(runs: Sequence[Record], metric: str = "auc") -> Figure | None:
    """Test metric vs images per class (k-shot training sets, ``train_per_class``), one line per
    strategy (mean ± sd over seeds); the interval where full fine-tuning overtakes the linear probe
    on validation is shaded.

    Returns:
        Figure, or None without k-shot runs (or with a single data size).
    """
    if not any(r.get("train_per_class") for r in done_runs(runs)):
        return None
    frame = data_size_frame(runs, metric)
    if frame.empty or frame["per_class"].nunique() < 2:
        return None
    panels = sorted({(d, a) for d, a in zip(frame["dataset"], frame["arch"])})
    ncols = min(len(panels), 2)
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(5.5 * ncols, 4.0 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = _label_colors(frame["label"])
    for ax, (dataset, arch) in zip(axes, panels):
        sel = frame[(frame["dataset"] == dataset) & (frame["arch"] == arch)]
        for label, g in sel.groupby("label", sort=True):
            if g["per_class"].nunique() < 2:
                continue
            g = g.sort_values("per_class")
            family = g["label"].iloc[0].split(":")[0] in PEFT_STRATEGIES
            ax.errorbar(g["per_class"], g["mean"], yerr=g["sd"], marker="s" if family else "o", capsize=3,
                        color=colors[label], linestyle="--" if family else "-", label=label)
        span = overtakes(sel)
        if span is not None:
            ax.axvspan(*span, color="grey", alpha=0.2, label=f"full overtakes linear (val): {span[0]:g}–{span[1]:g}")
        ax.set_xscale("log")
        sizes = sorted(sel["per_class"].unique())
        ax.set_xticks(sizes, [f"{v:g}" for v in sizes])  # the sizes themselves, not log-scale decades
        ax.minorticks_off()
        _label_panel(ax, "training images per class (log)", metric, f"{dataset} / {arch}", legend_size=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return fig


def plot_auto_rgn(runs: Sequence[Record]) -> Figure | None:
    """Auto-RGN per-block learning-rate weights over epochs (``extras.auto_rgn``), mean over runs per arch.

    Returns:
        Figure with one panel per arch, or None when no run has ``extras.auto_rgn``.
    """
    rows = []
    for r in done_runs(runs):
        for entry in ((r.get("extras") or {}).get("auto_rgn") or []):
            for block_idx, (block, w) in enumerate((entry.get("block_weights") or {}).items()):
                rows.append({"arch": r.get("arch"), "epoch": entry.get("epoch"), "block": block,
                             "block_idx": block_idx, "weight": float(w)})
    if not rows:
        return None
    frame = pd.DataFrame(rows)
    archs = sorted(frame["arch"].astype(str).unique())
    fig = _figure(5.0 * min(len(archs), 2), 3.6 * math.ceil(len(archs) / 2))
    axes = fig.subplots(math.ceil(len(archs) / 2), min(len(archs), 2), squeeze=False).ravel()
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    for ax, arch in zip(axes, archs):
        g = frame[frame["arch"].astype(str) == arch]
        order = g.groupby("block")["block_idx"].min().sort_values().index
        for i, block in enumerate(order):
            b = g[g["block"] == block].groupby("epoch")["weight"].mean()
            ax.plot(b.index, b.to_numpy(), marker=".", color=cmap(i / max(len(order) - 1, 1)), label=str(block))
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean LR weight (RGN / max RGN)")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"Auto-RGN: {arch}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncols=2)
    for ax in axes[len(archs):]:
        ax.set_visible(False)
    return fig


def plot_deft(search: Record) -> Figure | None:
    """DEFT: best and mean fitness per generation, and the chosen mask over the block diagram.

    Units are drawn as boxes input → output, trainable ones filled; the head always trains
    and is appended when ``unit_names`` leaves it out.

    Returns:
        Figure, or None when the search has neither history nor a mask.
    """
    history = list(search.get("history") or [])
    mask = list(search.get("best_mask") or [])
    if not history and not mask:
        return None
    fig = _figure(9.0, 4.6)
    ax_fit, ax_mask = fig.subplots(2, 1, height_ratios=[3, 1.3])
    if history:
        gen = [h.get("generation", i) for i, h in enumerate(history)]
        ax_fit.plot(gen, [h.get("best_fitness") for h in history], marker="o", label="best")
        ax_fit.plot(gen, [h.get("mean_fitness") for h in history], marker=".", linestyle="--", label="population mean")
        ax_fit.set_xlabel("generation")
        ax_fit.set_ylabel("fitness (validation)")
        ax_fit.legend(fontsize=8)
        ax_fit.grid(alpha=0.3)
        ax_fit.xaxis.get_major_locator().set_params(integer=True)
    else:
        ax_fit.set_visible(False)
    names = [str(n) for n in (search.get("unit_names") or [f"unit_{i}" for i in range(len(mask))])]
    bits = [bool(b) for b in mask] + [False] * max(0, len(names) - len(mask))
    if "head" not in names:
        names, bits = [*names, "head"], [*bits, True]
    for i, (name, on) in enumerate(zip(names, bits)):
        ax_mask.add_patch(Rectangle((i + 0.05, 0.1), 0.9, 0.8, facecolor="#2ca02c" if on else "white",
                                    edgecolor="black", linewidth=1.2))
        ax_mask.text(i + 0.5, 0.5, name, ha="center", va="center", fontsize=8 if len(names) < 12 else 6,
                     rotation=0 if len(names) < 12 else 90, color="white" if on else "black")
    ax_mask.set_xlim(0, len(names))
    ax_mask.set_ylim(0, 1)
    ax_mask.axis("off")
    ax_mask.set_title("chosen mask, input → output (filled = fine-tuned)", fontsize=9)
    return fig


def _predictions(run: Record) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    pred = run.get("predictions") or {}
    if "y_true" not in pred or "y_prob" not in pred:
        return None
    y_true = np.asarray(pred["y_true"])
    y_prob = np.asarray(pred["y_prob"], dtype=float)
    if y_true.size == 0 or len(y_true) != len(y_prob):
        return None
    if y_prob.ndim == 1:  # binary runs may store P(positive) only
        y_prob = np.stack([1 - y_prob, y_prob], axis=1)
    names = [str(c) for c in (pred.get("class_names") or range(y_prob.shape[1]))]
    return y_true, y_prob, names


def _best_runs(runs: Sequence[Record], metric: str, max_runs: int) -> list[Record]:
    """The best run with predictions per label, for the ``max_runs`` best labels — best on validation."""
    main, _ = main_fraction_runs(done_runs(runs))
    with_pred = [r for r in main if _predictions(r) is not None
                 and (r.get("val_metrics") or {}).get(metric) is not None]
    sign = 1.0 if higher_is_better(metric) else -1.0
    with_pred.sort(key=lambda r: -sign * float(r["val_metrics"][metric]))
    chosen, seen = [], set()
    for r in with_pred:
        key = (r.get("dataset"), r.get("label") or r.get("strategy"))
        if key not in seen:
            seen.add(key)
            chosen.append(r)
        if len(chosen) == max_runs:
            break
    return chosen


def _run_title(r: Record, metric: str) -> str:
    return (f"{r.get('label') or r.get('strategy')} · {r.get('arch')} · seed {r.get('seed')}\n"
            f"{r.get('dataset')}, {metric} {float(r['metrics'][metric]):.3f}")


def plot_roc(runs: Sequence[Record], metric: str = "auc", max_runs: int = 4) -> Figure | None:
    """ROC curves (one-vs-rest per class, per label for multi-label) of the best runs.

    Args:
        runs: run records; only runs with ``predictions`` count.
        metric: metric that ranks runs.
        max_runs: the best run of each of this many best labels.

    Returns:
        Figure, or None when no run stores predictions.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    chosen = _best_runs(runs, metric, max_runs)
    if not chosen:
        return None
    fig = _figure(3.3 * len(chosen), 3.5)
    axes = fig.subplots(1, len(chosen), squeeze=False).ravel()
    for ax, r in zip(axes, chosen):
        y_true, y_prob, names = _predictions(r)
        multilabel = y_true.ndim == 2
        if not multilabel and y_prob.shape[1] == 2:
            targets = [(names[1] if len(names) > 1 else "positive", y_true == 1, y_prob[:, 1])]
        else:
            targets = [(names[c] if c < len(names) else str(c),
                        (y_true[:, c] == 1) if multilabel else (y_true == c), y_prob[:, c])
                       for c in range(y_prob.shape[1])]
        for name, positive, score in targets[:10]:
            if positive.all() or not positive.any():
                continue  # a class absent from the test set has no ROC curve
            fpr, tpr, _ = roc_curve(positive.astype(int), score)
            ax.plot(fpr, tpr, label=f"{name} ({roc_auc_score(positive.astype(int), score):.2f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(_run_title(r, metric), fontsize=8)
        ax.set_aspect("equal")
        ax.legend(fontsize=7, loc="lower right")
    return fig


def plot_reliability(runs: Sequence[Record], metric: str = "auc", max_runs: int = 4) -> Figure | None:
    """Reliability diagram (accuracy vs confidence per bin, the run's stored curve) of the same best runs
    as :func:`plot_roc`; the legend gives the test ECE before and after temperature scaling.

    Returns:
        Figure, or None when no such run records a calibration.
    """
    chosen = [r for r in _best_runs(runs, metric, max_runs) if (r.get("calibration") or {}).get("reliability")]
    if not chosen:
        return None
    fig = _figure(4.2, 3.8)
    ax = fig.subplots()
    colors = _label_colors([r.get("label") or r.get("strategy") for r in chosen])
    for r in chosen:
        cal, label = r["calibration"], str(r.get("label") or r.get("strategy"))
        curve = cal["reliability"]
        ax.plot(curve["confidence"], curve["accuracy"], marker="o", markersize=3, color=colors[label],
                label=f"{label} (ECE {cal['ece']:.3f} → {cal['ece_scaled']:.3f} at T={cal['temperature']:.2f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("confidence (mean per bin)")
    ax.set_ylabel("accuracy (per bin)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.legend(fontsize=6, loc="upper left")
    return fig


def plot_confusion(runs: Sequence[Record], metric: str = "auc", max_runs: int = 4) -> Figure | None:
    """Confusion matrices (argmax prediction) of the best runs; multi-label runs are skipped.

    Returns:
        Figure, or None when no single-label run stores predictions.
    """
    from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

    chosen = [r for r in _best_runs(runs, metric, max_runs) if np.asarray(r["predictions"]["y_true"]).ndim == 1]
    if not chosen:
        return None
    fig = _figure(3.3 * len(chosen), 3.6)
    axes = fig.subplots(1, len(chosen), squeeze=False).ravel()
    for ax, r in zip(axes, chosen):
        y_true, y_prob, names = _predictions(r)
        labels = list(range(y_prob.shape[1]))
        cm = confusion_matrix(y_true.astype(int), y_prob.argmax(axis=1), labels=labels)
        ConfusionMatrixDisplay(cm, display_labels=names[: len(labels)]).plot(
            ax=ax, colorbar=False, cmap="Blues", xticks_rotation=45 if len(labels) > 3 else "horizontal")
        ax.set_title(_run_title(r, metric), fontsize=8)
    return fig


def plot_fooling(attacks: Sequence[Record], runs: Sequence[Record]) -> Figure | None:
    """Non-targeted UAP fooling rate per ζ and UAP source, one panel per strategy label.

    With three or more ζ, a line per source over ζ (points: the mean over audited runs; bars: the
    mean of their 95% CI bounds) and the random control (a random vector of the same norm) as a grey
    dotted line. With fewer than three ζ a line says little (one point on an empty axis), so each
    panel is a grouped bar chart instead: a group per ζ, a bar per source and one for the random
    control, the CI as error bars.

    Returns:
        Figure, or None without non-targeted attacks.
    """
    frame = attacks_frame(attacks, runs)
    if frame.empty:
        return None
    frame = frame[frame["targeted"].isna() & frame["zeta"].notna() & frame["fooling_rate"].notna()]
    if frame.empty:
        return None
    frame = frame.assign(label=frame["label"].fillna("(unknown run)"))
    labels = sorted(frame["label"].astype(str).unique())
    ncols = min(len(labels), 3)
    nrows = math.ceil(len(labels) / ncols)
    fig = _figure(3.6 * ncols, 3.2 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()
    bars = frame["zeta"].nunique() < 3
    for ax, label in zip(axes, labels):
        g = frame[frame["label"].astype(str) == label]
        (_fooling_bars if bars else _fooling_lines)(ax, g)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("ζ (% of mean input norm)")
        ax.set_ylabel("fooling rate")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3, axis="y" if bars else "both")
    axes[0].legend(fontsize=8)
    for ax in axes[len(labels):]:
        ax.set_visible(False)
    return fig


def plot_source_curve(attacks: Sequence[Record], runs: Sequence[Record], max_curves: int = 12) -> Figure | None:
    """Test fooling rate vs the number of source images the UAP has seen (each record's ``source_curve``: one
    point per chunk), per non-targeted UAP; the dotted line marks the 10,000 natural images Minagi et al.
    needed for a rate well above random.

    Returns:
        Figure, or None without non-targeted attacks that store a curve.
    """
    frame = attacks_frame(attacks, runs)
    if frame.empty:
        return None
    frame = frame[frame["targeted"].isna() & frame["source_curve"].map(lambda c: isinstance(c, list) and len(c) > 0)]
    if frame.empty:
        return None
    fig = _figure(6.0, 3.6)
    ax = fig.subplots()
    for r in frame.head(max_curves).itertuples():
        points = np.asarray(r.source_curve, dtype=float).reshape(-1, 2)
        color, marker = _SOURCE_STYLE.get(str(r.source), ("#9467bd", "D"))
        ax.plot(points[:, 0], points[:, 1], color=color, marker=marker, alpha=0.8,
                label=f"{r.label or r.run_id}, {r.source}, ζ = {100 * float(r.zeta):.3g}%")
        if r.random_fooling_rate is not None and not math.isnan(r.random_fooling_rate):
            ax.axhline(r.random_fooling_rate, color=color, linestyle=":", linewidth=0.8)
    ax.axvline(10_000, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("source images seen (log scale; dashed: 10,000, Minagi et al.)")
    ax.set_ylabel("test fooling rate")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return fig


def _fooling_stats(s: pd.DataFrame) -> pd.DataFrame:
    return s.groupby("zeta").agg(rate=("fooling_rate", "mean"), low=("fooling_ci_low", "mean"),
                                 high=("fooling_ci_high", "mean")).reset_index()


def _yerr(st: pd.DataFrame) -> np.ndarray:
    return np.nan_to_num(np.vstack([(st["rate"] - st["low"]).clip(lower=0), (st["high"] - st["rate"]).clip(lower=0)]))


def _fooling_lines(ax, g: pd.DataFrame) -> None:
    for source, s in g.groupby("source", sort=True):
        st = _fooling_stats(s)
        color, marker = _SOURCE_STYLE.get(str(source), ("#9467bd", "D"))
        ax.errorbar(100 * st["zeta"], st["rate"], yerr=_yerr(st), marker=marker, color=color,
                    capsize=3, label=f"UAP from {source}")
    rnd = g.groupby("zeta")["random_fooling_rate"].mean().dropna()
    if len(rnd):
        ax.plot(100 * rnd.index, rnd.to_numpy(), color="grey", linestyle=":", marker="x", label="random control")


def _fooling_bars(ax, g: pd.DataFrame) -> None:
    """A group per ζ: a bar per UAP source (with its CI), then the random control (hatched)."""
    zetas = sorted(g["zeta"].unique())
    sources = sorted(g["source"].astype(str).unique())
    rnd = g.groupby("zeta")["random_fooling_rate"].mean()
    num_bars = len(sources) + int(rnd.notna().any())
    width = 0.8 / num_bars
    x = np.arange(len(zetas), dtype=float)
    for i, source in enumerate(sources):
        st = _fooling_stats(g[g["source"].astype(str) == source]).set_index("zeta").reindex(zetas)
        color, _ = _SOURCE_STYLE.get(source, ("#9467bd", "D"))
        ax.bar(x - 0.4 + width * (i + 0.5), st["rate"].fillna(0), width, yerr=_yerr(st), capsize=3, color=color,
               label=f"UAP from {source}")
    if rnd.notna().any():
        ax.bar(x + 0.4 - width / 2, rnd.reindex(zetas).fillna(0).to_numpy(), width, color="#d9d9d9",
               edgecolor="grey", hatch="//", label="random control")
    ax.set_xticks(x, [f"{100 * z:.3g}%" for z in zetas])
    ax.set_xlim(-0.6, len(zetas) - 0.4)


def compact(fig: Figure | None, *, panel: str | None = None, width: float = 3.4, height: float = 2.7,
            max_legend: int = 4) -> Figure | None:
    """``fig`` redrawn small for the report's first screen: one panel, the one titled ``panel`` when there
    is one (e.g. the recommended configuration's), else the first (the others are in
    the full figure below) filling ``width`` × ``height`` inches at 100 dpi (340 × 270 px: three to a
    row in the headline box at 1280 px), ticks and labels at 10 pt or more (≥ 13 px at 100 dpi), and
    its legend inside the panel when it has at most ``max_legend`` entries (a longer one would hide
    the data; the full figure has it). Drawn on a copy: ``fig`` is left as it is."""
    if fig is None:
        return None
    import copy

    from matplotlib.gridspec import GridSpec
    from matplotlib.text import Text

    small = copy.deepcopy(fig)
    visible = [ax for ax in small.axes if ax.get_visible()]
    if not visible:
        return None
    keep = next((ax for ax in visible if panel is not None and ax.get_title() == panel), visible[0])
    for ax in list(small.axes):
        if ax is not keep:
            small.delaxes(ax)
    small.legends.clear()  # a figure legend (outside the panels) does not fit
    keep.set_subplotspec(GridSpec(1, 1, figure=small)[0])
    small.set_size_inches(width, height)
    handles, names = keep.get_legend_handles_labels()
    if keep.get_legend() is not None:
        keep.get_legend().remove()
    if 0 < len(handles) <= max_legend:
        keep.legend(handles, names, fontsize=9, loc="best", framealpha=0.8)
    in_legend = set(keep.get_legend().get_texts()) if keep.get_legend() is not None else set()
    for text in small.findobj(Text):
        if text not in in_legend and text.get_text() and text.get_fontsize() < 10:
            text.set_fontsize(10)
    keep.tick_params(labelsize=10, labelleft=True, labelbottom=True)  # a shared axis may have hidden them
    return small


def plot_uaps(attacks: Sequence[Record], runs: Sequence[Record] = (), max_images: int = 8) -> Figure | None:
    """A grid of the stored UAP images (``uap_png`` paths that exist on disk).

    Returns:
        Figure, or None when no attack has a readable ``uap_png``.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    from medtune._safepaths import MAX_EMBED_PIXELS, image_pixels, open_regular

    label_of = {r.get("run_id"): r.get("label") or r.get("strategy") for r in runs}
    images = []
    for a in attacks:
        path = a.get("uap_png")
        if not path or not Path(path).exists():
            continue
        try:  # a regular file under the report's pixel limit (its header read first): a store is untrusted
            pixels = image_pixels(path)
            if pixels > MAX_EMBED_PIXELS:
                raise OSError(f"{pixels / 1e6:.1f} Mpx, above the report's limit of {MAX_EMBED_PIXELS / 1e6:.0f} Mpx")
            with open_regular(path) as fh, Image.open(fh) as im:
                arr = np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            warnings.warn(f"the attack record {a.get('attack_id')}: image {path} not shown ({exc}).", stacklevel=2)
            continue
        zeta = a.get("zeta")
        title = f"{label_of.get(a.get('run_id'), a.get('run_id'))}\n{a.get('source')}"
        title += f", ζ={100 * float(zeta):.3g}%" if zeta is not None else ""
        images.append((arr, title))
        if len(images) == max_images:
            break
    if not images:
        return None
    ncols = min(len(images), 4)
    nrows = math.ceil(len(images) / ncols)
    fig = _figure(2.4 * ncols, 2.6 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (arr, title) in zip(axes, images):
        ax.imshow(arr, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    for ax in axes[len(images):]:
        ax.set_visible(False)
    return fig
