"""Experiment tracking: each stored run's config, per-epoch history and final metrics, written for
TensorBoard (``pip install -e ".[tensorboard]"``).

The tracker reads finished run records, so a run logs the same whether it was just trained
(``--tracker tensorboard``: one folder per run under ``STORE/tensorboard/``) or is exported from a
filled store later (``medtune results --export tensorboard DIR``).
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

__all__ = ["TRACKERS", "TrackerError", "log_run", "export_runs"]

#: ``none`` or a supported tracker.
TRACKERS = ("none", "tensorboard")


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

    Raises:
        ConfigError: an unknown tracker, or its package is missing.
    """
    if tracker == "none":
        return None
    if tracker not in TRACKERS:
        from medtune.errors import unknown_name_error

        raise unknown_name_error("tracker", tracker, TRACKERS)
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


def export_runs(records: Iterable[Mapping[str, Any]], tracker: str, root: str | Path) -> list[Path]:
    """:func:`log_run` for every record of a filled store; returns the written folders.

    Raises:
        ConfigError: ``root`` is a results store's managed folder or a file, or not writable.
    """
    from medtune._safepaths import check_output

    check_output(root, flag="--export folder", folder=True)
    return [p for r in records if (p := log_run(r, tracker, root)) is not None]
