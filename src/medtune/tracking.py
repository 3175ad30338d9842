"""Experiment tracking: each stored run's config, per-epoch history and final metrics, written for
TensorBoard (``pip install -e ".[tensorboard]"``) or MLflow (``pip install -e ".[mlflow]"``).

The tracker reads finished run records, so a run logs the same whether it was just trained
(``--tracker tensorboard``: one folder per run under ``STORE/tensorboard/``; ``--tracker mlflow``: an
MLflow file store ``STORE/mlruns``, or the server of ``MLFLOW_TRACKING_URI``) or is exported from a
filled store later (``medtune results --export tensorboard|mlflow DIR``).
"""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from medtune.errors import ConfigError

__all__ = ["TRACKERS", "TrackerError", "log_run", "export_runs", "tracker_root", "mlflow_params", "mlflow_metrics"]

#: ``none`` or a supported tracker.
TRACKERS = ("none", "tensorboard", "mlflow")

#: The MLflow experiment medtune logs its runs into.
MLFLOW_EXPERIMENT = "medtune"


def _writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tracker=tensorboard needs the tensorboard package: pip install 'medtune[tensorboard]'.") \
            from None
    return SummaryWriter(log_dir=str(folder))


def _numbers(row: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def log_run(record: Mapping[str, Any], tracker: str, root: str | Path) -> Path | None:
    """Write one run record for ``tracker`` into ``root/RUN_ID``; returns that folder (None for ``none``).

    TensorBoard gets: the config as JSON text (tag ``config``); every history row's numbers as
    ``history/KEY`` at step = the row's index (epochs of every phase in order); the test metrics as
    ``test/KEY``, the validation metrics as ``val/KEY``, the calibration as ``calibration/KEY``, at
    step 0; and the config's scalars with the test metrics as hyper-parameters (TensorBoard's HParams tab).

    MLflow gets (see :func:`_log_mlflow`) one run per record in the experiment ``medtune`` of the
    tracking store ``root`` (a folder, taken as a file store), or of ``MLFLOW_TRACKING_URI`` when that
    is set; the returned path is then the run's MLflow artifact location when it is a local folder.

    Raises:
        ConfigError: an unknown tracker, or its package is missing.
    """
    if tracker == "none":
        return None
    if tracker not in TRACKERS:
        from medtune.errors import unknown_name_error

        raise unknown_name_error("tracker", tracker, TRACKERS)
    if tracker == "mlflow":
        return _log_mlflow(record, root)
    from medtune._safepaths import check_run_id

    folder = Path(root) / check_run_id(record["run_id"])  # a folder name: never a path out of ``root``
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "Permission denied")
    except OSError as exc:
        raise TrackerError(f"Cannot write the {tracker} logs of run {record['run_id']} to {str(folder)!r} "
                           f"({exc.strerror or exc}); choose a writable folder.") from None
    try:
        _write_events(record, _writer(folder))
    except OSError as exc:
        raise TrackerError(f"Cannot write the {tracker} logs of run {record['run_id']} to {str(folder)!r} "
                           f"({exc.strerror or exc}); choose a writable folder.") from None
    return folder


def _write_events(record: Mapping[str, Any], writer) -> None:
    try:
        config = dict(record.get("config") or {})
        writer.add_text("config", "```json\n" + json.dumps(config, indent=2, sort_keys=True, default=str) + "\n```")
        for step, row in enumerate(record.get("history") or []):
            for key, value in _numbers(row).items():
                writer.add_scalar(f"history/{key}", value, step)
        for prefix, values in (("test", record.get("metrics")), ("val", record.get("val_metrics")),
                               ("calibration", {k: v for k, v in (record.get("calibration") or {}).items()
                                                if k != "reliability"})):
            for key, value in _numbers(values or {}).items():
                writer.add_scalar(f"{prefix}/{key}", value, 0)
        hparams = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
        hparams.update(run_id=str(record["run_id"]), label=str(record.get("label")))
        writer.add_hparams(hparams, {f"hparam/test_{k}": v for k, v in _numbers(record.get("metrics") or {}).items()},
                           run_name=".")
    finally:
        writer.close()


class TrackerError(ConfigError):
    """A tracker's folder cannot be written (the run itself is stored; a sweep goes on)."""


def tracker_root(tracker: str, store_root: str | Path) -> Path:
    """Where a sweep's ``--tracker`` writes by default: ``STORE/tensorboard`` or ``STORE/mlruns``."""
    return Path(store_root) / ("mlruns" if tracker == "mlflow" else tracker)


def _mlflow_client(root: str | Path):
    try:
        import mlflow  # noqa: F401  (mlflow-skinny suffices)
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError("tracker=mlflow needs the mlflow package: pip install 'medtune[mlflow]'.") from None
    uri = os.environ.get("MLFLOW_TRACKING_URI") or Path(root).resolve().as_uri()
    if uri.startswith("file:"):
        # MLflow 3 keeps its file store (the offline default, no server or database needed) behind an
        # opt-in; medtune opts in for the folder it writes.  A team's server: MLFLOW_TRACKING_URI.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri), uri


def _flat(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flat(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        out[prefix] = text[:_MLFLOW_PARAM_CHARS]


_MLFLOW_PARAM_CHARS = 500  # the longest param value every MLflow store accepts


def mlflow_params(record: Mapping[str, Any]) -> dict[str, str]:
    """A run's resolved config as MLflow params: one per field (nested ones as ``a.b``), values as text
    (strings as they are, other values as JSON)."""
    out: dict[str, str] = {}
    _flat("", dict(record.get("config") or {}), out)
    return out


def mlflow_metrics(record: Mapping[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """A run's numbers as MLflow metrics, ``{key: [(step, value), ...]}``: each history row's numbers as
    ``history.KEY`` at step = the row's index, the test metrics as ``test.KEY``, the validation metrics
    as ``val.KEY`` and the calibration as ``calibration.KEY`` at step 0."""
    out: dict[str, list[tuple[int, float]]] = {}
    for step, row in enumerate(record.get("history") or []):
        for key, value in _numbers(row).items():
            out.setdefault(f"history.{key}", []).append((step, value))
    for prefix, values in (("test", record.get("metrics")), ("val", record.get("val_metrics")),
                           ("calibration", {k: v for k, v in (record.get("calibration") or {}).items()
                                            if k != "reliability"})):
        for key, value in _numbers(values or {}).items():
            out[f"{prefix}.{key}"] = [(0, value)]
    return out


def artifact_files(record: Mapping[str, Any]) -> list[Path]:
    """The files of a run's artifact folder that exist (the record's ``artifacts`` paths, resolved)."""
    paths = [Path(v) for v in (record.get("artifacts") or {}).values() if isinstance(v, str)]
    return sorted({p for p in paths if p.is_file()})


def _log_mlflow(record: Mapping[str, Any], root: str | Path) -> Path | None:
    """One MLflow run per medtune run, named by its label and tagged ``medtune.run_id``: params from the
    resolved config (:func:`mlflow_params`), metrics (:func:`mlflow_metrics`), the run's artifact
    files under ``artifacts/`` and the store's artifact folder as the tag ``medtune.artifact_dir``.
    A run already logged (same ``medtune.run_id`` in the experiment) is left as it is, so exporting a
    store twice adds nothing."""
    from mlflow.entities import Metric, Param, RunTag

    client, _ = _mlflow_client(root)
    experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(MLFLOW_EXPERIMENT)
    run_id = str(record["run_id"])
    existing = client.search_runs([experiment_id], filter_string=f"tags.`medtune.run_id` = '{run_id}'", max_results=1)
    if existing:
        return _local(existing[0].info.artifact_uri)
    files = artifact_files(record)
    tags = {"mlflow.runName": str(record.get("label") or run_id), "medtune.run_id": run_id}
    if files:
        tags["medtune.artifact_dir"] = str(files[0].parent)
    run = client.create_run(experiment_id, tags=tags)
    rid = run.info.run_id
    try:
        params = [Param(k, v) for k, v in sorted(mlflow_params(record).items())]
        metrics = [Metric(k, v, 0, step) for k, rows in sorted(mlflow_metrics(record).items()) for step, v in rows]
        for i in range(0, len(params), 100):  # MLflow's batch limits: 100 params, 1000 metrics
            client.log_batch(rid, params=params[i:i + 100])
        for i in range(0, len(metrics), 1000):
            client.log_batch(rid, metrics=metrics[i:i + 1000])
        client.log_batch(rid, tags=[RunTag("medtune.status", str(record.get("status", "done")))])
        for path in files:
            client.log_artifact(rid, str(path), artifact_path="artifacts")
    except BaseException:
        client.set_terminated(rid, status="FAILED")
        raise
    client.set_terminated(rid, status="FINISHED")
    return _local(client.get_run(rid).info.artifact_uri)


def _local(uri: str) -> Path | None:
    from urllib.parse import unquote, urlparse

    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(uri) if not parsed.scheme else None


def export_runs(records: Iterable[Mapping[str, Any]], tracker: str, root: str | Path) -> list[Path | None]:
    """:func:`log_run` for every record of a filled store; returns what each call returned (a folder, or
    None for an MLflow run on a remote server).

    Raises:
        ConfigError: ``root`` is a results store's managed folder or a file, or not writable.
    """
    if tracker == "none":
        return []
    from medtune._safepaths import check_output

    if tracker != "mlflow" or "://" not in str(root):
        check_output(root, flag="--export folder", folder=True)
    return [log_run(r, tracker, root) for r in records]
