"""Use a stored run: load its trained model, and predict on new images — with every metric and its
95% interval when the images have labels (external validation in one call).

The images go through the run's own preprocessing (input size, ``resize`` policy; the model
normalises [0, 1] pixels itself), and the run's class names fix the class order.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medtune.config import RunConfig
from medtune.data.base import SPLITS, ImageSet
from medtune.errors import ConfigError, DataError
from medtune.store import ResultsStore

__all__ = ["load_model", "get_run", "predict", "Predictions", "PREDICT_SPLITS"]

#: Which images of the data a prediction covers.
PREDICT_SPLITS = ("all", *SPLITS)


def _open(store: ResultsStore | str | Path) -> ResultsStore:
    return store if isinstance(store, ResultsStore) else ResultsStore(store)


def get_run(run_id: str, *, store: ResultsStore | str | Path = "./medtune-results") -> dict:
    """The finished record of ``run_id`` (a unique prefix is enough).

    Raises:
        ConfigError: the id matches no finished run, or several.
    """
    from medtune.robustness.driver import resolve_runs

    if not isinstance(run_id, str) or not run_id.strip() or run_id == "all":
        raise ConfigError(f"Expected one run id (or a unique prefix); got {run_id!r}. See `medtune results --runs`.")
    return resolve_runs(_open(store), [run_id.strip()])[0]


def load_model(run_id: str, *, store: ResultsStore | str | Path = "./medtune-results", device: str = "cpu"):
    """The trained model of a stored run: a :class:`~medtune.models.NormalizedModel` (takes images
    (N, 3, H, W) in [0, 1], returns logits) with the run's best weights, in eval mode on ``device``.

    The run's class names and input size are attached as ``model.class_names`` and ``model.img_size``.

    Raises:
        ConfigError: unknown run id, or the run has no stored weights.
    """
    from medtune._tensors import resolve_device
    from medtune.robustness.driver import load_run_model

    db = _open(store)
    record = get_run(run_id, store=db)
    model = load_run_model(db, record, resolve_device(device))
    model.class_names = _class_names(record)
    model.img_size = int(record["config"]["img_size"])
    return model


def _class_names(record: dict) -> list[str]:
    preds = record.get("predictions") or {}
    if preds.get("class_names"):
        return list(preds["class_names"])
    path = Path(record.get("artifacts", {}).get("predictions", ""))
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return [str(c) for c in z["class_names"]]
    raise ConfigError(f"Run {record['run_id']} stores no class names; re-run it with this medtune version.")


def _task_of(record: dict, num_classes: int) -> str:
    y_true = (record.get("predictions") or {}).get("y_true") or []
    if y_true and isinstance(y_true[0], list):
        return "multilabel"
    return "binary" if num_classes == 2 else "multiclass"


@dataclass
class Predictions:
    """What :func:`predict` returns.

    Attributes:
        run_id: the run whose model predicted.
        ids: one identifier per image (a path, or ``"demo:test:3"``-like ids of built-in data).
        splits: the split of each image.
        class_names: the run's classes, the columns of ``y_prob``.
        task: ``binary``, ``multiclass`` or ``multilabel``.
        y_prob: float array (N, K): softmax probabilities (sigmoid per label for multi-label).
        y_true: the labels (int (N,) or 0/1 (N, K)), or None for unlabelled images.
        metrics: every metric of the run's records (None without labels).
        metric_ci: 95% intervals of the metrics (None without labels).
        per_class: sensitivity, specificity, PPV, PR-AUC and support per class (arg-max decisions).
        calibration: ``ece`` and ``brier`` of ``y_prob`` (None without labels).
        per_class_at_threshold: binary: the same at the run's threshold chosen on validation for its
            ``target_sensitivity`` (None otherwise).
    """

    run_id: str
    ids: list[str]
    splits: list[str]
    class_names: list[str]
    task: str
    y_prob: np.ndarray
    y_true: np.ndarray | None = None
    metrics: dict | None = None
    metric_ci: dict | None = None
    per_class: dict | None = None
    calibration: dict | None = None
    per_class_at_threshold: dict | None = None

    def to_rows(self) -> list[dict]:
        """One row per image: id, split, label (if known), the predicted class and a probability per class."""
        rows = []
        for i, image_id in enumerate(self.ids):
            row = {"id": image_id, "split": self.splits[i]}
            if self.y_true is not None:
                row["label"] = ("|".join(c for c, y in zip(self.class_names, self.y_true[i]) if y)
                                if self.task == "multilabel" else self.class_names[int(self.y_true[i])])
            row["predicted"] = ("|".join(c for c, p in zip(self.class_names, self.y_prob[i]) if p > 0.5)
                                if self.task == "multilabel" else self.class_names[int(self.y_prob[i].argmax())])
            row.update({f"prob_{c}": float(p) for c, p in zip(self.class_names, self.y_prob[i])})
            rows.append(row)
        return rows

    def to_csv(self, path: str | Path) -> Path:
        """Write :meth:`to_rows` as CSV; returns the path."""
        import io

        from medtune._safepaths import atomic_write, check_output
        from medtune.errors import StoreError

        path = Path(path)
        check_output(path, flag="-o")  # never a results store's database or managed folder
        rows = self.to_rows()
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["id"])
        writer.writeheader()
        writer.writerows(rows)
        try:
            atomic_write(path, buffer.getvalue())
        except StoreError as exc:
            raise ConfigError(f"Cannot write predictions to {path} ({exc}); give another -o path.") from None
        return path


def _unlabelled_folder(path: Path, img_size: int, resize: str, dicom_window: str = "auto", *,
                       data_cache: str = "memory", cache_dir: str | Path | None = None,
                       workers: int = 0) -> ImageSet | None:
    """A folder holding images directly (no class folders): unlabelled images, else None. Decoded
    into the decode cache under ``cache_dir`` when ``data_cache`` says so (as :func:`load_data`)."""
    from medtune.data._decode import IMAGE_EXTENSIONS, decode_image, resize_image
    from medtune.data.base import fingerprint_of
    from medtune.data.diskcache import load_or_decode, resolve_workers, source_key, use_disk
    from medtune.progress import progress_bar

    from medtune._safepaths import is_regular, warn_unreadable
    from medtune.data.sources import _subfolders

    if not path.is_dir() or _subfolders(path):
        return None
    entries, files, unreadable = sorted(path.iterdir()), [], 0
    for p in entries:  # regular files only (a FIFO would block its reader); an unreadable one is counted
        try:
            os.stat(p)
        except OSError:
            unreadable += 1
            continue
        if is_regular(p) and p.suffix.lower() in IMAGE_EXTENSIONS:
            files.append(p)
    warn_unreadable(path, unreadable)
    if not files:
        raise DataError(f"{path}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) and no class folders.")
    labels, splits = torch.full((len(files),), -1, dtype=torch.long), np.array(["test"] * len(files))
    fingerprint = None
    if resize != "bucket" and use_disk(data_cache, len(files) * 3 * img_size * img_size, cache_dir):
        key = source_key(files, kind="unlabelled", img_size=img_size, resize=resize, dicom_window=dicom_window)
        images, fingerprint = load_or_decode(
            Path(cache_dir) / "data-cache", key, files, img_size=img_size, resize=resize, dicom_window=dicom_window,
            workers=resolve_workers(workers),
            fingerprint=lambda imgs: fingerprint_of(imgs.chunks(), labels, splits, [], "unlabelled"))
    else:
        images = torch.empty((len(files), 3, img_size, img_size), dtype=torch.uint8)
        with progress_bar(len(files), "decode", unit="img") as bar:
            for i, p in enumerate(files):  # straight into the array: no list of every image
                images[i] = resize_image(decode_image(p, dicom_window)[0], img_size, resize)
                bar.update()
    data = ImageSet(images=images, labels=labels, splits=splits, class_names=[], task="unlabelled",
                    ids=[str(p) for p in files], name=path.name)
    data._fingerprint = fingerprint
    return data


#: The split of images whose source gives none (an external set is not split).
EXTERNAL = "external"


def _load(data: str, cfg: RunConfig, class_names: list[str], cache_dir: Path) -> ImageSet:
    """``demo``/``synthetic``/``medmnist:`` as the run loaded them (same split); a folder, CSV or ``.npz``
    as it is: images in the run's class order, the data's own split where it gives one (else
    ``external``), never re-split and without the training-set checks (an external set may hold a
    few images, or some of the classes only). Decoded as ``cfg.data_cache`` says: large sets into the
    decode cache under ``cache_dir/data-cache`` (reused by later runs and predictions)."""
    from medtune.data import load_data
    from medtune.data.sources import _from_items, _load_npz, csv_label, list_folder, read_csv

    cache = {"data_cache": cfg.data_cache, "cache_dir": cache_dir}
    if data == "demo" or data.startswith(("synthetic", "medmnist:")):
        images = load_data(data, img_size=cfg.img_size, resize=cfg.resize, seed=cfg.split_seed,
                           val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                           medmnist_size=cfg.medmnist_size, dicom_window=cfg.dicom_window,
                           medmnist_root=cfg.medmnist_root or None, decode_workers=cfg.decode_workers, **cache)
    else:
        path = Path(data).expanduser()
        if not path.exists():
            raise DataError(f"Data {data!r} not found; give a folder per class, a CSV, a MedMNIST .npz, a folder of "
                            "images, demo or synthetic.")
        folder = _unlabelled_folder(path, cfg.img_size, cfg.resize, cfg.dicom_window, workers=cfg.decode_workers,
                                    **cache)
        if folder is not None:
            return folder
        if path.suffix.lower() == ".npz":
            images = _load_npz(path, cfg.img_size, cfg.resize, **cache)
        else:
            if path.is_dir():
                items = [(p, c, s or EXTERNAL, None) for p, c, s in list_folder(path)[0]]
            elif path.suffix.lower() == ".csv":
                items = [(r["path"], csv_label(r), r["split"] or EXTERNAL, None) for r in read_csv(path, cfg.uncertain_labels)]
            else:
                raise DataError(f"{path}: unsupported data file; give a folder per class, a .csv or a .npz.")
            images = _from_items(items, name=path.stem, source=str(path), img_size=cfg.img_size, resize=cfg.resize,
                                 seed=cfg.split_seed, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                                 classes=class_names, dicom_window=cfg.dicom_window, workers=cfg.decode_workers,
                                 **cache)
    if list(images.class_names) != list(class_names):
        raise DataError(f"{data}: its classes ({', '.join(images.class_names)}) are not the run's "
                        f"({', '.join(class_names)}); give images of the run's classes.")
    return images


def predict(run_id: str, data: str, *, store: ResultsStore | str | Path = "./medtune-results", split: str = "all",
            device: str = "auto", batch_size: int | None = None, calibrated: bool = False,
            data_cache: str | None = None) -> Predictions:
    """Apply a stored run's model to ``data`` (any source ``--data`` takes, or a folder of unlabelled
    images) and, when the images have labels, compute every metric with its 95% interval exactly as
    the run's own test evaluation does (same loss, same interval method and seed).

    Args:
        run_id: a run id or a unique prefix.
        data: a folder per class, a CSV, a MedMNIST ``.npz``, ``demo``/``synthetic`` (split as the
            run split them), or a folder of images without labels.
        store: the results store holding the run.
        split: ``all`` or one of ``train``, ``val``, ``test``: the data's own split (``demo`` and
            ``synthetic`` split as the run did; a folder or CSV without splits is one ``external`` split).
        device: ``auto``, ``cpu`` or ``cuda``.
        batch_size: images per forward pass (default: the run's ``eval_batch_size``).
        calibrated: divide the logits by the run's temperature (fitted on its validation split) before
            the probabilities, metrics and calibration are computed; no arg-max changes (nor a binary AUC).
        data_cache: where a folder, CSV or ``.npz`` is decoded: ``memory``, ``disk`` (the decode cache
            ``STORE/data-cache``, predicted batch by batch from there) or ``auto`` (disk above 1 GiB
            decoded); default the run's own ``data_cache``.

    Raises:
        ConfigError: unknown run, split or data_cache.
        DataError: unreadable data, or labels that are not the run's classes.
    """
    from medtune._checks import check_choice
    from medtune.training.calibration import apply_temperature, brier_score, expected_calibration_error
    from medtune.training.imbalance import per_class_metrics
    from medtune.training.intervals import metric_intervals
    from medtune.training.loop import _loss_fn, predict_proba
    from medtune.training.metrics import compute_metrics

    check_choice(split, "split", PREDICT_SPLITS, owner="predict")
    db = _open(store)
    record = get_run(run_id, store=db)
    cfg = RunConfig.from_dict(record["config"], source=f"run {record['run_id']}")
    if data_cache is not None:
        cfg = cfg.replace(data_cache=data_cache)
    model = load_model(record["run_id"], store=db, device=device)
    images = _load(str(data), cfg, model.class_names, db.root)
    if split != "all":
        if not (images.splits == split).any():
            raise DataError(f"{data}: no images in the {split!r} split (its splits: "
                            f"{', '.join(sorted(set(map(str, images.splits))))}); use split='all'.")
        images = images.split(split)
    labelled = images.task != "unlabelled"
    task = images.task if labelled else _task_of(record, len(model.class_names))
    loss_fn = _loss_fn(task, cfg.label_smoothing, weight=record.get("class_weights"))
    prob, loss = predict_proba(model, images.images, task=task, batch_size=batch_size or cfg.eval_batch_size,
                               labels=images.labels if labelled else None, loss_fn=loss_fn if labelled else None,
                               progress="predict")
    if calibrated:
        temperature = (record.get("calibration") or {}).get("temperature")
        if temperature is None:
            raise ConfigError(f"Run {record['run_id']} stores no fitted temperature (trained before calibration "
                              "was recorded); predict without calibrated=True.")
        prob = apply_temperature(prob, temperature, task=task).astype(prob.dtype)
        loss = None  # the loss of the stored logits no longer applies
    out = Predictions(run_id=record["run_id"], ids=list(images.ids), splits=[str(s) for s in images.splits],
                      class_names=list(model.class_names), task=task, y_prob=prob)
    if labelled and len(images):
        out.y_true = images.labels.numpy()
        out.metrics = compute_metrics(out.y_true, prob, task=task, class_names=out.class_names, loss=loss)
        out.metric_ci = metric_intervals(out.y_true, prob, task=task, seed=cfg.seed)
        out.calibration = {"ece": expected_calibration_error(out.y_true, prob, task=task),
                           "brier": brier_score(out.y_true, prob, task=task)}
        out.per_class = per_class_metrics(out.y_true, prob, task=task, class_names=out.class_names)
        threshold = (record.get("operating_point") or {}).get("threshold")
        if task == "binary" and threshold is not None:  # the run's threshold, chosen on its validation split
            out.per_class_at_threshold = per_class_metrics(out.y_true, prob, task=task, class_names=out.class_names,
                                                           threshold=threshold)
    return out
