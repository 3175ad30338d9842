"""Run one training configuration end to end and store its record: the unit a sweep repeats."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, TypedDict

import numpy as np
import torch

from medtune.config import RunConfig, load_config
from medtune.data import load_data, with_train_fraction, with_train_per_class
from medtune.data.splits import with_cv_fold
from medtune.data.base import ImageSet
from medtune.errors import MedtuneError, RunsFailedError, StoreError
from medtune.models import create_model, get_blocks
from medtune.store import ResultsStore
from medtune._tensors import resolve_device
from medtune.training.calibration import calibration_summary
from medtune.training.intervals import metric_intervals
from medtune.training.hooks import RungReached
from medtune.training.loop import fit
from medtune.training.metrics import rung_metric

__all__ = ["run", "run_all", "run_id_of", "prepare_data", "collect_versions", "build_run", "execute_run",
           "store_result", "RunPlan", "RunRecord", "build_record", "plan_runs", "structure_blocks"]


def collect_versions() -> dict[str, str]:
    """Library versions and the git revision of medtune's source, for every record."""
    import scipy
    import sklearn
    import timm

    from medtune._version import __version__

    out = {"medtune": __version__, "torch": torch.__version__, "timm": timm.__version__,
           "numpy": np.__version__, "scipy": scipy.__version__, "sklearn": sklearn.__version__,
           "python": platform.python_version(), "platform": platform.platform()}
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        if rev.returncode == 0:
            out["git"] = rev.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


@lru_cache(maxsize=4)
def _load_cached(data: str, img_size: int, resize: str, split_seed: int, val_fraction: float, test_fraction: float,
                 medmnist_size: int, dicom_window: str = "auto", uncertain_labels: str = "error",
                 data_cache: str = "memory", store: str | None = None, decode_workers: int = 0,
                 medmnist_root: str = "") -> ImageSet:
    return load_data(data, img_size=img_size, resize=resize, seed=split_seed, val_fraction=val_fraction,
                     test_fraction=test_fraction, medmnist_size=medmnist_size, dicom_window=dicom_window,
                     uncertain_labels=uncertain_labels, data_cache=data_cache, cache_dir=store,
                     decode_workers=decode_workers, medmnist_root=medmnist_root or None)


@lru_cache(maxsize=16)
def _subsample_cached(key: tuple, cv: tuple[int, int], train_fraction: float, train_per_class: int = 0) -> ImageSet:
    data = _load_cached(*key)
    if cv[0] >= 2:
        data = with_cv_fold(data, cv[0], cv[1], key[3])
    data = data if train_fraction >= 1.0 else with_train_fraction(data, train_fraction, key[3])
    return with_train_per_class(data, train_per_class, key[3]) if train_per_class else data


def prepare_data(cfg: RunConfig) -> ImageSet:
    """Load (once per process), cut to the run's cross-validation fold and subsample the data a run
    trains on; the same config gives the same ImageSet object, so its fingerprint is computed once.
    Large sets are decoded once per machine into ``STORE/data-cache`` (``data_cache``)."""
    key = (cfg.data, cfg.img_size, cfg.resize, cfg.split_seed, float(cfg.val_fraction), float(cfg.test_fraction),
           cfg.medmnist_size, cfg.dicom_window, cfg.uncertain_labels, cfg.data_cache, cfg.store, cfg.decode_workers,
           cfg.medmnist_root)
    if cfg.train_per_class:
        return _subsample_cached(key, (cfg.cv_folds, cfg.fold), float(cfg.train_fraction), int(cfg.train_per_class))
    return _subsample_cached(key, (cfg.cv_folds, cfg.fold), float(cfg.train_fraction))


def run_id_of(cfg: RunConfig, data_fingerprint: str) -> str:
    """Hash of everything that determines a run's result (16 hex chars).

    A strategy whose default behaviour changed (its class ``revision`` > 0) adds its revision, so a
    store's runs made under the old behaviour are not taken for new ones; at revision 0 the id is
    the one stores have always had."""
    content: dict = {"config": cfg.semantic_dict(), "data": data_fingerprint}
    revision = getattr(cfg.strategy.strategy_class, "revision", 0)
    if revision:
        content["strategy_revision"] = revision
    payload = json.dumps(content, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_run(cfg: RunConfig, data: ImageSet, device: torch.device, strategy=None):
    """Create the model (seeded init) and the block partition of a run, and its strategy unless the
    run's plan built it (a planned strategy was checked against the partition when it was planned)."""
    planned = strategy is not None
    strategy = strategy if planned else cfg.strategy.create()
    weights = cfg.weights if strategy.pretrained else "none"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # seeds the new head / scratch init without touching the caller's RNG
        model = create_model(cfg.arch, num_classes=data.num_classes, weights=weights)
        strategy.prepare_model(model)  # LoRA's adapters, initialised from the run's seed
    model.to(device)
    blocks = get_blocks(model, granularity=strategy.granularity)
    if not planned:
        strategy.check_blocks(blocks)
    return strategy, model, blocks


@lru_cache(maxsize=8)
def structure_blocks(arch: str, granularity: str):
    """The block partition of ``arch`` (random init; only its structure is used by planning)."""
    from medtune.models._builder import probe_model

    with torch.random.fork_rng(devices=[]):
        model = probe_model(arch)  # the one structural copy the driver keeps (also probes the input size)
    return get_blocks(model, granularity=granularity)


@dataclass
class RunPlan:
    """One run, planned once by the driver; the executor, the feature cache and the loop read it.

    Attributes:
        config: the run's configuration.
        strategy: the run's strategy object, built once and checked against the block partition
            (strategies hold per-run state: every run has its own).
        num_blocks: blocks (or layers, at the strategy's granularity) of the backbone, head included.
        depth: trainable non-head blocks (None for strategies that are not depth strategies).
        run_id: the run's id in the store (:func:`run_id_of`).
        fingerprint: the data fingerprint the run id hashes.
        cache_cuts: frozen-prefix lengths (in blocks) that other runs of the same plan freeze: the
            feature cache stores those cuts too on this run's pass, so a top-k sweep pays one pass.
    """

    config: RunConfig
    strategy: Any
    num_blocks: int
    depth: int | None
    run_id: str
    fingerprint: str
    cache_cuts: frozenset[int] = frozenset()
    pause_at: int | None = None


def plan_runs(cells: Iterable[tuple[RunConfig, Any]]) -> list[RunPlan]:
    """Plan ``(config, strategy or None)`` cells: each strategy is built (when None) and checked once,
    each run's data fingerprint and id computed once; every plan learns the frozen depths of the others.

    Raises:
        ConfigError: an input size or a strategy parameter that does not fit its architecture.
        DataError: unreadable data.
    """
    from medtune.models import check_input_size

    cells = list(cells)
    for arch, img_size in sorted({(cfg.arch, cfg.img_size) for cfg, _ in cells}):  # before any data is loaded
        check_input_size(arch, img_size)
    from medtune.models._weights import check_hub_reachable

    # hub weights offline: one line before any claim, not a failed download per run
    for arch in sorted({cfg.arch for cfg, _ in cells if cfg.weights == "imagenet" and cfg.strategy.strategy_class.pretrained}):
        check_hub_reachable(arch)
    plans = []
    for cfg, strategy in cells:
        checked = strategy is not None
        strategy = strategy if checked else cfg.strategy.create()
        blocks = structure_blocks(cfg.arch, strategy.granularity)
        if not checked:
            strategy.check_blocks(blocks)
        fingerprint = prepare_data(cfg).fingerprint()
        plans.append(RunPlan(config=cfg, strategy=strategy, num_blocks=len(blocks),
                             depth=strategy.depth(len(blocks)), run_id=run_id_of(cfg, fingerprint),
                             fingerprint=fingerprint))
    cuts = frozenset(p.num_blocks - 1 - p.depth for p in plans if p.depth is not None)
    for plan in plans:
        plan.cache_cuts = cuts
    return plans


def _write_atomic(path: Path, write: Callable[[Path], None], root: Path | None = None) -> None:
    """Temp file + rename inside the store (see :func:`medtune._safepaths.atomic_write`)."""
    from medtune._safepaths import atomic_write

    try:
        atomic_write(path, write, root=root)
    except StoreError as exc:
        raise StoreError(f"{exc} The run resumes from its last epoch checkpoint.") from None


def _save_artifacts(store: ResultsStore, run_id: str, config: dict, state: dict, y_true, y_prob,
                    class_names, val_y_true=None, val_y_prob=None) -> dict:
    from safetensors.torch import save_file

    folder = store.run_dir(run_id)
    for stale in [*folder.glob("*.tmp"), *folder.glob(".*.tmp")]:  # left by a driver killed mid-write
        stale.unlink(missing_ok=True)
    weights = folder / "best.safetensors"
    _write_atomic(weights, lambda p: save_file(state, str(p), metadata={"arch": config["arch"]}), store.root)
    preds = folder / "predictions.npz"
    val = {} if val_y_prob is None else {"val_y_true": val_y_true, "val_y_prob": val_y_prob}
    _write_atomic(preds, lambda p: np.savez(open(p, "wb"), y_true=y_true, y_prob=y_prob,
                                            class_names=np.array(class_names), **val), store.root)
    cfg_path = folder / "run_config.json"  # config.json is the name of a timm export (medtune export)
    _write_atomic(cfg_path, lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True)), store.root)
    return {"weights": str(weights), "predictions": str(preds), "config": str(cfg_path)}


def _imbalance_fields(cfg: RunConfig, data: ImageSet, result) -> dict[str, Any]:
    """Per-class metrics (val and test), the loss's class weights and, for a binary task, the threshold
    chosen on validation for ``target_sensitivity`` with its test operating point."""
    from medtune.training.imbalance import class_weights, operating_point, per_class_metrics

    train_labels = data.labels[torch.from_numpy(data.splits == "train")].numpy()
    out: dict[str, Any] = {
        "class_weights": class_weights(train_labels, data.task, data.num_classes, cfg.class_weight),
        "per_class": {split: per_class_metrics(y, p, task=data.task, class_names=list(data.class_names))
                      for split, y, p in (("val", result.val_y_true, result.val_y_prob),
                                          ("test", result.y_true, result.y_prob))}}
    if data.task == "binary" and int(np.sum(result.val_y_true)) > 0:
        out["operating_point"] = operating_point(result.val_y_true, result.val_y_prob, result.y_true, result.y_prob,
                                                 cfg.target_sensitivity)
    return out


class RunRecord(TypedDict, total=False):
    """A finished run as the store keeps it (``ResultsStore.runs()`` returns these; the names are the
    stored ones, documented in the README's "Results store"). ``operating_point`` only for binary
    tasks; ``artifacts`` is added by :func:`store_result`."""

    run_id: str
    status: str
    dataset: str
    data_fingerprint: str
    arch: str
    weights: str
    strategy: str
    strategy_params: dict[str, Any]
    label: str
    depth: int | None
    seed: int
    train_fraction: float
    train_per_class: int
    train_per_class_short: dict[str, int]
    config: dict[str, Any]
    fold: int | None
    cv_folds: int | None
    metrics: dict[str, float]
    val_metrics: dict[str, float]
    metric_ci: dict[str, Any]
    class_weights: list[float] | None
    per_class: dict[str, Any]
    operating_point: dict[str, Any]
    calibration: dict[str, Any]
    trainable_params: int
    total_params: int
    train_seconds: float
    images_per_s: float
    num_blocks: int
    num_train: int
    num_classes: int
    history: list[dict[str, Any]]
    extras: dict[str, Any]
    device: str
    precision: str
    predictions: dict[str, Any] | None
    val_predictions: dict[str, Any] | None
    versions: dict[str, str]
    artifacts: dict[str, str]


def build_record(plan: RunPlan, data: ImageSet, result, model: torch.nn.Module, num_blocks: int,
                 device: torch.device) -> RunRecord:
    """The :class:`RunRecord` of a trained run (without ``artifacts``)."""
    cfg, strategy = plan.config, plan.strategy
    return RunRecord(
        run_id=plan.run_id, status="done", dataset=data.name, data_fingerprint=plan.fingerprint,
        arch=cfg.arch, weights=cfg.weights if strategy.pretrained else "none",
        strategy=strategy.name, strategy_params=strategy.params,
        label=strategy.spec + (f" [{cfg.resize}]" if cfg.resize != "resize" else "")
        + (f" [{cfg.train_per_class}/class]" if cfg.train_per_class else ""),
        depth=plan.depth, seed=cfg.seed, train_fraction=cfg.train_fraction, config=cfg.to_dict(),
        **({"train_per_class": cfg.train_per_class,
            "train_per_class_short": data.meta.get("train_per_class_short", {})} if cfg.train_per_class else {}),
        fold=cfg.fold if cfg.cv_folds >= 2 else None, cv_folds=cfg.cv_folds or None,
        metrics=result.test_metrics, val_metrics=result.val_metrics,
        # 95% intervals over the test images (DeLong for a binary AUC, else a percentile bootstrap)
        metric_ci=metric_intervals(result.y_true, result.y_prob, task=data.task, seed=cfg.seed),
        **_imbalance_fields(cfg, data, result),
        # ECE, Brier and the reliability curve of the test predictions; temperature fitted on validation
        calibration=calibration_summary(result.val_y_true, result.val_y_prob, result.y_true, result.y_prob,
                                        task=data.task),
        trainable_params=result.trainable_params, total_params=sum(p.numel() for p in model.parameters()),
        train_seconds=result.train_seconds, images_per_s=result.images_per_s,
        num_blocks=num_blocks, num_train=int((data.splits == "train").sum()), num_classes=data.num_classes,
        history=result.history, extras=result.extras, device=str(device), precision=result.precision,
        # exact (no rounding, which creates ties): every metric recomputes from the record to the last bit
        predictions={"y_true": result.y_true.tolist(), "y_prob": result.y_prob.tolist(),
                     "class_names": list(data.class_names)} if result.y_prob.size <= 200_000 else None,
        # validation probabilities, exact, for the paired tests that select on validation
        val_predictions={"y_true": result.val_y_true.tolist(), "y_prob": result.val_y_prob.tolist()}
        if result.val_y_prob.size <= 200_000 else None,
        versions=collect_versions(),
    )


class _EpochProgress:
    """A run's epochs as a progress bar on a terminal (a log already has one line per epoch, so nothing
    is drawn when stderr is not a terminal, or with ``--quiet`` / ``progress: false``)."""

    def __init__(self, desc: str, monitor: str) -> None:
        from medtune.progress import progress_bar

        self.monitor = monitor
        self.bar = progress_bar(None, desc, unit="epoch") if sys.stderr.isatty() else None

    def on_epoch_end(self, record: dict) -> None:
        if self.bar is not None:
            value = record.get(f"val_{self.monitor}")
            if isinstance(value, (int, float)):
                self.bar.set_postfix_str(f"val {self.monitor} {value:.4f}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def execute_run(plan: RunPlan, checkpoint_path: str | None, heartbeat: Callable[[], None] | None = None,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """:func:`_execute_run` with the run's ``progress`` field deciding whether its long steps show progress."""
    from medtune.progress import scope

    with scope(plan.config.progress):
        return _execute_run(plan, checkpoint_path, heartbeat, log)


def _execute_run(plan: RunPlan, checkpoint_path: str | None, heartbeat: Callable[[], None] | None = None,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train one planned run without touching the results store: the worker side of every executor.

    Returns a payload (plain tensors and values, picklable for process pools and Ray) that
    :func:`store_result` writes to the store on the driver: the record without artifact paths,
    the best backbone weights, and the test labels/probabilities. ``plan`` arrives built (its
    strategy, run id and fingerprint): nothing is parsed, built or hashed again on the worker.
    """
    log = log or (lambda _m: None)
    cfg, run_id, fingerprint = plan.config, plan.run_id, plan.fingerprint
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    data = prepare_data(cfg)
    device = resolve_device(cfg.device)
    strategy, model, blocks = build_run(cfg, data, device, strategy=plan.strategy)
    log(f"{run_id} {cfg.arch} {strategy.spec} seed {cfg.seed} frac {cfg.train_fraction} on {device}")

    class _Heartbeat:
        def on_epoch_end(self, record: dict) -> None:
            if heartbeat is not None:
                heartbeat()

    epochs = _EpochProgress(f"{run_id[:8]} {strategy.spec}", cfg.monitor)
    try:
        result = fit(model, data, strategy, cfg, blocks=blocks, checkpoint_path=checkpoint_path,
                     callbacks=(_Heartbeat(), epochs), log=log, data_fingerprint=fingerprint,
                     cache_cuts=plan.cache_cuts, pause_at=plan.pause_at)
    except RungReached as paused:
        value = rung_metric(paused.history, plan.pause_at, cfg.monitor)
        log(f"{run_id} paused at rung {plan.pause_at} (val {cfg.monitor} {value:.4f})")
        return {"paused": {"run_id": run_id, "rung": int(plan.pause_at), "epochs": paused.epochs,
                           "monitor": cfg.monitor, "val_metric": value}}
    finally:
        epochs.close()
    strategy.finalize_model(model)  # LoRA merges its adapters: the stored weights are the plain architecture's
    record = build_record(plan, data, result, model, len(blocks), device)
    m = result.test_metrics
    log(f"{run_id} done: test auc {m.get('auc', float('nan')):.4f} acc {m.get('accuracy', float('nan')):.4f} "
        f"({result.train_seconds:.1f}s, {result.trainable_params:,} trainable)")
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in model.backbone.state_dict().items()}
    return {"record": record, "weights": weights, "y_true": result.y_true, "y_prob": result.y_prob,
            "val_y_true": result.val_y_true, "val_y_prob": result.val_y_prob, "class_names": list(data.class_names)}


def store_result(store: ResultsStore, payload: dict[str, Any]) -> dict[str, Any]:
    """The driver side: write a finished run's artifacts (temp file + rename) and record (one transaction)."""
    record = dict(payload["record"])
    run_id = record["run_id"]
    record["artifacts"] = _save_artifacts(store, run_id, record["config"], payload["weights"], payload["y_true"],
                                          payload["y_prob"], payload["class_names"], payload.get("val_y_true"),
                                          payload.get("val_y_prob"))
    store.finish(run_id, record)
    store.checkpoint_path(run_id).unlink(missing_ok=True)
    record["artifacts"] = {k: store.resolve_artifact(store._relative(v)) for k, v in record["artifacts"].items()}
    return record


def _log_to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _execute_in_worker(plan: RunPlan, checkpoint: str) -> dict:
    """Module-level (picklable) worker entry for process pools and Ray."""
    return execute_run(plan, checkpoint, log=_log_to_stderr)


def failure_reason(exc: BaseException, limit: int = 500) -> str:
    """One line saying why a run failed: a MedtuneError's own message, else the exception's type and
    text (cut to ``limit`` characters; a worker that died has no message of its own)."""
    cause = getattr(exc, "cause", None)  # Ray wraps a task's exception (RayTaskError.cause) with its traceback
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc) if isinstance(exc, MedtuneError) else f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _claim(plans: list[RunPlan], store: ResultsStore, log: Callable[[str], None],
           ) -> tuple[list[dict | None], list[int]]:
    """The stored record of each plan that is done, and the indices of the plans this process claimed."""
    records: list[dict | None] = [None] * len(plans)
    todo: list[int] = []
    num_busy = 0
    for i, plan in enumerate(plans):
        cfg = plan.config
        records[i] = store.get(plan.run_id)
        if records[i] is not None:
            log(f"{plan.run_id} {cfg.arch} {cfg.strategy} seed {cfg.seed}: already done")
        elif store.claim(plan.run_id, cfg.to_dict()):
            todo.append(i)
        else:
            num_busy += 1
            log(f"{plan.run_id} is being trained by another live process; skipped here")
    if len(plans) > 1:
        log(f"{len(plans) - len(todo) - num_busy} runs already in the store, "
            + (f"{num_busy} being trained by another process, " if num_busy else "") + f"{len(todo)} to train")
    return records, todo


def _settle(store: ResultsStore, plan: RunPlan, payload: Any, log: Callable[[str], None],
            warned: set[str]) -> tuple[dict | None, str | None]:
    """Store a finished run's payload, or mark the run failed with its one-line reason; a tracker that
    cannot write is said once (in ``warned``) and never stops the sweep."""
    if isinstance(payload, BaseException):  # this run failed; the others go on
        reason = failure_reason(payload)
        store.fail(plan.run_id, reason)
        cfg = plan.config
        log(f"{plan.run_id} {cfg.arch} {cfg.strategy} seed {cfg.seed} FAILED: {reason}")
        return None, reason
    if "paused" in payload:  # successive halving: the run reached its rung; its checkpoint is kept
        info = payload["paused"]
        store.pause(plan.run_id, info["rung"], info["val_metric"], monitor=info["monitor"], epochs=info["epochs"])
        return {"run_id": plan.run_id, "status": "paused", **info}, None
    record = store_result(store, payload)  # a StoreError (disk full) ends the sweep, resumable
    if plan.config.tracker != "none":
        _track(record, plan.config.tracker, store.root, warned)
    return record, None


def _track(record: dict, tracker: str, store_root: Path, warned: set[str]) -> None:
    """Log a stored run to its tracker; a tracker that fails (package missing, folder unwritable, server
    down) costs one warning line on stderr per sweep, never the run or the sweep (``medtune results
    --export`` redoes it)."""
    from medtune.tracking import log_run, tracker_root

    try:
        log_run(record, tracker, tracker_root(tracker, store_root))
    except Exception as exc:  # noqa: BLE001 -- the run is stored; tracking is a copy
        if tracker in warned:
            return
        warned.add(tracker)
        reason = " ".join(str(exc).split()) or type(exc).__name__
        print(f"medtune: warning: run {record['run_id']} was stored but not logged to {tracker} ({reason[:300]}); "
              f"the runs are stored, their tracker logs are not written: 'medtune results --export {tracker} DIR' "
              "logs them later", file=sys.stderr)


def _worker_for(executor: Any, store: ResultsStore, log: Callable[[str], None]) -> Callable[[RunPlan, str], dict]:
    """The function an executor calls per run: in this process the driver trains and refreshes each
    claim's heartbeat itself; in pool or Ray workers the picklable module-level entry runs."""
    from medtune.executors import LocalExecutor

    if not (isinstance(executor, LocalExecutor) and executor.workers == 1):
        return _execute_in_worker

    def worker(plan: RunPlan, checkpoint: str) -> dict:
        return execute_run(plan, checkpoint, heartbeat=lambda: store.heartbeat(plan.run_id), log=log)

    return worker


def run_all(plans: list[RunPlan], *, store: ResultsStore, executor: Any, log: Callable[[str], None],
            progress: str | None = None, more: Callable[[], list[RunPlan]] | None = None) -> list[dict | None]:
    """Claim → execute → store → release for a list of planned runs; the one path of ``run`` and ``sweep``.

    Stored runs come back as stored, runs another live process claimed as None; the rest are
    claimed, trained on ``executor`` and written by this process. A failing run is marked ``failed``
    with its one-line reason and the others go on; on Ctrl-C or SIGTERM unstored runs are released,
    so the next start resumes them from their epoch checkpoints.

    Args:
        plans: the runs (:func:`plan_runs`), in the order of the returned records.
        store: the results store (the only writer is this process).
        executor: a ``medtune.executors`` executor; log: one-line progress messages;
        progress: a progress-bar title, or None for none.
        more: called after each run is stored; the plans it returns are claimed and trained too, while
            the others run (successive halving's next rung of a group, as soon as the group's rung is in).

    Returns:
        One record per run, the plans ``more`` added after ``plans`` (None for a run another process is
        training).

    Raises:
        RunsFailedError: after every other run finished and was stored, if some runs failed.
    """
    from tqdm import tqdm

    from medtune.executors import LocalExecutor

    if isinstance(executor, LocalExecutor):  # the runs train on this machine: check their devices before any claim
        for device in sorted({p.config.device for p in plans}):
            resolve_device(device)
    plans = list(plans)
    records, todo = _claim(plans, store, log)
    worker = _worker_for(executor, store, log)
    try:  # a checkpoints folder that leads out of the store: release the claims, then one line
        items = [(plans[i], str(store.checkpoint_path(plans[i].run_id))) for i in todo]
    except StoreError:
        store.release_all([plans[i].run_id for i in todo])
        raise
    bar = tqdm(total=len(todo), desc=progress, unit="run", file=sys.stderr,
               disable=progress is None or not sys.stderr.isatty())
    failures: list[tuple[str, str]] = []
    settled: set[int] = set()
    warned: set[str] = set()  # trackers that failed once (said once, the sweep goes on)

    def added() -> list[tuple[RunPlan, str]]:
        new = list(more()) if more is not None else []
        if not new:
            return []
        start = len(plans)
        new_records, claimed = _claim(new, store, log)
        plans.extend(new)
        records.extend(new_records)
        todo.extend(start + k for k in claimed)  # claimed first: released below if anything fails
        bar.total += len(claimed)
        bar.refresh()
        return [(new[k], str(store.checkpoint_path(new[k].run_id))) for k in claimed]

    try:
        for j, payload in executor.map_unordered(worker, items, return_exceptions=True,
                                                 more=added if more is not None else None):
            i = todo[j]
            if isinstance(payload, StoreError):  # the store's disk is full or read-only: every run would fail
                raise payload
            records[i], reason = _settle(store, plans[i], payload, log, warned)
            if reason is not None:
                failures.append((plans[i].run_id, reason))
            settled.add(j)
            bar.update(1)
    except BaseException:
        store.release_all([plans[i].run_id for j, i in enumerate(todo) if j not in settled])  # even on a full disk
        raise
    finally:
        bar.close()
    if failures:
        raise _failed(failures, records, store)
    return records


def _failed(failures: list[tuple[str, str]], records: list[dict | None], store: ResultsStore) -> RunsFailedError:
    done = sum(r is not None for r in records)
    return RunsFailedError(
        f"{len(failures)} of {len(records)} run(s) failed and are marked 'failed' in {store.root} "
        f"({done} finished and stored); fix the cause and run the same command again: only the failed "
        "runs train again.", records=records, failures=failures)


def run(cfg: RunConfig | dict | str | Path, *, store: ResultsStore | None = None, log: Callable[[str], None] | None = None,
        ) -> dict[str, Any]:
    """Train one configuration and return its record: a sweep of one cell (a run already in the
    store is not redone).

    Args:
        cfg: a RunConfig, a dict of its fields, or a YAML path.
        store: the results store (default: ``cfg.store``).
        log: one-line progress messages go here (default: silent).

    Returns:
        The run's record (see README, "Results store").

    Raises:
        ConfigError, DataError: bad configuration or data, before any training.
        MedtuneError: another live process is training this run.
    """
    from medtune.executors import LocalExecutor

    cfg = load_config(RunConfig, cfg)
    if store is not None:  # the store given is the run's store: its decode cache lives there too
        cfg = cfg.replace(store=str(store.root))
    store = store or ResultsStore(cfg.store)
    [plan] = plan_runs([(cfg, None)])
    [record] = run_all([plan], store=store, executor=LocalExecutor(1), log=log or (lambda _m: None))
    if record is None:
        raise MedtuneError(f"Run {plan.run_id} is being trained by another live process; start again once it finishes.")
    return record
