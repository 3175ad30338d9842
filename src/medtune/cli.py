"""The ``medtune`` command: parses arguments and calls the Python API. Nothing else lives here."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from medtune.config import RunConfig
from medtune.data.diskcache import DATA_CACHES
from medtune.errors import MedtuneError, RunsFailedError
from medtune.exporters import EXPORT_FORMATS
from medtune.inference import PREDICT_SPLITS

__all__ = ["main", "build_parser"]

_LIST_KEYS = {"arch", "strategy", "seeds", "train_fraction", "train_per_class", "lr", "weight_decay", "resize"}
# timm's train.py spellings of the same settings, accepted as aliases
_TIMM_ALIASES = {"arch": ("--model",), "optimizer": ("--opt",), "label_smoothing": ("--smoothing",)}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _parse_bool(text: str) -> bool:
    return text.lower() in ("1", "true", "yes", "on")


def _converter(annotation: Any) -> Any:
    """argparse type of a dataclass field annotation (a string under postponed evaluation)."""
    return {"int": int, "float": float, "bool": _parse_bool}.get(str(annotation).replace("<class '", "").rstrip("'>"),
                                                                 str)


def _metavar(cls: type, name: str) -> str | None:
    from medtune._fielddoc import field_choices

    choices = field_choices(cls).get(name)
    return "{" + ",".join(map(str, choices)) + "}" if choices else None


def _add_config_flags(parser: argparse.ArgumentParser, *, sweep: bool) -> None:
    """One flag per RunConfig field (``img_size`` → ``--img-size``); sweeps take lists. Help, default
    and choices come from the config classes (:mod:`medtune._fielddoc`)."""
    from medtune._fielddoc import field_default, field_docs, flag_help

    from medtune.config import SweepConfig

    group = parser.add_argument_group("run configuration (each also a YAML key)")
    sweep_docs = field_docs(SweepConfig)
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        names = (flag, *_TIMM_ALIASES.get(f.name, ()))
        if sweep and f.name in _LIST_KEYS | {"seed"}:
            key = "seeds" if f.name == "seed" else f.name
            own = field_default(SweepConfig, key)
            help_text = flag_help(RunConfig, f.name, doc=sweep_docs[key],
                                  default=field_default(RunConfig, f.name) if own is None else own)
            if f.name == "seed":
                group.add_argument("--seeds", "--seed", dest="seeds", default=None, help=help_text)
            else:
                group.add_argument(*names, dest=f.name, type=str, default=None, help=help_text,
                                   metavar=_metavar(RunConfig, f.name))
            continue
        group.add_argument(*names, dest=f.name, type=_converter(f.type), default=None,
                           help=flag_help(RunConfig, f.name), metavar=_metavar(RunConfig, f.name))


def _search_config_class() -> type:
    from medtune.deft.driver import SearchConfig

    return SearchConfig


def _add_own_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per own field of a config with a base run (``search_epochs`` → ``--search-epochs``)."""
    from medtune._fielddoc import flag_help

    group = parser.add_argument_group(f"{cls.__name__} (each also a YAML key)")
    for f in dataclasses.fields(cls):
        if f.name == "base":
            continue
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_converter(f.type), default=None,
                           help=flag_help(cls, f.name), metavar=_metavar(cls, f.name))


# aliases and help beyond the field's docstring for ``medtune attack``'s flags
_ATTACK_ALIASES = {"sources": ("--source",), "zetas": ("--zeta",)}
_ATTACK_EXTRA = {"sources": "; a folder of natural images stands for natural with --natural-folder FOLDER"}


def _add_audit_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per AuditConfig field; None leaves the field to the --config file or the default."""
    from medtune._fielddoc import field_docs, flag_help
    from medtune.robustness.config import AuditConfig

    docs = field_docs(AuditConfig)
    group = parser.add_argument_group("audit configuration (each also a YAML key of --config)")
    for f in dataclasses.fields(AuditConfig):
        names = ("--" + f.name.replace("_", "-"), *_ATTACK_ALIASES.get(f.name, ()))
        text = flag_help(AuditConfig, f.name, doc=docs.get(f.name, "") + _ATTACK_EXTRA.get(f.name, ""))
        if str(f.type) == "bool":
            group.add_argument(*names, dest=f.name, action="store_true", default=None, help=text)
        else:
            group.add_argument(*names, dest=f.name, type=_converter(f.type), default=None, help=text,
                               metavar=_metavar(AuditConfig, f.name))


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(RunConfig)} | {"seeds"}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


_FORMAT_HELP = "output format (choices: %(choices)s; default: %(default)s)"


def _parser_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole mission offline on the built-in demo data: sweep, DEFT search, UAP audit, report")
    p.add_argument("--store", default="./medtune-results", help="results store folder (default: %(default)s)")
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the demo's 6)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--stages", default="sweep,search,audit",
                   help="comma-separated subset of sweep, search, audit (default: %(default)s)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table", help=_FORMAT_HELP)


def _parser_run(sub) -> None:
    p = sub.add_parser("run", help="train one configuration")
    p.add_argument("config", nargs="?", help="YAML file of run keys (default: none; flags override it)")
    _add_config_flags(p, sweep=False)
    p.add_argument("--format", choices=("table", "json", "csv"), default="table", help=_FORMAT_HELP)


def _parser_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="archs × strategies × seeds × train fractions")
    p.add_argument("config", nargs="?", help="YAML file of sweep keys (default: none; flags override it)")
    p.add_argument("--preset", help="start from a built-in preset; the YAML file and flags override it "
                   "(choices: see 'medtune preset list'; default: none)")
    _add_config_flags(p, sweep=True)
    ex = p.add_argument_group("execution")
    ex.add_argument("--executor", choices=("local", "ray"), default="local",
                    help="local processes or a Ray cluster (choices: local, ray; default: local)")
    ex.add_argument("--workers", type=int, default=1, help="processes of the local executor (default: 1)")
    ex.add_argument("--address", default=None, help="Ray cluster: auto or HOST:PORT (default: start a local Ray)")
    ex.add_argument("--cpus-per-run", type=float, default=1, help="Ray CPUs reserved per run (default: 1)")
    ex.add_argument("--gpus-per-run", type=float, default=0, help="Ray GPUs reserved per run (default: 0)")
    ex.add_argument("--dry-run", action="store_true",
                    help="print the plan and the cost forecast; train nothing (default: off)")
    hv = p.add_argument_group("successive halving (stop losing configurations early, decided on validation)")
    hv.add_argument("--halving", action="store_true", default=None,
                    help="train to rungs and continue only the top 1/eta by mean validation metric (default: off)")
    hv.add_argument("--halving-eta", type=int, default=None, help="1/eta continue at each rung (default: 3)")
    hv.add_argument("--halving-first-rung", type=int, default=None, metavar="EPOCHS",
                    help="epochs of the first rung; later rungs multiply by eta (default: 1)")
    hv.add_argument("--halving-within", choices=("lr", "all"), default=None,
                    help="what competes: a cell's own lr/weight-decay values, or every cell "
                         "(choices: lr, all; default: lr)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table", help=_FORMAT_HELP)


def _parser_results(sub) -> None:
    p = sub.add_parser("results", help="print the runs in a store")
    p.add_argument("--store", default="./medtune-results", help="results store folder (default: %(default)s)")
    p.add_argument("--format", choices=("table", "json", "csv", "parquet"), default="table",
                   help=_FORMAT_HELP + "; parquet needs -o and pyarrow (pip install -e '.[parquet]')")
    p.add_argument("-o", "--output", default=None,
                   help="write to this file instead of printing (needed for parquet; default: none)")
    p.add_argument("--runs", action="store_true", help="one row per run instead of per strategy (default: off)")
    p.add_argument("--expected", action="store_true",
                   help="measured beside published: the store's expected tables (from a literature preset such as "
                        "medmnist_plus), per cell the published and measured ACC/AUC, the difference and a verdict "
                        "(default: off)")
    p.add_argument("--export", nargs=2, metavar=("TRACKER", "DIR"), default=None,
                   help="write every finished run for a tracker into DIR instead of printing (choices of TRACKER: "
                        "tensorboard, mlflow -- DIR is then an MLflow file store, or give MLFLOW_TRACKING_URI; default: none)")
    p.add_argument("--release", metavar="RUN", default=None,
                   help="free the claim of a run (id or prefix) left 'running' by a process that is gone "
                        "(default: none)")


def _parser_blocks(sub) -> None:
    p = sub.add_parser("blocks", help="the block/layer partition of an architecture")
    p.add_argument("arch")
    p.add_argument("--granularity", choices=("block", "layer"), default="block",
                   help="blocks (stem, stages, head) or every layer (choices: %(choices)s; default: %(default)s)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table", help=_FORMAT_HELP)


def _parser_report(sub) -> None:
    p = sub.add_parser("report", help="a self-contained HTML (or Markdown) report of a store")
    p.add_argument("store", nargs="?", default="./medtune-results", help="results store folder (default: %(default)s)")
    p.add_argument("-o", "--output", default=None, help="output file (default: STORE/report.html)")
    p.add_argument("--format", choices=("html", "md"), default="html", help=_FORMAT_HELP)
    p.add_argument("--metric", default="auc", help="the metric that ranks configurations (default: %(default)s)")
    p.add_argument("--title", default="medtune report", help="report title (default: %(default)s)")


def _parser_search(sub) -> None:
    p = sub.add_parser("search", help="DEFT: differential evolution over which blocks/layers to fine-tune")
    p.add_argument("config", nargs="?", help="YAML file of run and search keys (default: none; flags override it)")
    _add_config_flags(p, sweep=False)
    _add_own_flags(p, _search_config_class())
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="evaluates one generation in parallel (choices: local, ray; default: local)")
    p.add_argument("--workers", type=int, default=1, help="processes of the local executor (default: 1)")
    p.add_argument("--address", default=None, help="Ray cluster: auto or HOST:PORT (default: start a local Ray)")


def _parser_attack(sub) -> None:
    p = sub.add_parser("attack", help="UAP audit of stored runs (non-targeted/targeted, train/natural/random)")
    p.add_argument("runs", nargs="*", default=["all"], help="run ids (prefixes) or 'all' (default: all)")
    p.add_argument("--config", default=None, help="YAML file of AuditConfig keys; flags override it (default: none)")
    _add_audit_flags(p)
    p.add_argument("--format", choices=("table", "json", "csv"), default="table", help=_FORMAT_HELP)


def _parser_predict(sub) -> None:
    p = sub.add_parser("predict", help="a stored run's predictions on images; metrics with CIs when labelled")
    p.add_argument("run", help="run id (or a unique prefix; see 'medtune results --runs')")
    p.add_argument("data", help="a folder per class, a CSV, a MedMNIST .npz, demo/synthetic, or a folder of "
                   "unlabelled images")
    p.add_argument("-o", "--output", default=None, help="CSV of per-image probabilities (default: none)")
    p.add_argument("--store", default="./medtune-results", help="results store (default: %(default)s)")
    p.add_argument("--split", default="all", choices=PREDICT_SPLITS,
                   help="which images of DATA (choices: %(choices)s; default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--calibrated", action="store_true",
                   help="apply the run's temperature (fitted on its validation split) (default: off)")
    p.add_argument("--data-cache", default=None, choices=DATA_CACHES,
                   help="where a folder, CSV or .npz is decoded: memory, disk (STORE/data-cache, predicted batch by "
                   "batch) or auto (disk above 1 GiB) (choices: %(choices)s; default: the run's data_cache)")
    p.add_argument("--format", choices=("table", "json"), default="table", help=_FORMAT_HELP)


def _parser_export(sub) -> None:
    p = sub.add_parser("export", help="export a stored run's model (timm local-dir layout or ONNX)")
    p.add_argument("run", help="run id (or a unique prefix; see 'medtune results --runs')")
    p.add_argument("--format", default="timm", choices=EXPORT_FORMATS,
                   help="timm: save_for_hf layout for timm.create_model('local-dir:DIR'); onnx: model.onnx "
                   "taking [0, 1] images (choices: %(choices)s; default: %(default)s)")
    p.add_argument("-o", "--output", default=None, help="output folder (default: STORE/artifacts/RUN_ID)")
    p.add_argument("--store", default="./medtune-results", help="results store (default: %(default)s)")


def _parser_explain(sub) -> None:
    p = sub.add_parser("explain", help="heat maps (Grad-CAM) of a stored run's test images; pointing game and IoU")
    p.add_argument("run", help="run id (a unique prefix)")
    p.add_argument("--data", default=None, help="explain another data source (default: the run's own)")
    p.add_argument("--store", default="./medtune-results", help="results store folder (default: %(default)s)")
    p.add_argument("--method", default="gradcam",
                   help="attribution (choices: gradcam, grad_x_activation; default: %(default)s)")
    p.add_argument("--target", default="label",
                   help="the class each map explains (choices: label, predicted; default: %(default)s)")
    p.add_argument("--split", default="test", help="images to explain (choices: test, val, train, all; "
                   "default: %(default)s)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="share of the map's maximum that defines its box (default: %(default)s)")
    p.add_argument("--max-overlays", type=int, default=32, help="overlay PNGs written (default: %(default)s)")
    p.add_argument("-o", "--out", default=None, help="output folder (default: STORE/artifacts/RUN/explain)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")


def _parser_strategies(sub) -> None:
    p = sub.add_parser("strategies", help="list the registered strategies")
    p.add_argument("--format", choices=("table", "json"), default="table", help=_FORMAT_HELP)


def _parser_preset(sub) -> None:
    p = sub.add_parser("preset", help="built-in sweep presets (plain YAML to copy and edit)")
    psub = p.add_subparsers(dest="preset_command", required=True)
    psub.add_parser("list", help="list the presets")
    c = psub.add_parser("show", help="print a preset's YAML")
    c.add_argument("name")


def _parser_data(sub) -> None:
    p = sub.add_parser("data", help="data utilities")
    dsub = p.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("check", help="counts, sizes, corrupt files, duplicates across splits")
    c.add_argument("data")
    c.add_argument("--img-size", type=int, default=64, help="decode size in pixels (default: %(default)s)")
    c.add_argument("--split-seed", type=int, default=0, help="seed of the split when the data has none "
                   "(default: %(default)s)")
    for name in ("dicom_window", "uncertain_labels"):  # as the runs will read the files
        c.add_argument("--" + name.replace("_", "-"), choices=RunConfig.CHOICES[name],
                       default=getattr(RunConfig(), name), help=f"as in run (choices: %(choices)s; default: %(default)s)")
    c.add_argument("--format", choices=("table", "json"), default="table", help=_FORMAT_HELP)


#: The subcommands in the order ``medtune --help`` lists them.
_PARSERS = (
    _parser_demo, _parser_run, _parser_sweep, _parser_results, _parser_blocks, _parser_report,
    _parser_search, _parser_attack, _parser_predict, _parser_export,
    _parser_explain, _parser_strategies, _parser_preset,
    _parser_data)


def build_parser() -> argparse.ArgumentParser:
    from medtune._version import __version__

    parser = argparse.ArgumentParser(prog="medtune", description=(
        "How deeply, and how, to fine-tune an ImageNet CNN for medical images — and is it safe against "
        "universal adversarial perturbations?"))
    parser.add_argument("--version", action="version", version=f"medtune {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars or progress lines (decoding, features, audit passes, DEFT, predict, "
                             "explain); errors and results still print (default: off)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in _PARSERS:
        add_command(sub)
    return parser


def _strict_json(obj: Any, **kwargs: Any) -> str:
    """JSON that every parser reads: NaN and ±inf are written as null."""
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), allow_nan=False, **kwargs)


def _record_rows(records: list[dict], per_run: bool) -> list[dict]:
    """The rows of ``results`` (csv, parquet, table): one per run, or one per strategy (mean ± sd over seeds)."""
    from medtune.sweeps import results_table

    if per_run:
        return [{"run_id": r["run_id"], "arch": r["arch"], "strategy": r["label"], "seed": r["seed"],
                 "train_fraction": r["train_fraction"], **{f"test_{k}": v for k, v in r["metrics"].items()},
                 "trainable_params": r["trainable_params"], "train_seconds": round(r["train_seconds"], 2)}
                for r in records]
    return results_table(records)


def _print_records(records: list[dict], fmt: str, *, per_run: bool = False) -> None:
    from medtune.sweeps import format_table

    if fmt == "json":
        for r in records:
            print(_strict_json({k: r.get(k) for k in ("run_id", "dataset", "arch", "strategy", "strategy_params", "label",
                                                     "seed", "train_fraction", "metrics", "metric_ci", "val_metrics",
                                                     "trainable_params", "per_class", "operating_point", "calibration",
                                                     "train_seconds", "config")}, sort_keys=True))
        return
    rows = _record_rows(records, per_run)
    if fmt == "csv":
        import pandas as pd

        print(pd.DataFrame(rows).to_csv(index=False), end="")
    elif per_run:
        import pandas as pd

        print(pd.DataFrame(rows).to_string(index=False) if rows else "(no finished runs)")
    else:
        print(format_table(rows))


def _cmd_demo(args: argparse.Namespace) -> int:
    import medtune
    from medtune._demo import DEMO_SEARCH

    t0 = time.perf_counter()
    result = medtune.demo(store=args.store, seeds=args.seeds, epochs=args.epochs, device=args.device,
                          stages=[s for s in args.stages.split(",") if s], log=_log)
    if result["runs"]:
        _print_records(result["runs"], args.format)
    if result["search"]:
        best = "".join(map(str, result["search"]["best_mask"]))
        print(f"\nDEFT (budget {100 * DEMO_SEARCH['max_trainable_params']:.0f}% of the parameters): "
              f"mask {best}, {100 * result['search']['trainable_fraction']:.1f}% trainable")
        import pandas as pd

        print(pd.DataFrame(result["search"]["comparison"]).to_string(index=False, float_format="%.3f"))
    if result["attacks"]:
        _print_attacks(result["attacks"], args.format)
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items())
    print(f"\n{len(result['runs'])} runs in {time.perf_counter() - t0:.0f} s ({stages}); results: {args.store}; "
          f"report: {result['report']}", file=sys.stderr)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import medtune
    from medtune.config import load_config

    record = medtune.run(load_config(RunConfig, args.config, **_overrides(args)), log=_log)
    _print_records([record], args.format, per_run=True)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    import medtune

    base: Any = args.config
    if args.preset:
        from medtune.presets import get_preset

        own = medtune.load_yaml(args.config) if args.config else {}
        base = {**get_preset(args.preset), **own}
        if args.data is None and "data" not in own:  # a preset's data is the demo: never a paper's sweep on it
            from medtune.errors import ConfigError

            raise ConfigError(f"--preset {args.preset} needs your data: add --data FOLDER|CSV|NPZ (or a 'data' key "
                              "in the YAML file); a preset's own data is the built-in demo.")
    try:
        halving = {k: getattr(args, k) for k in ("halving", "halving_eta", "halving_first_rung", "halving_within")
                   if getattr(args, k) is not None}
        records = medtune.sweep(base, log=_log, executor=args.executor, workers=args.workers, address=args.address,
                                cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run,
                                dry_run=args.dry_run, **halving, **_overrides(args))
        if args.dry_run:
            return 0
    except RunsFailedError as exc:  # the finished runs are stored: show them, then say which failed
        _print_records([r for r in exc.records if r is not None], args.format)
        raise
    _print_records(records, args.format)
    return 0


def _cmd_results(args: argparse.Namespace) -> int:
    from medtune.store import ResultsStore

    store = ResultsStore(args.store, create=False)  # never creates a store (or tables in another app's file)
    if args.release is not None:
        for run_id in store.force_release(args.release):
            print(f"released {run_id}: the next sweep or run resumes it from its last epoch checkpoint",
                  file=sys.stderr)
        return 0
    if args.export:
        from medtune.tracking import export_runs

        tracker, folder = args.export
        if tracker == "none":
            raise MedtuneError("--export needs a tracker (tensorboard, mlflow) and a folder.")
        written = export_runs(store.runs(), tracker, folder)
        print(f"{len(written)} runs written for {tracker} to {folder}")
        return 0
    if args.expected:
        _print_expected(store, args.format)
        return 0
    if args.format == "parquet" or args.output:
        replaced = _check_output(args.output)
        _write_records(store.runs(), args.format, args.output, per_run=args.runs)
        _say_replaced(replaced)
    else:
        _print_records(store.runs(), args.format, per_run=args.runs)
        if args.format == "table":
            _print_stopped(store)
    return 0


def _print_expected(store, fmt: str) -> None:
    """``results --expected``: published beside measured, per cell of the store's expected tables."""
    import csv
    import json

    from medtune.expected import EXPECTED_COLUMNS, load_tables
    from medtune.reporting.expected import compare_expected, format_expected

    tables = load_tables(store.raw_expected_tables(), where=str(store.root))
    rows = compare_expected(store.runs(), tables)
    if fmt == "json":
        for row in rows:
            print(json.dumps(row, allow_nan=False))
    elif fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=EXPECTED_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        print(format_expected(rows, tables))


def _print_stopped(store) -> None:
    """The runs successive halving stopped at a rung: not trained to the end, so in no table above."""
    from medtune.halving import halving_summary

    summary = halving_summary(store)
    if not summary:
        return
    print(f"\nsuccessive halving (eta {summary['eta']}, first rung {summary['first_rung']}, within "
          f"{summary['within']}): {summary['epochs_trained']} epochs trained of the full grid's "
          f"{summary['epochs_full_grid']}")
    if summary["stopped"]:
        print("not trained to the end (stopped at a rung; not in the table above):")
    for r in summary["stopped"]:
        cfg = r.get("config") or {}
        print(f"  {r['run_id']}  {cfg.get('arch')}  {cfg.get('strategy')}  lr {cfg.get('lr'):g}  "
              f"wd {cfg.get('weight_decay'):g}  seed {cfg.get('seed')}  stopped at rung {r['rung']}  "
              f"val {r['monitor']} {r['val_metric']:.4f}")


def _write_records(records: list[dict], fmt: str, output: str | None, *, per_run: bool) -> None:
    """``results -o FILE``: what ``--format`` prints, written to FILE; parquet holds the rows of csv."""
    import contextlib
    import io

    from medtune._safepaths import atomic_write
    from medtune.errors import ConfigError, StoreError

    if output is None:
        raise ConfigError("--format parquet writes a binary file: give it with -o FILE.parquet.")
    try:
        if fmt == "parquet":
            import pandas as pd

            rows = _record_rows(records, per_run)
            try:
                pd.DataFrame(rows).to_parquet(output, index=False)
            except ImportError:
                raise ConfigError("--format parquet needs pyarrow: pip install -e '.[parquet]' (or use --format "
                                  "csv).") from None
        else:
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                _print_records(records, fmt, per_run=per_run)
            atomic_write(output, buffer.getvalue())
    except (OSError, StoreError) as exc:
        raise ConfigError(f"Cannot write {output!r} ({getattr(exc, 'strerror', None) or exc}); give another -o "
                          "path.") from None
    print(f"{len(records)} runs written to {output}", file=sys.stderr)


def _check_output(output: str | None) -> str | None:
    """``-o FILE`` checked before any work (never a store's database or managed folder, its folder exists
    and is writable); returns what an existing file is, for :func:`_say_replaced`."""
    if output is None:
        return None
    from medtune._safepaths import check_output

    return check_output(output, flag="-o")


def _say_replaced(replaced: str | None) -> None:
    if replaced:
        print(f"medtune: -o {replaced}", file=sys.stderr)


def _cmd_blocks(args: argparse.Namespace) -> int:
    import torch

    from medtune.models import create_model, format_blocks, get_blocks

    with torch.random.fork_rng(devices=[]):
        model = create_model(args.arch, num_classes=2, weights="none")
    print(format_blocks(get_blocks(model, granularity=args.granularity), fmt=args.format))
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    import medtune

    e = medtune.explain(args.run, data=args.data, store=args.store, method=args.method, target=args.target,
                        split=args.split, threshold=args.threshold, max_overlays=args.max_overlays,
                        out_dir=args.out, device=args.device, log=_log)
    print(e.out_dir)
    return 0


def _cmd_strategies(args: argparse.Namespace) -> int:
    from medtune.strategies import get_strategy_class, list_strategies

    rows = []
    for name in list_strategies():
        cls = get_strategy_class(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        rows.append({"name": name, "params": cls.defaults, "description": doc})
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    else:
        width = max(len(r["name"]) for r in rows)
        for r in rows:
            params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
            print(f"{r['name']:<{width}}  {r['description']}" + (f"  [{params}]" if params else ""))
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from medtune.data import check_data, format_data_report

    report = check_data(args.data, img_size=args.img_size, seed=args.split_seed, dicom_window=args.dicom_window,
                        uncertain_labels=args.uncertain_labels)
    print(format_data_report(report, fmt=args.format))
    return 0 if report.ok else 1  # 1: problems found (listed above)


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    import medtune

    replaced = _check_output(args.output)
    out = medtune.report(args.store, out_path=args.output, fmt=args.format, metric=args.metric, title=args.title)
    _say_replaced(replaced)
    print(Path(out).resolve())
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    import medtune

    own = _search_config_class().own_fields()
    overrides = {**_overrides(args), **{k: getattr(args, k) for k in own if getattr(args, k) is not None}}
    overrides.pop("seed", None)
    record = medtune.search(args.config or {}, log=_log, executor=args.executor, workers=args.workers,
                            address=args.address, **overrides)
    print(json.dumps({k: record[k] for k in ("search_id", "unit_names", "best_mask", "best_fitness", "seconds",
                                             "num_trainings", "comparison")}, indent=2))
    return 0


def _cmd_attack(args: argparse.Namespace) -> int:
    from pathlib import Path

    import medtune
    from medtune.config import load_config
    from medtune.errors import ConfigError
    from medtune.robustness.config import SOURCES, AuditConfig

    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(AuditConfig)}
    if args.sources is not None:  # a folder among the sources stands for natural with --natural-folder FOLDER
        names = [s.strip() for s in args.sources.split(",") if s.strip()]
        folders = [s for s in names if s not in SOURCES and Path(s).is_dir()]
        natural = [s for s in names if s == "natural" or s in folders]
        if len(natural) > 1:
            raise ConfigError(f"--sources names the natural source {len(natural)} times ({', '.join(natural)}); "
                              "a folder is the natural source: pass 'natural' or one folder.")
        if folders and args.natural_folder is not None:
            raise ConfigError(f"--sources holds the folder {folders[0]} and --natural-folder is "
                              f"{args.natural_folder}; give the folder once.")
        flags["sources"] = ["natural" if s in folders else s for s in names]
        if folders:
            flags["natural_folder"] = folders[0]
    config = load_config(AuditConfig, args.config, **flags)  # every flag is checked here, before any run is read
    _print_attacks(medtune.attack(args.runs, config=config, log=_log), args.format)
    return 0


def _print_attacks(records: list[dict], fmt: str) -> None:
    rows = [{k: r.get(k) for k in ("run_id", "label", "source", "num_source_images", "num_photos", "protocol", "zeta",
                                   "norm", "targeted", "algorithm", "channels", "fooling_rate", "fooling_ci_low",
                                   "fooling_ci_high", "random_fooling_rate", "random_fooling_rate_max", "mcnemar_p",
                                   "targeted_success", "clean_target_share")}
            for r in records if r.get("source") != "transfer"]
    if fmt == "json":
        for r in records:
            print(json.dumps({k: v for k, v in r.items() if k not in ("confusion", "random_confusion")}, default=str))
    else:
        import pandas as pd

        frame = pd.DataFrame(rows)
        print(frame.to_csv(index=False) if fmt == "csv" else frame.to_string(index=False, float_format="%.3g"))
        for r in records:
            if r.get("source") == "transfer":
                what = "fooling rate" if r.get("targeted") is None else f"success, target {r['targeted']}"
                print(f"\ntransferability at ζ={r['zeta']} ({r['uap_source']} UAPs, {what}; rows: UAP of run, "
                      "columns: evaluated on run; last row: random control):")
                table = pd.DataFrame(r["matrix"]).T
                table.loc["random"] = pd.Series(r["random"])
                print(table.to_string(float_format="%.3f"))


def _cmd_preset(args: argparse.Namespace) -> int:
    from medtune.presets import list_presets, preset_text

    print("\n".join(list_presets()) if args.preset_command == "list" else preset_text(args.name), end="\n")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import medtune

    replaced = _check_output(args.output)  # before any work: never the store's database
    result = medtune.predict(args.run, args.data, store=args.store, split=args.split, device=args.device,
                             calibrated=args.calibrated, data_cache=args.data_cache)
    if args.output:
        print(f"{len(result.ids)} predictions: {result.to_csv(args.output)}", file=sys.stderr)
        _say_replaced(replaced)
    summary = {"run_id": result.run_id, "images": len(result.ids), "metrics": result.metrics,
               "metric_ci": result.metric_ci, "calibration": result.calibration, "per_class": result.per_class,
               "per_class_at_threshold": result.per_class_at_threshold}
    if args.format == "json":
        print(_strict_json(summary, sort_keys=True))
    elif result.metrics is None:
        print(f"{len(result.ids)} unlabelled images; no metrics" + ("" if args.output else " (-o FILE writes them)"))
    else:
        print(f"run {result.run_id} on {args.data} ({args.split}, {len(result.ids)} images):")
        for name, value in result.metrics.items():
            ci = result.metric_ci.get(name)
            print(f"  {name:<18} {value:.4f}" + (f"  [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""))
        for name, value in result.calibration.items():
            print(f"  {name:<18} {value:.4f}")
        for title, table in (("per class", result.per_class), ("at the run's threshold", result.per_class_at_threshold)):
            if table:
                print(f"{title}: " + "; ".join(f"{c} " + ", ".join(f"{k} {v:.3g}" for k, v in m.items())
                                               for c, m in table.items()))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import medtune

    out = medtune.export(args.run, fmt=args.format, out_dir=args.output, store=args.store)
    print(f"{out['path']}  (parity: max |Δ logit| = {out['max_abs_diff']:.2e})")
    return 0


_COMMANDS = {"predict": _cmd_predict, "export": _cmd_export, "attack": _cmd_attack, "preset": _cmd_preset, "report": _cmd_report, "search": _cmd_search, "demo": _cmd_demo, "run": _cmd_run, "sweep": _cmd_sweep, "results": _cmd_results,
             "blocks": _cmd_blocks, "strategies": _cmd_strategies, "data": _cmd_data,
             "explain": _cmd_explain}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medtune`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        from medtune.progress import quiet

        quiet()
    previous = _handle_sigterm()
    try:
        return _COMMANDS[args.command](args)
    except RunsFailedError as exc:  # the sweep went on; exit 1 (not 2: the input was valid)
        for run_id, reason in exc.failures:
            print(f"medtune: run {run_id} failed: {reason}", file=sys.stderr)
        print(f"medtune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except MedtuneError as exc:
        print(f"medtune: error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line, whatever a library said
        return 2
    except BrokenPipeError:  # e.g. `medtune results | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, _Terminated) else "interrupted"
        print(f"medtune: {what}; finished runs are stored and the current one resumes from its last epoch "
              "when you run the same command again.", file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the claimed runs are released and resume on the next start."""


def _handle_sigterm():
    """Turn SIGTERM into :class:`_Terminated` in the main thread; returns the previous handler (None if not set)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise _Terminated()

    return signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())
