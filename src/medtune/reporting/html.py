"""One self-contained report file (HTML or Markdown) built from plain run/attack/search records.

The HTML file needs nothing else: figures are embedded as base64 PNG data URIs, the CSS is
inline, there is no JavaScript, and a Content-Security-Policy meta tag forbids the browser any
network fetch. Markdown reports write their PNGs beside the ``.md`` file. Both formats also
write the tables as CSV beside the report.

Content is assembled once as a list of sections of blocks (paragraphs, tables, figures,
notes) and then rendered by one of two small renderers, so both formats always say the same.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from medtune.errors import ConfigError
from medtune.reporting import plots
from medtune.reporting._records import (
    DEFAULT_METRICS,
    attacks_frame,
    check_metric,
    done_runs,
    higher_is_better,
    main_fraction_runs,
    runs_frame,
)
from medtune.reporting.stats import friedman, pairwise_wilcoxon, recommend, summarize

__all__ = ["build_report"]

Record = Mapping[str, Any]
_FORMATS = ("html", "md")


@dataclass
class _Table:
    """A rendered-ready table: header, string cells, and a CSS class per cell ("" = none)."""

    header: list[str]
    rows: list[list[str]]
    classes: list[list[str]] = field(default_factory=list)
    caption: str = ""


@dataclass
class _Figure:
    name: str
    figure: Figure
    caption: str


@dataclass
class _Section:
    anchor: str
    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)  # ("p"|"note"|"table"|"figure"|"facts", obj)


def build_report(
    runs: Sequence[Record],
    attacks: Sequence[Record] = (),
    searches: Sequence[Record] = (),
    *,
    title: str = "medtune report",
    out_path: str | Path,
    fmt: str = "html",
    metric: str = "auc",
    alpha: float = 0.05,
    main_zeta: float = 0.04,
) -> Path:
    """Write the report of a set of records, plus its tables as CSV beside it.

    Sections: a headline recommendation (:func:`~medtune.reporting.stats.recommend`), a summary
    table (best value per column per dataset highlighted, configurations not significantly
    worse than the best marked ≈), the plots, the statistics (Friedman, Wilcoxon + Holm),
    robustness (UAP audit), DEFT searches, a per-run appendix and reproducibility facts
    (package versions, config and data fingerprints). Parts without records are skipped with
    a short note.

    Args:
        runs: run records (RECORDS.md).
        attacks: attack records.
        searches: DEFT search records.
        title: report title.
        out_path: the ``.html``/``.md`` file to write; parent folders are created. CSV files
            ``<stem>_summary.csv``, ``<stem>_runs.csv``, ``<stem>_wilcoxon.csv``,
            ``<stem>_friedman.csv`` (and ``_attacks.csv``, ``_deft.csv`` when there are any)
            go beside it; Markdown also writes ``<stem>_<figure>.png`` files.
        fmt: ``"html"`` (self-contained, images inline) or ``"md"``.
        metric: the metric that ranks configurations.
        alpha: family-wise error rate of the strategy comparison.
        main_zeta: UAP budget ζ quoted in the headline.

    Returns:
        Path of the written report.

    Raises:
        ConfigError: unknown ``fmt``, a ``metric`` that no run stores, or ``alpha`` outside (0, 1).
    """
    if fmt not in _FORMATS:
        raise ConfigError(f"The 'fmt' parameter of build_report must be one of {', '.join(_FORMATS)}. "
                          f"Got {fmt!r}; use 'html' for one self-contained file.")
    if not 0 < alpha < 1:
        raise ConfigError(f"The 'alpha' parameter of build_report must be in (0, 1). Got {alpha!r}.")
    runs, attacks, searches = list(runs), list(attacks or ()), list(searches or ())
    check_metric(done_runs(runs), metric, "build_report")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    content = _Content(runs, attacks, searches, title=title, metric=metric, alpha=alpha, main_zeta=main_zeta)
    sections = content.build()
    for name, frame in content.csv.items():
        frame.to_csv(out_path.with_name(f"{out_path.stem}_{name}.csv"), index=False)
    if fmt == "html":
        text = _render_html(title, content, sections)
    else:
        text = _render_md(title, content, sections, out_path)
    out_path.write_text(text, encoding="utf-8")
    return out_path


# --------------------------------------------------------------------------- content


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, (int, float)):
        return f"{x:.{digits}f}"
    return str(x)


def _fmt_count(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    x = float(x)
    for div, unit in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.0f}"


def _fmt_p(p: Any) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "–"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


class _Content:
    """Builds the report's sections and CSV tables from the records."""

    def __init__(self, runs: list[Record], attacks: list[Record], searches: list[Record], *, title: str,
                 metric: str, alpha: float, main_zeta: float) -> None:
        self.runs, self.attacks, self.searches = runs, attacks, searches
        self.title, self.metric, self.alpha, self.main_zeta = title, metric, alpha, main_zeta
        self.done = done_runs(runs)
        self.main, self.fraction_note = main_fraction_runs(self.done)
        self.csv: dict[str, pd.DataFrame] = {}
        self.rec: dict[str, Any] = {}
        self.metrics = [metric, *[m for m in DEFAULT_METRICS if m != metric]]

    def build(self) -> list[_Section]:
        self.rec = recommend(self.done, self.attacks, self.metric, alpha=self.alpha, main_zeta=self.main_zeta)
        return [self._summary(), self._plots(), self._statistics(), self._robustness(), self._deft(),
                self._appendix(), self._reproducibility()]

    # -- headline -------------------------------------------------------------------------
    def cards(self) -> list[tuple[str, str]]:
        """Key numbers for the headline box: (value, caption)."""
        r = self.rec
        if r.get("label") is None:
            return []
        sd = f" ± {r['sd']:.3f}" if r.get("sd") is not None else ""
        cards = [(str(r["label"]), "recommended configuration"),
                 (f"{r['mean']:.3f}{sd}", f"test {self.metric} (best: {r['best_label']} {r['best_mean']:.3f})")]
        if r.get("params_ratio") is not None:
            cards.append((f"{r['params_ratio']:.1f}×", "fewer trainable parameters than full fine-tuning"))
        if r.get("time_ratio") is not None:
            cards.append((f"{r['time_ratio']:.1f}×", "faster training than full fine-tuning"))
        fool = r.get("fooling_rate") or {}
        for source in ("natural", "train", "random"):
            if source in fool:
                cards.append((f"{fool[source]['rate']:.0%}",
                              f"UAP fooling rate, ζ = {100 * self.main_zeta:.3g}%, {source}-image source "
                              f"(random control {fool[source]['random_rate']:.0%})"))
                break
        return cards

    def counts(self) -> str:
        failed = sum(1 for r in self.runs if r.get("status", "done") not in (None, "done"))
        f = runs_frame(self.done, [])
        parts = [f"{len(self.done)} finished run(s)"]
        if failed:
            parts.append(f"{failed} unfinished or failed")
        if len(f):
            parts.append(f"{f['dataset'].nunique()} dataset(s), {f['arch'].nunique()} arch(s), "
                         f"{f['label'].nunique()} configuration(s), {f['seed'].nunique()} seed(s)")
        parts.append(f"{len(self.attacks)} UAP audit(s), {len(self.searches)} DEFT search(es)")
        return "; ".join(parts)

    # -- sections ---------------------------------------------------------------------------
    def _summary(self) -> _Section:
        sec = _Section("summary", "Summary")
        self.csv["summary"] = summarize(self.done, by=("dataset", "arch", "label", "train_fraction"))
        if not self.done:
            sec.blocks.append(("note", "No finished runs: there is nothing to summarise."))
            return sec
        table = summarize(self.main, by=("dataset", "arch", "label"))
        table = table.sort_values(["dataset", "arch", f"{self.metric}_mean"],
                                  ascending=[True, True, not higher_is_better(self.metric)], kind="stable")
        metrics = [m for m in self.metrics if table[f"{m}_mean"].notna().any()]
        marked = set(self.rec.get("not_worse") or []) if self.rec.get("method") not in ("none", "single") else set()
        header = ["dataset", "arch", "configuration", "n", *metrics, "trainable params", "train time (s)"]
        rows, classes = [], []
        best: dict[tuple[str, str], float] = {}
        for dataset, g in table.groupby("dataset"):
            for m in metrics:
                col = g[f"{m}_mean"]
                best[(dataset, m)] = col.max() if higher_is_better(m) else col.min()
            best[(dataset, "params")] = g["trainable_params"].min()
            best[(dataset, "seconds")] = g["train_seconds"].min()
        for row in table.itertuples(index=False):
            d = row._asdict()
            label = str(d["label"])
            mark = " ≈" if label in marked else ""
            rec_mark = " ★" if label == self.rec.get("label") else ""
            cells = [str(d["dataset"]), str(d["arch"]), f"{label}{mark}{rec_mark}", str(d["n"])]
            cls = ["", "", "rec" if rec_mark else ("nw" if mark else ""), ""]
            for m in metrics:
                sd = d[f"{m}_sd"]
                ci = (f" [{_fmt(d[f'{m}_ci_low'])}, {_fmt(d[f'{m}_ci_high'])}]"
                      if m == self.metric and not math.isnan(d[f"{m}_ci_low"]) else "")
                cells.append(f"{_fmt(d[f'{m}_mean'])} ± {_fmt(sd)}{ci}" if not math.isnan(sd) else _fmt(d[f"{m}_mean"]))
                cls.append("best" if d[f"{m}_mean"] == best[(d["dataset"], m)] else "")
            cells += [_fmt_count(d["trainable_params"]), _fmt(d["train_seconds"], 1)]
            cls += ["best" if d["trainable_params"] == best[(d["dataset"], "params")] else "",
                    "best" if d["train_seconds"] == best[(d["dataset"], "seconds")] else ""]
            rows.append(cells)
            classes.append(cls)
        caption = (f"Mean ± sd over seeds, [95% t-interval] for {self.metric}. Highlighted: best per column "
                   "within a dataset. ★ recommended; ≈ not significantly worse than the best "
                   f"({self._rule_text()}).")
        sec.blocks.append(("table", _Table(header, rows, classes, caption)))
        if self.fraction_note:
            sec.blocks.append(("note", self.fraction_note + " The summary CSV keeps every train fraction."))
        return sec

    def _rule_text(self) -> str:
        return {"wilcoxon_holm": f"Wilcoxon signed-rank over (dataset, arch, seed) blocks, Holm, α = {self.alpha:g}",
                "within_sd": "fallback: mean within one sd of the best, significance not testable",
                "within_tolerance": "fallback: mean within a fixed tolerance of the best, significance not testable",
                }.get(self.rec.get("method", ""), "no comparison")

    def _plots(self) -> _Section:
        sec = _Section("plots", "Plots")
        m = self.metric
        items = [
            ("depth", lambda: plots.plot_depth(self.done, m),
             f"How deeply to fine-tune: test {m} vs the number of trainable top blocks (mean ± sd over seeds; "
             "0 = linear probe, the last point = full fine-tuning), after Kandel & Castelli 2020.",
             "No top_k/layers_k runs: the depth plot is skipped."),
            ("cost", lambda: plots.plot_cost(self.done, m),
             f"Test {m} vs cost. The black step line and circles mark the Pareto front: no other configuration "
             "is both cheaper and better.", "No runs with the metric: the cost plot is skipped."),
            ("train_fraction", lambda: plots.plot_train_fraction(self.done, m),
             f"Test {m} vs training-set size, from scratch (dashed) vs fine-tuned, after Tajbakhsh et al. 2016.",
             "A single train fraction: the train-size plot is skipped."),
            ("auto_rgn", lambda: plots.plot_auto_rgn(self.done),
             "Auto-RGN: mean learning-rate weight per block and epoch (1 = the block with the largest relative "
             "gradient norm).", "No auto_rgn runs with per-block weights: the Auto-RGN plot is skipped."),
            ("roc", lambda: plots.plot_roc(self.done, m),
             "ROC curves of the best run of the best configurations (test split; legend: per-class AUC).",
             "No run stores test predictions: ROC curves and confusion matrices are skipped."),
            ("confusion", lambda: plots.plot_confusion(self.done, m),
             "Confusion matrices of the same runs (rows: true class, columns: predicted, argmax).", None),
        ]
        for name, draw, caption, missing in items:
            fig = draw()
            if fig is not None:
                sec.blocks.append(("figure", _Figure(name, fig, caption)))
            elif missing:
                sec.blocks.append(("note", missing))
        return sec

    def _statistics(self) -> _Section:
        sec = _Section("statistics", "Statistics")
        if not self.done:
            sec.blocks.append(("note", "No finished runs: no statistics."))
            return sec
        sec.blocks.append(("p", "Strategies are compared over blocks of (dataset, arch, seed) at each dataset's "
                                "largest train fraction: a Friedman test over complete blocks, then Wilcoxon "
                                "signed-rank tests against the best configuration with Holm's correction."))
        fr_rows, fr_csv = [], []
        main_fr: dict[str, Any] = {"mean_ranks": {}}
        for m in self.metrics:
            if not any(m in (r.get("metrics") or {}) for r in self.done):
                continue
            fr = friedman(self.done, m)
            fr_csv.append({k: v for k, v in fr.items() if k not in ("mean_ranks", "treatments", "blocks")})
            note = fr["note"].replace(self.fraction_note or "\0", "").strip()  # said once, below the table
            fr_rows.append([m, _fmt(fr["statistic"], 2), _fmt_p(fr["pvalue"]), str(fr["num_blocks"]),
                            str(fr["num_treatments"]), note])
            if m == self.metric:
                main_fr = fr
        self.csv["friedman"] = pd.DataFrame(fr_csv)
        sec.blocks.append(("table", _Table(["metric", "χ²", "p", "complete blocks", "treatments", "note"], fr_rows,
                                           caption="Friedman test per metric.")))
        if main_fr["mean_ranks"]:
            ranks = sorted(main_fr["mean_ranks"].items(), key=lambda kv: kv[1])
            sec.blocks.append(("table", _Table(["configuration", f"mean rank ({self.metric}, 1 = best)"],
                                               [[k, f"{v:.2f}"] for k, v in ranks],
                                               caption="Mean Friedman ranks over complete blocks.")))
        tests = pairwise_wilcoxon(self.done, self.metric, alpha=self.alpha)
        self.csv["wilcoxon"] = tests
        if len(tests) > 1:
            rows, classes = [], []
            for t in tests.itertuples():
                nw = t.not_worse_than_best
                verdict = "best" if t.label == t.reference else ("not worse" if nw else "worse" if nw is False else "–")
                rows.append([str(t.label), str(t.reference), str(t.n), _fmt(t.mean), _fmt(t.mean_diff, 4),
                             _fmt(t.statistic, 1), _fmt_p(t.pvalue), _fmt_p(t.p_holm), verdict])
                classes.append([""] * 8 + ["nw" if nw else ""])
            sec.blocks.append(("table", _Table(
                ["configuration", "vs", "pairs", f"mean {self.metric}", "difference", "W", "p", "p (Holm)", "verdict"],
                rows, classes,
                caption=f"Wilcoxon signed-rank vs the best configuration; verdict at α = {self.alpha:g}.")))
        else:
            sec.blocks.append(("note", "Fewer than two configurations: no pairwise tests."))
        if self.rec.get("notes"):
            sec.blocks.extend(("note", n) for n in self.rec["notes"])
        return sec

    def _robustness(self) -> _Section:
        sec = _Section("robustness", "Robustness: universal adversarial perturbations")
        if not self.attacks:
            sec.blocks.append(("note", "No UAP audits recorded: the robustness section is skipped "
                                       "(run `medtune attack RUN`)."))
            return sec
        frame = attacks_frame(self.attacks, self.runs)
        self.csv["attacks"] = frame
        frame = frame.assign(label=frame["label"].fillna("(run not in records)"))
        sec.blocks.append(("p", "Fooling rate: share of test images whose prediction changes under the UAP. "
                                "ζ is the perturbation norm as a fraction of the mean input norm (ξ = ζ·mean‖x‖, "
                                "pixels in [0, 1]); the random control is a random vector of the same norm."))
        fig = plots.plot_fooling(self.attacks, self.runs)
        if fig is not None:
            sec.blocks.append(("figure", _Figure("fooling", fig, "Fooling rate vs ζ per UAP source "
                                                                 "(mean over audited runs; bars: 95% CI).")))
        nt = frame[frame["targeted"].isna()]
        if len(nt):
            g = nt.groupby(["label", "source", "zeta"], dropna=False).agg(
                runs=("run_id", "nunique"), xi=("xi", "mean"), rate=("fooling_rate", "mean"),
                low=("fooling_ci_low", "mean"), high=("fooling_ci_high", "mean"),
                rnd=("random_fooling_rate", "mean")).reset_index()
            rows = [[str(r.label), str(r.source), f"{100 * r.zeta:.3g}%", _fmt(r.xi, 2), str(r.runs),
                     f"{_fmt(r.rate, 2)} [{_fmt(r.low, 2)}, {_fmt(r.high, 2)}]", _fmt(r.rnd, 2)]
                    for r in g.itertuples()]
            sec.blocks.append(("table", _Table(["configuration", "source", "ζ", "ξ (pixel units)", "runs",
                                                "fooling rate [95% CI]", "random control"], rows,
                                               caption="Non-targeted UAPs (means over runs).")))
        tg = frame[frame["targeted"].notna()]
        if len(tg):
            rows = [[str(r.label), str(r.source), f"{100 * r.zeta:.3g}%", _fmt(r.targeted, 0),
                     _fmt(r.targeted_success, 2), _fmt(r.clean_target_share, 2)] for r in tg.itertuples()]
            sec.blocks.append(("table", _Table(["configuration", "source", "ζ", "target class", "success rate",
                                                "clean share of target"], rows, caption="Targeted UAPs.")))
        fig = plots.plot_uaps(self.attacks, self.runs)
        if fig is not None:
            sec.blocks.append(("figure", _Figure("uaps", fig, "UAPs (amplified for visibility).")))
        else:
            sec.blocks.append(("note", "No UAP image files found (uap_png missing or not on disk)."))
        return sec

    def _deft(self) -> _Section:
        sec = _Section("deft", "DEFT layer search")
        if not self.searches:
            sec.blocks.append(("note", "No DEFT searches recorded: this section is skipped (run `medtune search`)."))
            return sec
        comparisons = []
        for i, s in enumerate(self.searches):
            names = [str(n) for n in (s.get("unit_names") or [])]
            mask = list(s.get("best_mask") or [])
            chosen = [n for n, b in zip(names, mask) if b]
            facts = [("search", str(s.get("search_id", i))), ("data / arch", f"{s.get('dataset')} / {s.get('arch')}"),
                     ("granularity", str(s.get("granularity", "block"))),
                     ("best fitness", _fmt(s.get("best_fitness"))),
                     ("generations", str(len(s.get("history") or []))),
                     ("search time (s)", _fmt(s.get("seconds"), 0)),
                     ("fine-tuned units", ", ".join(chosen) + (" + head" if "head" not in chosen else "")
                      if mask else "–")]
            sec.blocks.append(("facts", facts))
            fig = plots.plot_deft(s)
            if fig is not None:
                sec.blocks.append(("figure", _Figure(f"deft_{i}", fig, "Fitness per generation and the chosen mask.")))
            comp = list(s.get("comparison") or [])
            if comp:
                keys = list(dict.fromkeys(k for c in comp for k in c))
                sec.blocks.append(("table", _Table(keys, [[_fmt(c.get(k)) for k in keys] for c in comp],
                                                   caption="Best mask retrained at full fidelity vs baselines.")))
                comparisons += [{"search_id": s.get("search_id", i), **c} for c in comp]
        if comparisons:
            self.csv["deft"] = pd.DataFrame(comparisons)
        return sec

    def _appendix(self) -> _Section:
        sec = _Section("runs", "Appendix: every run")
        frame = runs_frame(self.runs, None)
        frame["config_sha"] = [_fingerprint(r.get("config")) for r in self.runs]
        self.csv["runs"] = frame
        if frame.empty:
            sec.blocks.append(("note", "No runs."))
            return sec
        metrics = [m for m in self.metrics if m in frame.columns]
        frame = frame.sort_values(["dataset", "arch", "label", "train_fraction", "seed"], kind="stable")
        header = ["run", "status", "dataset", "arch", "configuration", "seed", "fraction", *metrics,
                  "params", "time (s)", "config sha"]
        rows = [[str(r["run_id"]), str(r["status"]), str(r["dataset"]), str(r["arch"]), str(r["label"]),
                 str(r["seed"]), _fmt(r["train_fraction"], 2), *[_fmt(r[m]) for m in metrics],
                 _fmt_count(r["trainable_params"]), _fmt(r["train_seconds"], 1), r["config_sha"]]
                for _, r in frame.iterrows()]
        sec.blocks.append(("table", _Table(header, rows, caption="All runs, including unfinished ones.")))
        return sec

    def _reproducibility(self) -> _Section:
        sec = _Section("reproducibility", "Reproducibility")
        import medtune

        versions: dict[str, int] = {}
        for r in self.runs:
            v = r.get("versions") or {}
            key = ", ".join(f"{k} {v[k]}" for k in sorted(v)) or "(not recorded)"
            versions[key] = versions.get(key, 0) + 1
        data = sorted({(str(r.get("dataset")), str(r.get("data_fingerprint"))) for r in self.runs})
        records = {"runs": self.runs, "attacks": self.attacks, "searches": self.searches}
        facts = [("report generated", _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
                 ("medtune (report)", str(getattr(medtune, "__version__", "?"))),
                 ("input fingerprint", f"sha256 {_fingerprint(records)} of the records this report was built from"),
                 ("distinct configs", str(len({_fingerprint(r.get('config')) for r in self.runs})))]
        sec.blocks.append(("facts", facts))
        if versions:
            sec.blocks.append(("table", _Table(["package versions of the runs", "runs"],
                                               [[k, str(n)] for k, n in sorted(versions.items())])))
        if data:
            sec.blocks.append(("table", _Table(["dataset", "data fingerprint"], [list(d) for d in data])))
        sec.blocks.append(("p", "Every table is also written as CSV beside this report; the per-run "
                                "'config sha' is the sha256 (first 12 hex digits) of the run's resolved config."))
        return sec


# --------------------------------------------------------------------------- renderers

_CSS = """
:root { --ink:#1d2433; --muted:#5b6577; --line:#dde2ea; --accent:#1f6feb; --good:#e6f4ea; --goodink:#137333;
        --rec:#fff4d6; --note:#f6f8fa; }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); margin: 0; background: #fff; line-height: 1.45; }
header.top { background: linear-gradient(90deg, #0b3d91, #1f6feb); color: #fff; padding: 22px 32px 16px; }
header.top h1 { margin: 0 0 4px; font-size: 26px; }
header.top p { margin: 0; opacity: .9; font-size: 14px; }
main { max-width: 1180px; margin: 0 auto; padding: 8px 32px 40px; }
nav.toc { font-size: 13px; margin: 14px 0 0; }
nav.toc a { color: var(--accent); margin-right: 14px; text-decoration: none; }
.headline { border: 2px solid #f0b400; background: var(--rec); border-radius: 10px; padding: 16px 20px;
            margin: 20px 0; }
.headline h2 { margin: 0 0 8px; font-size: 18px; }
.headline p { margin: 0 0 10px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px;
        min-width: 160px; flex: 1 1 160px; }
.card .v { font-size: 22px; font-weight: 700; }
.card .c { font-size: 12px; color: var(--muted); }
section { margin-top: 28px; }
h2 { border-bottom: 2px solid var(--line); padding-bottom: 4px; font-size: 20px; }
figure { margin: 16px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
figcaption, .caption { font-size: 13px; color: var(--muted); margin-top: 4px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0 4px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top;
         white-space: nowrap; }
th { background: #f3f5f9; position: sticky; top: 0; }
td.best { background: var(--good); color: var(--goodink); font-weight: 700; }
td.nw { color: var(--goodink); }
td.rec { background: var(--rec); font-weight: 700; }
.note { background: var(--note); border-left: 4px solid #9aa4b2; padding: 6px 10px; font-size: 13px; margin: 8px 0; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; font-size: 13px; }
dl.facts dt { color: var(--muted); } dl.facts dd { margin: 0; }
@page { size: A4; margin: 12mm; }
@media print {
  header.top { background: none; color: var(--ink); border-bottom: 2px solid var(--ink); padding: 0 0 8px; }
  nav.toc { display: none; }
  main { max-width: none; padding: 0; }
  .headline, figure, table, .card { break-inside: avoid; }
  h2 { break-after: avoid; }
  th { position: static; }
  .scroll { overflow: visible; }
  table { font-size: 9px; }
  td, th { white-space: normal; }
}
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def _png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _html_table(t: _Table) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in t.header)
    body = []
    for i, row in enumerate(t.rows):
        cls = t.classes[i] if i < len(t.classes) else []
        cells = "".join(f'<td class="{e(cls[j])}">{e(c)}</td>' if j < len(cls) and cls[j] else f"<td>{e(c)}</td>"
                        for j, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    cap = f'<div class="caption">{e(t.caption)}</div>' if t.caption else ""
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>{cap}'


def _render_html(title: str, content: _Content, sections: list[_Section]) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f'<meta http-equiv="Content-Security-Policy" content="{e(_CSP)}">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
           f'<header class="top"><h1>{e(title)}</h1><p>{e(content.counts())}</p></header><main>',
           '<nav class="toc">' + "".join(f'<a href="#{e(s.anchor)}">{e(s.title)}</a>' for s in sections) + "</nav>",
           '<div class="headline" id="recommendation"><h2>Recommendation</h2>',
           f"<p>{e(content.rec.get('text', ''))}</p>"]
    cards = content.cards()
    if cards:
        out.append('<div class="cards">' + "".join(
            f'<div class="card"><div class="v">{e(v)}</div><div class="c">{e(c)}</div></div>' for v, c in cards)
            + "</div>")
    out.append("</div>")
    for s in sections:
        out.append(f'<section id="{e(s.anchor)}"><h2>{e(s.title)}</h2>')
        for kind, obj in s.blocks:
            if kind == "p":
                out.append(f"<p>{e(obj)}</p>")
            elif kind == "note":
                out.append(f'<div class="note">{e(obj)}</div>')
            elif kind == "table":
                out.append(_html_table(obj))
            elif kind == "facts":
                out.append('<dl class="facts">' + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in obj) + "</dl>")
            elif kind == "figure":
                data = base64.b64encode(_png_bytes(obj.figure)).decode("ascii")
                w, h = (int(round(x)) for x in obj.figure.get_size_inches() * obj.figure.dpi)
                out.append(f'<figure><img src="data:image/png;base64,{data}" width="{w}" height="{h}" '
                           f'alt="{e(obj.caption)}"><figcaption>{e(obj.caption)}</figcaption></figure>')
        out.append("</section>")
    out.append("</main></body></html>")
    return "\n".join(out)


def _md_escape(text: Any) -> str:
    text = html.escape(str(text), quote=False)
    for ch in "\\`*_[]|#":
        text = text.replace(ch, "\\" + ch)
    return text.replace("\n", " ")


def _md_table(t: _Table) -> str:
    lines = ["| " + " | ".join(_md_escape(h) for h in t.header) + " |", "|" + "---|" * len(t.header)]
    for i, row in enumerate(t.rows):
        cls = t.classes[i] if i < len(t.classes) else []
        cells = [f"**{_md_escape(c)}**" if j < len(cls) and cls[j] in ("best", "rec") else _md_escape(c)
                 for j, c in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    if t.caption:
        lines += ["", f"*{_md_escape(t.caption)}*"]
    return "\n".join(lines)


def _render_md(title: str, content: _Content, sections: list[_Section], out_path: Path) -> str:
    out = [f"# {_md_escape(title)}", "", _md_escape(content.counts()), "", "## Recommendation", "",
           f"> {_md_escape(content.rec.get('text', ''))}", ""]
    for v, c in content.cards():
        out.append(f"- **{_md_escape(v)}** {_md_escape(c)}")
    for s in sections:
        out += ["", f"## {_md_escape(s.title)}", ""]
        for kind, obj in s.blocks:
            if kind == "p":
                out += [_md_escape(obj), ""]
            elif kind == "note":
                out += [f"> *Note:* {_md_escape(obj)}", ""]
            elif kind == "table":
                out += [_md_table(obj), ""]
            elif kind == "facts":
                out += [f"- {_md_escape(k)}: {_md_escape(v)}" for k, v in obj] + [""]
            elif kind == "figure":
                png = out_path.with_name(f"{out_path.stem}_{obj.name}.png")
                png.write_bytes(_png_bytes(obj.figure))
                out += [f"![{_md_escape(obj.caption)}]({png.name})", "", f"*{_md_escape(obj.caption)}*", ""]
    return "\n".join(out) + "\n"
