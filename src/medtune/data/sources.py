"""Data sources: a folder per class, a CSV, a MedMNIST npz (or ``medmnist:NAME``), DICOM, demo, synthetic.

Every source ends in one :class:`ImageSet`: each image decoded once, converted to RGB, resized to
the model input size and stacked into one uint8 tensor.
"""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from medtune.data._decode import (IMAGE_EXTENSIONS, check_unit_range, choose_buckets, decode_image, nearest_bucket,
                                  resize_image, to_rgb_uint8)
from medtune.data.base import SPLIT_ALIASES, SPLITS, ImageSet, fingerprint_of
from medtune.data.diskcache import (DATA_CACHES, build, load_or_decode, open_cached, resolve_workers, source_key,
                                   use_disk, write_row)
from medtune.data.splits import make_splits
from medtune._safepaths import walk_files, warn_unreadable
from medtune.errors import ConfigError, DataError, short_repr
from medtune.progress import progress_bar

__all__ = ["load_data", "list_folder", "read_csv", "csv_label", "medmnist_path", "medmnist_root"]

#: The environment variable naming the folder of MedMNIST files (below ``--medmnist-root``, above the default).
MEDMNIST_ROOT_ENV = "MEDMNIST_ROOT"
#: MedMNIST's 2-D datasets and their task as the medmnist package's INFO names it (medmnist 3.0), so a name
#: is checked, and a file is read, without the package.
MEDMNIST_2D_TASKS = {
    "pathmnist": "multi-class", "chestmnist": "multi-label, binary-class", "dermamnist": "multi-class",
    "octmnist": "multi-class", "pneumoniamnist": "binary-class", "retinamnist": "ordinal-regression",
    "breastmnist": "binary-class", "bloodmnist": "multi-class", "tissuemnist": "multi-class",
    "organamnist": "multi-class", "organcmnist": "multi-class", "organsmnist": "multi-class",
}


def list_folder(root: Path) -> tuple[list[tuple[Path, str, str | None]], list[str]]:
    """(path, class, given split or None) for every image of a folder-per-class tree; skipped files.

    Split folders are ``train``, ``val`` and ``test``; ``valid`` or ``validation`` is read as ``val``."""
    root = Path(root)
    subdirs = _subfolders(root)
    split_names = set(SPLITS) | set(SPLIT_ALIASES)
    given = {p.name for p in subdirs} & split_names
    layout = [(p, SPLIT_ALIASES.get(p.name, p.name)) for p in subdirs] if given else [(root, None)]
    named_val = sorted(n for n in given if SPLIT_ALIASES.get(n, n) == "val")
    if len(named_val) > 1:
        raise DataError(f"{root}: has {' and '.join(named_val)} folders, both read as the validation split; "
                        "merge them into one.")
    if given and given != {p.name for p in subdirs}:
        extra = sorted({p.name for p in subdirs} - split_names)
        raise DataError(f"{root}: mixes split folders ({', '.join(sorted(given))}) with class folders "
                        f"({', '.join(extra)}); put every class folder inside train/, val/ and test/.")
    items, skipped, unreadable = [], [], 0
    for base, split in layout:
        classes = _subfolders(base)
        if not classes:
            raise DataError(f"{base}: no class folders; put the images of each class in a subfolder named after it.")
        for cdir in classes:
            files, bad = walk_files(cdir)  # unreadable entries counted, FIFOs and /proc never entered
            unreadable += bad
            images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
            skipped += [str(p) for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
            if not images:
                raise DataError(f"{cdir}: class folder has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                                "add images or remove the folder.")
            items += [(p, cdir.name, split) for p in images]
    warn_unreadable(root, unreadable)
    return items, skipped


def _subfolders(folder: Path) -> list[Path]:
    """The non-hidden subfolders of ``folder`` (links followed; an unreadable one is left out)."""
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise DataError(f"{folder}: cannot list the folder ({exc.strerror or exc}); check its permissions.") from None
    out = []
    for e in entries:
        try:
            if not e.name.startswith(".") and e.is_dir():
                out.append(Path(e.path))
        except OSError:
            continue
    return sorted(out)


#: CSV columns that are never label columns of a one-column-per-label CSV.
RESERVED_CSV_COLUMNS = ("path", "label", "split", "group", "bbox", "mask")
#: What an uncertain (-1) or blank cell of a label column means (RunConfig.uncertain_labels).
UNCERTAIN_LABELS = ("error", "zeros", "ones")
_POSITIVE, _NEGATIVE = frozenset({"1", "1.0"}), frozenset({"0", "0.0"})


def read_csv(path: Path, uncertain_labels: str = "error") -> list[dict]:
    """Rows of a ``path,label[,split][,group]`` CSV with paths resolved inside the CSV's folder.

    A CSV without a ``label`` column holds one column per label (CheXpert style,
    ``path,Atelectasis,Cardiomegaly,…[,split][,group]``): every column other than
    ``RESERVED_CSV_COLUMNS`` is a label whose cells are ``1``/``1.0`` (present) or ``0``/``0.0``
    (absent); the row's ``label`` is then the list of present labels (maybe empty) and
    ``label_columns`` the columns in file order. Uncertain (``-1``) and blank ("not mentioned")
    cells follow ``uncertain_labels``: ``error`` refuses them naming the line and column (medtune
    does not guess); ``zeros`` reads both as absent (CheXpert's U-Zeros); ``ones`` reads ``-1`` as
    present and blank as absent (U-Ones; Irvin et al., 2019).

    Raises:
        DataError: missing columns, empty file, a path escaping the data root, a missing file,
            a duplicate path, a bad split name, or a label cell that is not 0/1.
    """
    root = path.parent.resolve()
    try:
        # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the first column's name
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            return _read_csv_rows(reader, path, root, uncertain_labels)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); save the "
                        "CSV as UTF-8 (e.g. iconv -f latin1 -t utf-8).") from None
    except csv.Error as exc:  # e.g. a field over the csv module's size limit (an unclosed quote)
        raise DataError(f"{path}, line {reader.line_num}: unreadable CSV ({exc}); check the quoting of that line."
                        ) from None


def _read_csv_rows(reader: csv.DictReader, path: Path, root: Path, uncertain_labels: str) -> list[dict]:
    """The rows of :func:`read_csv` (inside its decoding guard)."""
    columns = [c.strip() for c in (reader.fieldnames or [])]
    label_columns = [c for c in columns if c and c not in RESERVED_CSV_COLUMNS] if "label" not in columns else []
    if "path" in columns and len(label_columns) == 1:
        raise DataError(f"{path}: one label column ({short_repr(label_columns[0])}) and no 'label' column; write a "
                        "path,label CSV, or give one 0/1 column per label (at least two).")
    missing = [c for c in ("path", "label") if c not in columns and not (c == "label" and label_columns)]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; the header must be "
                        f"path,label[,split][,group]. Found: {', '.join(map(short_repr, columns)) or 'no header'}.")
    rows, seen = [], {}
    for line, raw in enumerate(reader, start=2):
        row = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
        full = (root / row["path"]).resolve()
        if not full.is_relative_to(root):
            raise DataError(f"{path}, line {line}: path {short_repr(row['path'])} points outside the data folder {root}; "
                            "keep images under the CSV's folder.")
        if not full.is_file():
            raise DataError(f"{path}, line {line}: file {short_repr(row['path'])} not found; fix the path or drop the row.")
        if full in seen:
            raise DataError(f"{path}, line {line}: duplicate path {short_repr(row['path'])} (also on line {seen[full]}); "
                            "list each image once.")
        seen[full] = line
        if label_columns:
            row["label"] = _label_cells(row, label_columns, path, line, uncertain_labels)
        elif not row["label"]:
            raise DataError(f"{path}, line {line}: empty label; give every row a label.")
        if isinstance(row["label"], str) and "|" in row["label"] and not all(p.strip() for p in row["label"].split("|")):
            raise DataError(f"{path}, line {line}: label {short_repr(row['label'])} has an empty class name "
                            "between '|' separators; write multi-label rows as a|b.")
        split = row.get("split") or None
        split = SPLIT_ALIASES.get(split, split)
        if split is not None and split not in SPLITS:
            raise DataError(f"{path}, line {line}: split {short_repr(split)} is not one of {', '.join(SPLITS)}.")
        rows.append({"path": full, "label": row["label"], "split": split, "group": row.get("group") or None,
                     **({"label_columns": label_columns} if label_columns else {}),
                     "line": line, "bbox": row.get("bbox") or None, "mask": row.get("mask") or None})
    if not rows:
        raise DataError(f"{path}: no rows; add one line per image.")
    return rows


def _label_cells(row: dict, label_columns: list[str], path: Path, line: int, uncertain_labels: str) -> list[str]:
    """The present labels of one row of a one-column-per-label CSV."""
    present = []
    for column in label_columns:
        cell = row.get(column, "")
        uncertain = cell in ("-1", "-1.0")
        if cell in _POSITIVE or (uncertain and uncertain_labels == "ones"):
            present.append(column)
        elif cell in _NEGATIVE or ((uncertain or not cell) and uncertain_labels != "error"):
            continue
        elif uncertain or not cell:
            raise DataError(f"{path}, line {line}: label column {short_repr(column)} is "
                            f"{'-1 (uncertain)' if uncertain else 'blank'}; label columns hold 1 (present) or 0 "
                            "(absent): say what uncertain and blank cells mean with --uncertain-labels zeros|ones "
                            "(CheXpert's U-Zeros / U-Ones), or map them to 0/1 in the file.")
        else:
            raise DataError(f"{path}, line {line}: label column {short_repr(column)} is {short_repr(cell)}; label "
                            "columns hold 1 (present) or 0 (absent): drop columns that are not labels.")
    return present


def csv_label(row: dict) -> str | list[str]:
    """A :func:`read_csv` row's label as the loaders take it: a class name, or a list of labels
    (``a|b``, or the present labels of a one-column-per-label CSV)."""
    label = row["label"]
    return label if isinstance(label, list) else label.split("|") if "|" in label else label


def medmnist_root(root: str | Path | None = None) -> Path:
    """The folder of MedMNIST files: ``root`` if given, else ``$MEDMNIST_ROOT``, else the medmnist
    package's default root (``~/.medmnist``, its ``medmnist.info.DEFAULT_ROOT``)."""
    if root:
        return Path(root).expanduser()
    if os.environ.get(MEDMNIST_ROOT_ENV):
        return Path(os.environ[MEDMNIST_ROOT_ENV]).expanduser()
    return Path.home() / ".medmnist"  # medmnist.info.get_default_root(), without importing (it creates the folder)


def medmnist_path(name: str, size: int, root: str | Path | None = None) -> Path:
    """Where the medmnist package keeps ``name`` at ``size`` (``ROOT/NAME[_SIZE].npz``; 28 px has no suffix)."""
    return medmnist_root(root) / (f"{name}.npz" if size == 28 else f"{name}_{size}.npz")


def _medmnist_download(name: str, size: int, root: str | Path | None = None) -> Path:
    """The file of ``medmnist:NAME`` at ``size``: read from the root when it is there (no network), else
    downloaded by the medmnist package (online only), else a one-line DataError saying which file goes where."""
    if name not in MEDMNIST_2D_TASKS:
        from medtune.errors import did_you_mean

        raise ConfigError(f"Unknown MedMNIST dataset {name!r}.{did_you_mean(name, list(MEDMNIST_2D_TASKS))} "
                          f"2-D datasets: {', '.join(MEDMNIST_2D_TASKS)}.")
    path = medmnist_path(name, size, root)
    if path.is_file():
        return path
    try:
        import medmnist
        from medmnist import INFO
    except ImportError:
        medmnist = None
    if medmnist is not None and name in INFO:
        try:
            cls = getattr(medmnist, INFO[name]["python_class"])
            path.parent.mkdir(parents=True, exist_ok=True)
            cls(split="test", download=True, size=size, root=str(path.parent))
        except Exception:  # offline: medmnist raises RuntimeError (after requests/urllib errors)
            pass
        if path.is_file():
            return path
    url = f"https://zenodo.org/records/10519652/files/{path.name}"
    raise DataError(f"MedMNIST file {path.name} is not in {path.parent} and cannot be downloaded here (offline"
                    f"{'' if medmnist else ', medmnist not installed'}); download {url} and put it in {path.parent} "
                    f"(or pass --medmnist-root DIR, or --data PATH/{path.name}).")


def _open_npz(path: Path) -> tuple[np.lib.npyio.NpzFile, dict[str, int]]:
    """A MedMNIST-style ``.npz`` (no pickles) with its MedMNIST keys checked, and its images per split
    (read from the array headers; nothing is decoded)."""
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc}).") from None
    expected = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
    missing = [k for k in expected if k not in npz.files]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)}; expected the MedMNIST keys "
                        f"{', '.join(expected)}. Found: {', '.join(npz.files) or 'none'}.")
    counts = {s: shape[0] if shape else 0 for s, shape in
              zip(SPLITS, (_check_npz_headers(npz, path, expected)[f"{s}_images"] for s in SPLITS), strict=True)}
    return npz, counts


def _load_npz(path: Path, img_size: int, resize: str, data_cache: str = "memory", cache_dir: str | Path | None = None
              ) -> ImageSet:
    """A MedMNIST-style ``.npz``; its images resized into one tensor, or with ``data_cache`` into
    the decode cache (keyed by the file's path, size and mtime, ``img_size`` and ``resize``; a cache
    built from this file is not re-validated)."""
    npz, counts = _open_npz(path)
    shape = (sum(counts.values()), 3, img_size, img_size)
    if not use_disk(data_cache, int(np.prod(shape)), cache_dir):
        images = torch.empty(shape, dtype=torch.uint8)

        def write(i: int, x: torch.Tensor) -> None:
            images[i] = x

        label_t, splits, names, task = _npz_parts(npz, path, img_size, resize, counts, write)
        fingerprint = None
    else:
        root, key = Path(cache_dir) / "data-cache", source_key([path], kind="npz", img_size=img_size, resize=resize)
        found = open_cached(root, key)
        if found:  # the labels only: the images were validated when the cache was built
            label_t, splits, names, task = _npz_parts(npz, path, img_size, resize, counts, None)
            images, fingerprint = found
        else:
            parts = []

            def fill(npy: Path, offset: int) -> None:
                fd = os.open(npy, os.O_WRONLY)
                try:
                    parts.extend(_npz_parts(npz, path, img_size, resize, counts,
                                            lambda i, x: write_row(fd, offset, i, x.numpy())))
                finally:
                    os.close(fd)

            images, fingerprint = build(root, key, shape, fill, lambda imgs: fingerprint_of(imgs.chunks(), *parts))
            label_t, splits, names, task = parts
    data = ImageSet(images=images, labels=label_t, splits=splits, class_names=names, task=task,
                    ids=[f"{path.name}:{s}:{i}" for s in SPLITS for i in range(counts[s])],
                    name=path.stem.split("_")[0], meta={"source": str(path)})
    data._fingerprint = fingerprint
    return data


def _npz_parts(npz, path: Path, img_size: int, resize: str, counts: dict[str, int], write
               ) -> tuple[torch.Tensor, np.ndarray, list[str], str]:
    """Validate an npz's arrays; ``write(row, image)`` each resized image unless ``write`` is None
    (labels only). Returns (labels, splits, class names, task)."""
    labels, splits, row = [], [], 0
    for split in SPLITS:
        y = npz[f"{split}_labels"]
        if write is None:
            labels.append(y if y.ndim != 1 else y[:, None])
            splits += [split] * counts[split]
            continue
        x = npz[f"{split}_images"]
        if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
            raise DataError(f"{path}: {split}_images has shape {x.shape}; expected (N, H, W) or (N, H, W, 3).")
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
            raise DataError(f"{path}: {split}_images has dtype {x.dtype}; store the pixels as uint8 (or floats in [0, 1]).")
        if np.issubdtype(x.dtype, np.floating):
            if not np.isfinite(x).all():
                raise DataError(f"{path}: {split}_images contains NaN or infinite values; clean the file.")
            check_unit_range(x, f"{path}: {split}_images")
        if not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):
            raise DataError(f"{path}: {split}_labels has dtype {y.dtype}; store class indices as integers.")
        if np.issubdtype(y.dtype, np.floating) and not (np.isfinite(y).all() and (y == np.round(y)).all()):
            bad = y[~(np.isfinite(y) & (y == np.round(y)))].ravel()[:3]
            raise DataError(f"{path}: {split}_labels holds non-integer values (e.g. {', '.join(f'{v:g}' for v in bad)}); "
                            "labels are class indices 0 … K-1: store them as integers.")
        if y.ndim == 1:
            y = y[:, None]
        if y.ndim != 2 or y.shape[0] != x.shape[0]:
            raise DataError(f"{path}: {split}_labels has shape {npz[f'{split}_labels'].shape} but {split}_images has "
                            f"{x.shape[0]} images; expected ({x.shape[0]}, 1) or ({x.shape[0]}, num_labels).")
        if len(x) == 0:
            raise DataError(f"{path}: the {split} split has no images.")
        for img in x:
            write(row, resize_image(to_rgb_uint8(img, where=f"{path}:{split}"), img_size, resize))
            row += 1
        labels.append(y)
        splits += [split] * len(x)
    y = np.concatenate(labels)
    if len({lab.shape[1] for lab in labels}) != 1:
        raise DataError(f"{path}: the splits' label arrays have different widths; every split needs the same labels.")
    name = path.stem.split("_")[0]
    info = _medmnist_info(name)
    if y.shape[1] > 1:
        if set(np.unique(y)) - {0, 1}:
            raise DataError(f"{path}: multi-label labels must be 0/1; found values {sorted(np.unique(y))[:5]}.")
        task, label_t = "multilabel", torch.from_numpy(y.astype(np.float32))
        names = [info[str(i)] for i in range(y.shape[1])] if info else [str(i) for i in range(y.shape[1])]
    else:
        y = y[:, 0].astype(np.int64)
        k = int(y.max()) + 1
        if y.min() < 0:
            raise DataError(f"{path}: negative class labels; labels must be 0 … K-1.")
        present = np.unique(y)
        if len(present) < 2:
            raise DataError(f"{path}: every image has label {int(present[0])}: one class; a classifier needs at least "
                            "two.")
        if len(present) < k:
            missing = sorted(set(range(k)) - set(present.tolist()))
            raise DataError(f"{path}: labels run to {k - 1} but class(es) {_cut_list(missing)} have no image; labels "
                            f"must be 0 … K-1 with every class present: renumber them.")
        names = [info.get(str(i), str(i)) for i in range(k)] if info else [str(i) for i in range(k)]
        task, label_t = ("binary" if k == 2 else "multiclass"), torch.from_numpy(y)
    return label_t, np.array(splits), names, task


def _cut_list(values: list, limit: int = 10) -> str:
    """``1, 2, 3, … (+N more)``: a list cut for a one-line message."""
    head = ", ".join(map(str, values[:limit]))
    return head + (f", … (+{len(values) - limit} more)" if len(values) > limit else "")


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX
        return 1 << 40


def _check_npz_headers(npz, path: Path, keys: list[str]) -> dict[str, tuple[int, ...]]:
    """Read each array's .npy header (not its data): object arrays and arrays larger than this machine's
    memory are refused before anything is loaded. Returns each array's shape."""
    import math
    import zipfile

    total, shapes = 0, {}
    for key in keys:
        try:
            with npz.zip.open(f"{key}.npy") as fh:
                version = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(fh)
        except (KeyError, ValueError, OSError, zipfile.BadZipFile) as exc:
            raise DataError(f"{path}: array {key} has an unreadable header ({type(exc).__name__}); re-save the file "
                            "with numpy.savez.") from None
        if dtype.hasobject:
            raise DataError(f"{path}: array {key} holds Python objects (dtype {dtype}), which medtune never "
                            "unpickles; save numeric arrays (uint8 images, integer labels).")
        total += math.prod(shape) * dtype.itemsize
        shapes[key] = tuple(shape)
    memory = _memory_bytes()
    if total > memory:
        raise DataError(f"{path}: its arrays declare {total / 1e9:,.1f} GB, more than this machine's memory "
                        f"({memory / 1e9:,.1f} GB); use a smaller file (e.g. a lower MedMNIST size).")
    return shapes


def _medmnist_info(name: str) -> dict | None:
    try:
        from medmnist import INFO
    except ImportError:
        return None
    return INFO.get(name, {}).get("label")


def _labels_and_splits(items: list[tuple[Path, str | list[str], str | None, str | None]], *, source: str, seed: int,
                      val_fraction: float, test_fraction: float, classes: list[str] | None
                      ) -> tuple[torch.Tensor, str, list[str], np.ndarray | None, np.ndarray]:
    """(labels, task, class names, groups, splits) of (path, label, split, group) items, as :func:`load_data`
    makes them, before (and without) decoding any image."""
    multilabel = any(isinstance(lbl, list) for _, lbl, _, _ in items)
    found = sorted({c for _, lbl, _, _ in items for c in (lbl if isinstance(lbl, list) else [lbl])})
    if classes is not None:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(f"{source}: label(s) {', '.join(map(repr, unknown))} are not among the known classes "
                            f"({', '.join(classes)}); fix the labels or the class list.")
        found = list(classes)
    if len(found) < 2:
        raise DataError(f"{source}: only one class ({found[0] if found else 'none'}); a classifier needs at least two.")
    index = {c: i for i, c in enumerate(found)}
    if multilabel:
        y = np.zeros((len(items), len(found)), dtype=np.float32)
        for i, (_, lbl, _, _) in enumerate(items):
            for c in (lbl if isinstance(lbl, list) else [lbl]):
                y[i, index[c]] = 1
        labels, task = torch.from_numpy(y), "multilabel"
    else:
        labels = torch.tensor([index[lbl] for _, lbl, _, _ in items], dtype=torch.long)
        task = "binary" if len(found) == 2 else "multiclass"
    groups = [g for _, _, _, g in items]
    groups_arr = np.array(groups, dtype=str) if all(g is not None for g in groups) else None
    given = [s for _, _, s, _ in items]
    if all(s is not None for s in given):
        splits = np.array(given, dtype=str)
    elif any(s is not None for s in given):
        raise DataError(f"{source}: some rows have a split and some do not; give a split for every row or none.")
    else:
        try:
            splits = make_splits(labels.numpy(), groups=groups_arr, seed=seed, val_fraction=val_fraction,
                                 test_fraction=test_fraction, class_names=found)
        except DataError as exc:
            raise DataError(f"{source}: {exc}") from None
    return labels, task, found, groups_arr, splits


def _from_items(items: list[tuple[Path, str | list[str], str | None, str | None]], *, name: str, source: str,
                img_size: int, resize: str, seed: int, val_fraction: float, test_fraction: float,
                classes: list[str] | None, dicom_window: str = "auto", data_cache: str = "memory",
                cache_dir: str | Path | None = None, workers: int = 0) -> ImageSet:
    labels, task, found, groups_arr, splits = _labels_and_splits(items, source=source, seed=seed,
                                                                val_fraction=val_fraction, test_fraction=test_fraction,
                                                                classes=classes)
    paths = [p for p, _, _, _ in items]
    meta = {"source": source, "img_size": img_size, "resize": resize}
    fingerprint = None
    sizes, buckets = None, None
    # the labels and splits are known before any decoding: they key the decode cache with the files
    if resize != "bucket" and use_disk(data_cache, len(items) * 3 * img_size * img_size, cache_dir):
        key = source_key(paths, labels=labels.tolist(), splits=splits.tolist(), classes=found, task=task,
                         groups=None if groups_arr is None else groups_arr.tolist(), img_size=img_size,
                         resize=resize, dicom_window=dicom_window)
        images, fingerprint = load_or_decode(
            Path(cache_dir) / "data-cache", key, paths, img_size=img_size, resize=resize, dicom_window=dicom_window,
            workers=resolve_workers(workers),
            fingerprint=lambda imgs: fingerprint_of(imgs.chunks(), labels, splits, found, task))
        meta["data_cache"] = str(images.path.parent)
    elif resize == "bucket":  # a few sides from the data's own sizes; each image at the nearest one
        rgbs = [decode_image(path, dicom_window)[0] for path in paths]
        buckets = choose_buckets([np.sqrt(r.shape[0] * r.shape[1]) for r in rgbs], img_size)
        sizes = np.array([nearest_bucket(np.sqrt(r.shape[0] * r.shape[1]), buckets) for r in rgbs], dtype=np.int64)
        canvas = max(buckets)
        images = torch.stack([torch.nn.functional.pad(resize_image(rgb, int(side), "resize"),
                                                      (0, canvas - int(side), 0, canvas - int(side)))
                              for rgb, side in zip(rgbs, sizes, strict=True)])
        meta["buckets"] = list(buckets)
    else:
        images = torch.empty((len(paths), 3, img_size, img_size), dtype=torch.uint8)
        with progress_bar(len(paths), "decode", unit="img") as bar:
            for i, path in enumerate(paths):  # straight into the array: no list of every image
                images[i] = resize_image(decode_image(path, dicom_window)[0], img_size, resize)
                bar.update()
    data = ImageSet(images=images, labels=labels, splits=splits, class_names=found, task=task,
                    ids=[str(p) for p in paths], groups=groups_arr, name=name, meta=meta, sizes=sizes)
    data._fingerprint = fingerprint
    return data


def _validate(data: ImageSet, source: str) -> ImageSet:
    _check_splits(data.labels, data.splits, data.class_names, data.task, data.groups, source)
    return data


def _check_splits(labels: torch.Tensor, splits: np.ndarray, class_names: list[str], task: str,
                  groups: np.ndarray | None, source: str) -> None:
    """Raise a DataError when a split is empty, a class has no training image, val or test holds one
    class only, or a group spans two splits (the labels and splits only: no image is read)."""
    for split in SPLITS:
        if not (splits == split).any():
            raise DataError(f"{source}: the {split} split has no images; give more images or other split fractions.")
    if task != "multilabel":
        train_classes = set(labels[torch.from_numpy(splits == "train")].tolist())
        absent = [class_names[c] for c in range(len(class_names)) if c not in train_classes]
        if absent:
            raise DataError(f"{source}: class(es) {_cut_list(absent)} have no training images (only in val/test); "
                            "move some of their images to the training split.")
        for split in ("val", "test"):  # one class only: AUC is undefined and the run would be stored as NaN
            present = set(labels[torch.from_numpy(splits == split)].tolist())
            if len(present) < 2:
                raise DataError(f"{source}: the {split} split holds one class only "
                                f"({class_names[next(iter(present))]}); it needs at least two to measure AUC: "
                                "add images of the other classes to it.")
    if groups is not None:
        for g in np.unique(groups):
            if len(set(splits[groups == g])) > 1:
                raise DataError(f"{source}: group {g!r} has images in several splits; one patient must stay in one "
                                "split.")


def _items_of(path: Path, uncertain_labels: str, classes: list[str] | None
              ) -> tuple[list[tuple[Path, str | list[str], str | None, str | None]], list[str] | None]:
    """The (path, label, split, group) items of a folder or CSV source, and its known classes:
    ``classes``, or for a CSV with one column per label its label columns."""
    if path.is_dir():
        items, skipped = list_folder(path)
        if skipped:
            warnings.warn(f"{path}: skipped {len(skipped)} non-image file(s), e.g. {skipped[0]}.\n"
                          "HINT: keep only images in class folders.", stacklevel=3)
        return [(p, c, s, None) for p, c, s in items], classes
    rows = read_csv(path, uncertain_labels)
    if "label_columns" in rows[0] and classes is None:  # every column is a label, present in any row or not
        classes = list(rows[0]["label_columns"])
    return [(r["path"], csv_label(r), r["split"], r["group"]) for r in rows], classes


def load_data(source: str, *, img_size: int = 64, resize: str = "resize", seed: int = 0, val_fraction: float = 0.15,
              test_fraction: float = 0.15, medmnist_size: int = 28, classes: list[str] | None = None,
              dicom_window: str = "auto", uncertain_labels: str = "error", data_cache: str = "auto",
              cache_dir: str | Path | None = None, decode_workers: int = 0,
              medmnist_root: str | Path | None = None) -> ImageSet:
    """Load any supported source into an :class:`ImageSet` at ``img_size``.

    Args:
        source: a folder per class (optionally inside train/ val/ test/; valid/ or validation/ is
            val/), a CSV ``path,label[,split][,group]`` (multi-label: ``a|b``) or with one 0/1 column
            per label (:func:`read_csv`), a MedMNIST ``.npz``,
            ``medmnist:NAME``, a ``.dcm`` tree (as a folder), ``demo``, ``synthetic[:K]``, or
            ``synthetic_loc`` (objects at known places, :func:`~medtune.data.synthetic.make_synthetic_localisation`).
        img_size: output side in pixels.
        resize: ``resize`` (stretch) or ``pad`` (keep aspect, zero-pad).
        seed: seed of the split when the source gives none.
        val_fraction, test_fraction: split shares when the source gives none.
        medmnist_size: 28, 64, 128 or 224 for ``medmnist:NAME``.
        medmnist_root: the folder of ``medmnist:NAME`` files (None: :func:`medmnist_root`'s default).
        classes: the known class names; any other label is an error.
        dicom_window: how a ``.dcm`` without a window is scaled (``auto``, ``percentile``, ``bits``;
            :func:`~medtune.data._decode.dicom_to_unit`).
        uncertain_labels: what ``-1`` and blank cells of a one-column-per-label CSV mean
            (``error``, ``zeros``, ``ones``; :func:`read_csv`).
        data_cache: where a folder, CSV or .npz source is decoded to: ``memory`` (one tensor), ``disk``
            (the decode cache under ``cache_dir/data-cache``, :mod:`medtune.data.diskcache`), or
            ``auto``: disk when the decoded size exceeds
            :data:`~medtune.data.diskcache.DISK_THRESHOLD_BYTES` (1 GiB) and ``cache_dir`` is given.
        cache_dir: the folder holding ``data-cache/`` (runs pass their results store).
        decode_workers: processes decoding into the disk cache (0: min(4, CPUs)).

    Raises:
        DataError: any problem with the files (named in the message).
        ConfigError: an unknown MedMNIST name.
    """
    from medtune.data.demo import make_demo
    from medtune.data.synthetic import make_synthetic

    if data_cache not in DATA_CACHES:
        raise ConfigError(f"data_cache {short_repr(data_cache)} is not one of {', '.join(DATA_CACHES)}.")

    if source == "demo":
        return make_demo(img_size=img_size, seed=seed, resize=resize)
    if source == "synthetic_loc":  # a known object location per image (medtune explain's scores)
        from medtune.data.synthetic import make_synthetic_localisation

        return make_synthetic_localisation(num_samples=128, img_size=img_size, seed=seed)
    if source == "synthetic" or source.startswith("synthetic:"):
        k_text = source.split(":", 1)[1] if ":" in source else "2"
        if not k_text.isdigit() or not 2 <= int(k_text) <= 100:
            raise ConfigError(f"Data {short_repr(source)}: synthetic:K takes a number of classes K from 2 to 100, "
                              "e.g. synthetic:3.")
        k = int(k_text)
        return make_synthetic(num_samples=64 * max(1, k // 2), img_size=img_size, num_classes=k, seed=seed)
    if source.startswith("medmnist:"):
        path = _medmnist_download(source.split(":", 1)[1], medmnist_size, medmnist_root)
        return _validate(_load_npz(path, img_size, resize, data_cache, cache_dir), str(path))
    path = Path(source).expanduser()
    try:
        exists = path.exists()
    except OSError as exc:  # e.g. ENAMETOOLONG
        raise DataError(f"Data {short_repr(source)} cannot be read ({exc.strerror or exc}).") from None
    if not exists:
        raise DataError(f"Data {short_repr(source)} not found; give a folder per class, a CSV, a MedMNIST .npz, "
                        "medmnist:NAME, demo or synthetic.")
    if path.is_dir() or path.suffix.lower() == ".csv":
        items, classes = _items_of(path, uncertain_labels, classes)
        data = _from_items(items, name=path.name if path.is_dir() else path.stem, source=str(path), img_size=img_size,
                           resize=resize, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                           classes=classes, dicom_window=dicom_window, data_cache=data_cache, cache_dir=cache_dir,
                           workers=decode_workers)
    elif path.suffix.lower() == ".npz":
        data = _load_npz(path, img_size, resize, data_cache, cache_dir)
    else:
        raise DataError(f"{path}: unsupported data file; give a folder per class, a .csv or a MedMNIST .npz.")
    return _validate(data, str(path))
