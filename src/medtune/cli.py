"""The ``medtune`` command: parses arguments and calls the Python API. Nothing else lives here."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from medtune.config import RunConfig
from medtune.errors import MedtuneError, RunsFailedError

__all__ = ["main", "build_parser"]

_LIST_KEYS = {"arch", "strategy", "seeds", "train_fraction", "lr", "weight_decay"}
_FIELD_HELP = {
    "data": "folder per class, CSV, MedMNIST .npz, medmnist:NAME, demo or synthetic",
    "arch": "timm model name(s), comma-separated for sweeps",
    "weights": "imagenet | none | FILE | efficientnet_lite0/1/2 (offline)",
    "strategy": "strategy spec(s), e.g. scratch,linear,top_k:all,full",
    "store": "results store folder (default ./medtune-results)",
    "device": "cpu | cuda | auto",
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _add_config_flags(parser: argparse.ArgumentParser, *, sweep: bool) -> None:
    """One flag per RunConfig field (``img_size`` → ``--img-size``); sweeps take lists."""
    group = parser.add_argument_group("run configuration (each also a YAML key)")
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "seed":
            if sweep:
                group.add_argument("--seeds", "--seed", dest="seeds", default=None, help="comma-separated seeds")
            else:
                group.add_argument(flag, type=int, default=None)
            continue
        if f.type in ("bool", bool):
            group.add_argument(flag, dest=f.name, default=None, type=lambda s: s.lower() in ("1", "true", "yes", "on"))
            continue
        conv = {"int": int, "float": float}.get(str(f.type), str)
        if sweep and f.name in _LIST_KEYS:
            conv = str
        group.add_argument(flag, dest=f.name, type=conv, default=None, help=_FIELD_HELP.get(f.name))


def _search_config_class() -> type:
    from medtune.deft.driver import SearchConfig

    return SearchConfig


def _add_own_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per own field of a config with a base run (``search_epochs`` → ``--search-epochs``)."""
    group = parser.add_argument_group(f"{cls.__name__} (each also a YAML key)")
    for f in dataclasses.fields(cls):
        if f.name == "base":
            continue
        conv = {"int": int, "float": float}.get(str(f.type), str)
        if str(f.type) in ("bool", "<class 'bool'>"):
            conv = lambda s: s.lower() in ("1", "true", "yes", "on")  # noqa: E731
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=conv, default=None)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(RunConfig)} | {"seeds"}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medtune", description=(
        "How deeply, and how, to fine-tune an ImageNet CNN for medical images — and is it safe against "
        "universal adversarial perturbations?"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the whole loop offline on the built-in demo data")
    p.add_argument("--store", default="./medtune-results")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")

    p = sub.add_parser("run", help="train one configuration")
    p.add_argument("config", nargs="?", help="YAML file of run keys")
    _add_config_flags(p, sweep=False)
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")

    p = sub.add_parser("sweep", help="archs × strategies × seeds × train fractions")
    p.add_argument("config", nargs="?", help="YAML file of sweep keys")
    p.add_argument("--preset", help="start from a built-in preset (see 'medtune preset list')")
    _add_config_flags(p, sweep=True)
    ex = p.add_argument_group("execution")
    ex.add_argument("--executor", choices=("local", "ray"), default="local")
    ex.add_argument("--workers", type=int, default=1, help="processes of the local executor")
    ex.add_argument("--address", default=None, help="Ray cluster: auto or HOST:PORT (default: start a local Ray)")
    ex.add_argument("--cpus-per-run", type=float, default=1)
    ex.add_argument("--gpus-per-run", type=float, default=0)
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")

    p = sub.add_parser("results", help="print the runs in a store")
    p.add_argument("--store", default="./medtune-results")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--runs", action="store_true", help="one row per run instead of per strategy")
    p.add_argument("--release", metavar="RUN", default=None,
                   help="free the claim of a run (id or prefix) left 'running' by a process that is gone")

    p = sub.add_parser("blocks", help="the block/layer partition of an architecture")
    p.add_argument("arch")
    p.add_argument("--granularity", choices=("block", "layer"), default="block")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")

    p = sub.add_parser("report", help="a self-contained HTML (or Markdown) report of a store")
    p.add_argument("store", nargs="?", default="./medtune-results")
    p.add_argument("-o", "--output", default=None, help="output file (default STORE/report.html)")
    p.add_argument("--format", choices=("html", "md"), default="html")
    p.add_argument("--metric", default="auc")
    p.add_argument("--title", default="medtune report")

    p = sub.add_parser("search", help="DEFT: differential evolution over which blocks/layers to fine-tune")
    p.add_argument("config", nargs="?", help="YAML file of run and search keys")
    _add_config_flags(p, sweep=False)
    _add_own_flags(p, _search_config_class())
    p.add_argument("--executor", choices=("local", "ray"), default="local", help="evaluates one generation in parallel")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--address", default=None)

    p = sub.add_parser("attack", help="UAP audit of stored runs (non-targeted/targeted, train/natural/random)")
    p.add_argument("runs", nargs="*", default=["all"], help="run ids (prefixes) or 'all'")
    # one flag per AuditConfig field; None leaves the field to the --config file or the default
    p.add_argument("--config", default=None, help="YAML file of AuditConfig keys; flags override it")
    p.add_argument("--store", default=None)
    p.add_argument("--sources", "--source", dest="sources", default=None,
                   help="comma-separated: train, natural, mixed, or a folder of natural images (= natural)")
    p.add_argument("--zetas", "--zeta", dest="zetas", default=None,
                   help="comma-separated budgets ζ: ξ = ζ·mean Lp norm of the run's training images, every source")
    p.add_argument("--norm", default=None, choices=("2", "inf"))
    p.add_argument("--targeted", default=None, help="a class index or 'all'")
    p.add_argument("--natural-folder", default=None, help="folder of natural photos (any number, streamed)")
    p.add_argument("--num-source-images", type=int, default=None, help="images per source (natural: crops)")
    p.add_argument("--mix-fraction", type=float, default=None, help="share of natural crops in the mixed source")
    p.add_argument("--chunk-size", type=int, default=None, help="source images per chunk; v carries over")
    p.add_argument("--algorithm", default=None, choices=("batched", "reference"),
                   help="batched (fast) or reference (the papers'/ART's per-image loop)")
    p.add_argument("--channels", default=None, choices=("auto", "grey", "rgb"),
                   help="auto: grey perturbations on grey tasks (R = G = B)")
    p.add_argument("--step-fraction", type=float, default=None, help="FGSM step as a fraction of ξ")
    p.add_argument("--step-norm", default=None, choices=("2", "inf"),
                   help="norm of the FGSM step (default the budget's; inf = sign steps)")
    p.add_argument("--step-decay", type=float, default=None, help="step factor after every pass (1 = fixed)")
    p.add_argument("--max-passes", type=int, default=None)
    p.add_argument("--goal-rate", type=float, default=None, help="stop a UAP once it fools this share of its images")
    p.add_argument("--batch-size", type=int, default=None, help="images per UAP gradient step")
    p.add_argument("--num-random", type=int, default=None, help="random controls per UAP")
    p.add_argument("--random-linf", default=None, choices=("uniform", "corners"),
                   help="L-inf random controls: uniform in the cube or its corners")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--transfer", action="store_true", default=None,
                   help="also the transferability matrix between runs of one dataset")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")

    p = sub.add_parser("strategies", help="list the registered strategies")
    p.add_argument("--format", choices=("table", "json"), default="table")

    p = sub.add_parser("preset", help="built-in sweep presets (plain YAML to copy and edit)")
    psub = p.add_subparsers(dest="preset_command", required=True)
    psub.add_parser("list", help="list the presets")
    c = psub.add_parser("show", help="print a preset's YAML")
    c.add_argument("name")

    p = sub.add_parser("data", help="data utilities")
    dsub = p.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("check", help="counts, sizes, corrupt files, duplicates across splits")
    c.add_argument("data")
    c.add_argument("--img-size", type=int, default=64)
    c.add_argument("--split-seed", type=int, default=0)
    c.add_argument("--format", choices=("table", "json"), default="table")
    return parser


def _print_records(records: list[dict], fmt: str, *, per_run: bool = False) -> None:
    from medtune.sweeps import format_table, results_table

    if fmt == "json":
        for r in records:
            print(json.dumps({k: r.get(k) for k in ("run_id", "dataset", "arch", "strategy", "strategy_params", "label",
                                                     "seed", "train_fraction", "metrics", "metric_ci", "val_metrics",
                                                     "trainable_params",
                                                     "train_seconds", "config")}, sort_keys=True))
        return
    if per_run:
        rows = [{"run_id": r["run_id"], "arch": r["arch"], "strategy": r["label"], "seed": r["seed"],
                 "train_fraction": r["train_fraction"], **{f"test_{k}": v for k, v in r["metrics"].items()},
                 "trainable_params": r["trainable_params"], "train_seconds": round(r["train_seconds"], 2)}
                for r in records]
    else:
        rows = results_table(records)
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

    t0 = time.perf_counter()
    records = medtune.demo(store=args.store, seeds=args.seeds, epochs=args.epochs, device=args.device, log=_log)
    _print_records(records, args.format)
    report = medtune.report(args.store)
    print(f"\n{len(records)} runs in {time.perf_counter() - t0:.0f} s; results: {args.store}; report: {report}",
          file=sys.stderr)
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

        base = {**get_preset(args.preset), **(medtune.load_yaml(args.config) if args.config else {})}
    try:
        records = medtune.sweep(base, log=_log, executor=args.executor, workers=args.workers, address=args.address,
                                cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run, **_overrides(args))
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
    _print_records(store.runs(), args.format, per_run=args.runs)
    return 0


def _cmd_blocks(args: argparse.Namespace) -> int:
    import torch

    from medtune.models import create_model, format_blocks, get_blocks

    with torch.random.fork_rng(devices=[]):
        model = create_model(args.arch, num_classes=2, weights="none")
    print(format_blocks(get_blocks(model, granularity=args.granularity), fmt=args.format))
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

    report = check_data(args.data, img_size=args.img_size, seed=args.split_seed)
    print(format_data_report(report, fmt=args.format))
    return 0 if report.ok else 1  # 1: problems found (listed above)


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    import medtune

    out = medtune.report(args.store, out_path=args.output, fmt=args.format, metric=args.metric, title=args.title)
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
    records = medtune.attack(args.runs, config=config, log=_log)
    rows = [{k: r.get(k) for k in ("run_id", "label", "source", "zeta", "norm", "targeted", "algorithm", "channels",
                                   "fooling_rate", "fooling_ci_low", "fooling_ci_high", "random_fooling_rate",
                                   "random_fooling_rate_max", "mcnemar_p", "targeted_success", "clean_target_share")}
            for r in records if r.get("source") != "transfer"]
    if args.format == "json":
        for r in records:
            print(json.dumps({k: v for k, v in r.items() if k not in ("confusion", "random_confusion")}, default=str))
    else:
        import pandas as pd

        frame = pd.DataFrame(rows)
        print(frame.to_csv(index=False) if args.format == "csv" else frame.to_string(index=False, float_format="%.3g"))
        for r in records:
            if r.get("source") == "transfer":
                what = "fooling rate" if r.get("targeted") is None else f"success, target {r['targeted']}"
                print(f"\ntransferability at ζ={r['zeta']} ({r['uap_source']} UAPs, {what}; rows: UAP of run, "
                      "columns: evaluated on run; last row: random control):")
                table = pd.DataFrame(r["matrix"]).T
                table.loc["random"] = pd.Series(r["random"])
                print(table.to_string(float_format="%.3f"))
    return 0


def _cmd_preset(args: argparse.Namespace) -> int:
    from medtune.presets import list_presets, preset_text

    print("\n".join(list_presets()) if args.preset_command == "list" else preset_text(args.name), end="\n")
    return 0


_COMMANDS = {"attack": _cmd_attack, "preset": _cmd_preset, "report": _cmd_report, "search": _cmd_search, "demo": _cmd_demo, "run": _cmd_run, "sweep": _cmd_sweep, "results": _cmd_results,
             "blocks": _cmd_blocks, "strategies": _cmd_strategies, "data": _cmd_data}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medtune`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
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
