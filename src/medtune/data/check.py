"""``medtune data check``: counts, sizes and modes, unreadable files, and duplicates across splits."""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medtune.data._decode import decode_image
from medtune.data.base import SPLITS
from medtune.errors import DataError, MedtuneError

__all__ = ["DataReport", "check_data", "format_data_report"]


@dataclass
class DataReport:
    """What :func:`check_data` found. ``leaks`` are exact-duplicate images (same decoded pixels)
    that sit in different splits — test images the model may have trained on."""

    source: str
    num_images: int = 0
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> count
    sizes: dict[str, list[int]] = field(default_factory=dict)  # min_h, max_h, min_w, max_w
    modes: dict[str, int] = field(default_factory=dict)
    unreadable: list[dict[str, str]] = field(default_factory=list)
    leaks: list[list[str]] = field(default_factory=list)
    duplicates_within_split: int = 0
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def ok(self) -> bool:
        return not self.unreadable and not self.leaks and self.error is None


def _digest(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()


def _class_of(label, class_names: list[str], task: str) -> str:
    return class_names[int(label)] if task != "multilabel" else "|".join(
        n for n, v in zip(class_names, label.tolist(), strict=True) if v)


def check_data(source: str, *, img_size: int = 64, seed: int = 0, val_fraction: float = 0.15,
               test_fraction: float = 0.15, medmnist_size: int = 28, dicom_window: str = "auto",
               uncertain_labels: str = "error") -> DataReport:
    """Inspect a data source without stopping at the first bad file.

    Files of folder and CSV sources are decoded one by one (unreadable ones are listed, not
    fatal); a ``.npz`` is resized image by image; built-in sources are checked after loading. Only a
    hash of each image is kept, so memory does not grow with the data. Splits are those the source
    gives, else the ones ``load_data`` would make with ``seed`` (from the labels: nothing is decoded
    again).
    """
    from medtune.data.sources import (_check_splits, _items_of, _labels_and_splits, _medmnist_download, _npz_parts,
                                      _open_npz, load_data)

    report = DataReport(source=str(source))
    path = Path(source)
    entries: list[tuple[str, str, str | None, str]] = []  # id, class, split, sha256 of the pixels
    heights, widths = [], []
    if path.is_dir() or path.suffix.lower() == ".csv":
        items, classes = _items_of(path, uncertain_labels, None)
        for p, label, s, _ in items:
            try:
                rgb, mode, (h, w) = decode_image(p, dicom_window)
            except DataError as exc:
                report.unreadable.append({"file": str(p), "error": str(exc)})
                continue
            report.modes[mode] = report.modes.get(mode, 0) + 1
            heights.append(h)
            widths.append(w)
            entries.append((str(p), "|".join(label) if isinstance(label, list) else label, s, _digest(rgb)))
        if entries and any(s is None for _, _, s, _ in entries):
            try:
                labels, task, names, groups, splits = _labels_and_splits(
                    items, source=str(path), seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                    classes=classes)
                _check_splits(labels, splits, names, task, groups, str(path))
                split_of = {str(p): str(s) for (p, _, _, _), s in zip(items, splits, strict=True)}
                entries = [(i, c, split_of.get(i, "?"), px) for i, c, _, px in entries]
            except MedtuneError as exc:
                report.error = str(exc)
                entries = [(i, c, "unsplit", px) for i, c, _, px in entries]
    elif path.suffix.lower() == ".npz" or str(source).startswith("medmnist:"):
        if not path.suffix.lower() == ".npz":
            path = _medmnist_download(str(source).split(":", 1)[1], medmnist_size)
        npz, counts = _open_npz(path)
        digests: list[str] = []
        labels, splits, names, task = _npz_parts(npz, path, img_size, "resize", counts,
                                                 lambda _row, image: digests.append(_digest(image.numpy())))
        _check_splits(labels, splits, names, task, None, str(path))
        ids = [f"{path.name}:{s}:{i}" for s in SPLITS for i in range(counts[s])]
        entries = [(ids[i], _class_of(labels[i], names, task), str(splits[i]), digests[i]) for i in range(len(ids))]
        heights = widths = [img_size]
        report.modes["decoded"] = len(entries)
    else:
        data = load_data(str(source), img_size=img_size, seed=seed, val_fraction=val_fraction,
                         test_fraction=test_fraction, medmnist_size=medmnist_size)
        for i in range(len(data)):
            entries.append((data.ids[i], _class_of(data.labels[i], data.class_names, data.task), str(data.splits[i]),
                            _digest(data.images[i].numpy())))
        heights = widths = [data.images.shape[-1]]
        report.modes["decoded"] = len(data)
    report.num_images = len(entries)
    counts: dict[str, Counter] = defaultdict(Counter)
    by_hash: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for ident, cls, split, px in entries:
        counts[split or "?"][cls] += 1
        by_hash[px].append((split, ident))
    report.counts = {s: dict(sorted(c.items())) for s, c in sorted(counts.items())}
    if heights:
        report.sizes = {"min_h": int(min(heights)), "max_h": int(max(heights)), "min_w": int(min(widths)),
                        "max_w": int(max(widths))}
        if len(heights) == len(entries) and len(heights) > 1:  # native sizes: their distribution and buckets
            from medtune.data._decode import choose_buckets

            sides = np.sqrt(np.asarray(heights, float) * np.asarray(widths, float))
            report.sizes["side_quantiles"] = [round(float(q), 1) for q in np.quantile(sides, [0, 0.25, 0.5, 0.75, 1])]
            report.sizes["buckets"] = list(choose_buckets(sides, img_size))
            report.sizes["img_size"] = int(img_size)
    for group in by_hash.values():
        if len(group) > 1:
            if len({s for s, _ in group}) > 1:
                report.leaks.append([f"{s}:{i}" for s, i in group])
            else:
                report.duplicates_within_split += 1
    return report


def format_data_report(report: DataReport, fmt: str = "table") -> str:
    """Human-readable table (default) or JSON of a :class:`DataReport`."""
    if fmt == "json":
        return json.dumps(report.to_dict(), indent=2)
    lines = [f"data: {report.source}  ({report.num_images} readable images)"]
    classes = sorted({c for split in report.counts.values() for c in split})
    splits = [s for s in (*SPLITS, *sorted(report.counts)) if s in report.counts]
    splits = list(dict.fromkeys(splits))
    width = max([5] + [len(c) for c in classes])
    lines.append(f"{'class':<{width}}  " + "  ".join(f"{s:>6}" for s in splits))
    for c in classes:
        lines.append(f"{c:<{width}}  " + "  ".join(f"{report.counts[s].get(c, 0):>6}" for s in splits))
    if report.sizes:
        s = report.sizes
        lines.append(f"sizes: {s['min_w']}-{s['max_w']} x {s['min_h']}-{s['max_h']} px; modes: "
                     + ", ".join(f"{m} ({n})" for m, n in sorted(report.modes.items())))
        if "buckets" in s:
            q = s["side_quantiles"]
            lines.append(f"side sqrt(h*w): min {q[0]:g}, quartiles {q[1]:g} / {q[2]:g} / {q[3]:g}, max {q[4]:g} px; "
                         f"resize: bucket at img_size {s['img_size']} feeds sizes "
                         + ", ".join(str(b) for b in s["buckets"]))
    lines.append(f"unreadable files: {len(report.unreadable)}")
    lines += [f"  {u['error']}" for u in report.unreadable[:20]]
    lines.append(f"duplicates across splits (leakage): {len(report.leaks)}")
    lines += [f"  {' = '.join(group)}" for group in report.leaks[:20]]
    if report.duplicates_within_split:
        lines.append(f"duplicates within a split: {report.duplicates_within_split}")
    if report.error:
        lines.append(f"problem: {report.error}")
    lines.append("OK" if report.ok else "PROBLEMS FOUND")
    return "\n".join(lines)
