"""Localisation: class-activation heat maps of a stored run, and how well they point at the finding.

``explain(RUN)`` computes a heat map per test image through Captum's layer attributions
(``gradcam``: :class:`captum.attr.LayerGradCam`, Selvaraju et al. 2017; ``grad_x_activation``:
:class:`captum.attr.LayerGradientXActivation` summed over channels) at the output of the model's
last feature block (the block partition's last entry before the head: ResNet ``layer4``, VGG /
AlexNet the last conv block), upsampled bilinearly to the input size and scaled to [0, 1] per
image. Captum is an optional extra (``pip install medtune[explain]``): it is light (PyTorch,
NumPy, Matplotlib), where pytorch-grad-cam pulls OpenCV.

Where the data gives localisation ground truth, two scores with 95% intervals:

* **pointing game** (Zhang et al. 2018): the share of images whose map maximum lies inside the
  true box (or mask); a map that is zero everywhere misses. Chance level, the expected hit rate of a
  uniformly random point, is the mean share of the image the box covers. Wilson interval.
* **box IoU**: the box around the pixels at or above ``threshold`` × the map's maximum against the
  true box; mean with a percentile bootstrap interval.

Ground truth comes from the data source: ``synthetic_loc`` (objects at known places) or a CSV with
a ``bbox`` column ``x0 y0 x1 y1`` (pixels of the original image, separated by spaces or ``;``) or a
``mask`` column (a mask image path; nonzero = finding).

Outputs, in ``STORE/artifacts/RUN/explain/`` (or ``out_dir``): ``maps.npz`` (the raw maps and
ids, labels, predictions, boxes), ``overlays/*.png`` (heat map over the image), ``gallery.png``
(per class, correct and incorrect test images) and ``explain.json`` (the scores), which the report
shows in its Localisation section.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from medtune._safepaths import atomic_write, check_output

from medtune._checks import check_choice
from medtune.errors import ConfigError, DataError, short_repr
from medtune.progress import progress_bar

if TYPE_CHECKING:
    from medtune.data.diskcache import DiskImages

__all__ = ["EXPLAIN_METHODS", "Explanation", "compute_maps", "explain", "list_explanations", "localisation_scores",
           "plot_gallery", "target_layer"]

EXPLAIN_METHODS = ("gradcam", "grad_x_activation")
_TARGETS = ("label", "predicted")
_SPLITS = ("test", "val", "train", "all")


def _captum():
    try:
        import captum.attr as attr
    except ImportError as err:
        raise ConfigError("medtune explain needs Captum, which is not installed. Run: pip install captum "
                          "(or pip install medtune[explain]).") from err
    return attr


@dataclass
class Explanation:
    """Heat maps of one run's images and, with ground truth, their localisation scores.

    Attributes:
        run_id: the run explained.
        method: ``gradcam`` or ``grad_x_activation``.
        layer: the target module's path in the backbone.
        ids: sample ids, in order.
        labels: int array (N,) of true classes; predicted: (N,) predicted classes.
        maps: float32 (N, H, W) in [0, 1], at the model input size.
        boxes: float (N, 4) true boxes ``x0, y0, x1, y1`` (NaN where none), or None.
        scores: pointing game, box IoU and their intervals (empty without ground truth).
        out_dir: where the files were written.
    """

    run_id: str
    method: str
    layer: str
    ids: list[str]
    labels: np.ndarray
    predicted: np.ndarray
    maps: np.ndarray
    boxes: np.ndarray | None
    scores: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None


def target_layer(model: nn.Module, granularity_blocks=None) -> tuple[str, nn.Module]:
    """(path, module) of the last feature block's output: the deepest module holding all of the block
    partition's last non-head block (ResNet ``layer4``, AlexNet/VGG ``features``, whose output is the
    last conv block's), or the module of its last parameter where no single module holds it all.

    Args:
        model: a ``NormalizedModel``.
        granularity_blocks: the block partition (default: computed).
    """
    from medtune.models import get_blocks

    blocks = granularity_blocks if granularity_blocks is not None else get_blocks(model)
    block = blocks[blocks.head_idx - 1]
    paths = [name.rpartition(".")[0].split(".") for name in block.param_names]
    common: list[str] = []
    for parts in zip(*paths):  # noqa: B905  (stops at the shortest path on purpose)
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    path = ".".join(common) or block.param_names[-1].rpartition(".")[0]
    return path, blocks.model.get_submodule(path)


def compute_maps(model: nn.Module, images: torch.Tensor, targets: np.ndarray, *, method: str = "gradcam",
                 layer: nn.Module | None = None, batch_size: int = 64) -> np.ndarray:
    """Heat maps (N, H, W) in [0, 1] of ``images`` for classes ``targets``.

    Args:
        model: a ``NormalizedModel`` in eval mode (it takes [0, 1] pixels).
        images: uint8 (N, 3, H, W) or float in [0, 1].
        targets: int (N,) class index per image.
        method: one of ``EXPLAIN_METHODS``.
        layer: the target module (default :func:`target_layer`).
        batch_size: images per forward/backward pass.
    """
    check_choice(method, "method", EXPLAIN_METHODS, owner="explain")
    attr = _captum()
    layer = layer if layer is not None else target_layer(model)[1]
    explainer = (attr.LayerGradCam if method == "gradcam" else attr.LayerGradientXActivation)(model, layer)
    device = next(model.parameters()).device
    # one float32 output filled in place (as robustness.predict): a list of batches concatenated and cast
    # held the maps three times over at the peak (N x 224 x 224 float32 is 0.2 MB an image)
    out = np.zeros((len(images), *images.shape[-2:]), np.float32)
    bar = progress_bar(len(images), f"explain {method}", unit="img")
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        t = torch.as_tensor(np.asarray(targets[start:start + batch_size]), device=device).long()
        if method == "gradcam":
            a = explainer.attribute(x, target=t, relu_attributions=True)
        else:
            a = explainer.attribute(x, target=t).sum(dim=1, keepdim=True).clamp(min=0)
        a = attr.LayerAttribution.interpolate(a.detach(), tuple(x.shape[-2:]), interpolate_mode="bilinear")
        a = a[:, 0].clamp(min=0)
        peak = a.flatten(1).amax(1).view(-1, 1, 1)
        out[start:start + len(x)] = torch.where(peak > 0, a / peak.clamp(min=1e-12), torch.zeros_like(a)).cpu().numpy()
        bar.update(len(x))
    bar.close()
    return out


def _map_box(m: np.ndarray, threshold: float) -> tuple[float, float, float, float] | None:
    rows, cols = np.nonzero(m >= threshold * m.max()) if m.max() > 0 else ((), ())
    if not len(rows):
        return None
    return float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)


def _iou(a, b) -> float:
    if a is None:
        return 0.0
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def localisation_scores(maps: np.ndarray, boxes: np.ndarray, *, masks: np.ndarray | None = None,
                        threshold: float = 0.5, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Pointing game and box IoU of heat maps against true boxes (images without a box are skipped).

    Args:
        maps: float (N, H, W), larger = more evidence.
        boxes: float (N, 4) ``x0, y0, x1, y1`` in pixels of the maps (x1, y1 exclusive); NaN rows: no box.
        masks: optional bool (N, H, W); a point hits where the mask is set (instead of the box).
        threshold: share of the map's maximum that defines the map's box, in (0, 1].
        confidence: level of the intervals.
        seed: seed of the bootstrap.

    Returns:
        ``num_images``, ``pointing_game`` with ``pointing_game_ci`` (Wilson), ``pointing_chance``
        (mean box area share), ``iou`` (mean) with ``iou_ci`` (percentile bootstrap), and
        ``iou_at_0_5`` (share with IoU >= 0.5).
    """
    from scipy import stats

    if not 0 < threshold <= 1:
        raise ConfigError(f"threshold must be in (0, 1]; got {threshold!r}.")
    keep = ~np.isnan(boxes).any(axis=1)
    if not keep.any():
        return {}
    h, w = maps.shape[-2:]
    hits, ious, areas = [], [], []
    for i in np.flatnonzero(keep):
        m, box = maps[i], boxes[i]
        if m.max() <= 0:
            hit = False
        else:
            y, x = np.unravel_index(int(np.argmax(m)), m.shape)
            hit = bool(masks[i][y, x]) if masks is not None else bool(box[0] <= x < box[2] and box[1] <= y < box[3])
        hits.append(hit)
        ious.append(_iou(_map_box(m, threshold), box))
        areas.append(float(masks[i].mean()) if masks is not None else (box[2] - box[0]) * (box[3] - box[1]) / (h * w))
    n, k = len(hits), int(sum(hits))
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    ious_arr = np.asarray(ious)
    if n > 1 and np.ptp(ious_arr) > 0:
        boot = stats.bootstrap((ious_arr,), np.mean, confidence_level=confidence, method="percentile",
                               n_resamples=2000, random_state=np.random.default_rng(seed))
        iou_ci = [float(boot.confidence_interval.low), float(boot.confidence_interval.high)]
    else:
        iou_ci = [float(ious_arr.mean())] * 2
    return {"num_images": n, "pointing_game": k / n, "pointing_game_ci": [float(ci.low), float(ci.high)],
            "pointing_chance": float(np.mean(areas)), "iou": float(ious_arr.mean()), "iou_ci": iou_ci,
            "iou_at_0_5": float((ious_arr >= 0.5).mean()), "threshold": threshold}


def _overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """uint8 (H, W, 3) of an image (3, H, W) uint8 under a jet-coloured map (H, W) in [0, 1]."""
    from matplotlib import colormaps

    rgb = image.transpose(1, 2, 0).astype(np.float32) / 255.0
    colour = colormaps["jet"](heat)[..., :3]
    return (255 * np.clip((1 - alpha) * rgb + alpha * colour, 0, 1)).astype(np.uint8)


def plot_gallery(images: np.ndarray | torch.Tensor | DiskImages, maps: np.ndarray, labels: np.ndarray, predicted: np.ndarray,
                 class_names: list[str], *, per_row: int = 4, boxes: np.ndarray | None = None):
    """A matplotlib figure: per class a row of correctly and a row of incorrectly classified images
    (the first ``per_row`` of each, in order) with their heat maps; true boxes drawn where known.
    ``images`` (N, 3, H, W) uint8: an array, a tensor or a ``DiskImages`` (only the shown ones are read)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rows = [(c, ok) for c in range(len(class_names)) for ok in (True, False)]
    fig, axes = plt.subplots(len(rows), per_row, figsize=(1.6 * per_row, 1.7 * len(rows)), squeeze=False)
    for r, (c, ok) in enumerate(rows):
        idx = np.flatnonzero((labels == c) & ((predicted == labels) == ok))[:per_row]
        for j in range(per_row):
            ax = axes[r][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(f"{class_names[c]}\n{'correct' if ok else 'wrong'}", fontsize=7)
            if j >= len(idx):
                ax.set_frame_on(False)
                continue
            i = idx[j]
            ax.imshow(_overlay(np.asarray(images[i]), maps[i]))
            if boxes is not None and not np.isnan(boxes[i]).any():
                x0, y0, x1, y1 = boxes[i]
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color="white", lw=1))
            ax.set_title(f"pred {class_names[predicted[i]]}", fontsize=6)
    fig.tight_layout()
    return fig


def _csv_ground_truth(source: str, data, img_size: int, resize: str,
                      uncertain_labels: str = "error") -> tuple[np.ndarray | None, np.ndarray | None]:
    """Boxes (N, 4) and masks (N, H, W) from a CSV's ``bbox`` / ``mask`` columns, at the input size.

    The CSV is read by training's own parser (:func:`medtune.data.sources.read_csv`: a byte-order mark,
    short rows, quoting), and every box is checked in the image's own pixels: four finite numbers with
    ``0 <= x0 < x1 <= width`` and ``0 <= y0 < y1 <= height``; a bad one is a DataError naming its line.
    """
    from PIL import Image

    from medtune.data._decode import decode_image, resize_image
    from medtune.data.sources import read_csv

    path = Path(source)
    if path.suffix.lower() != ".csv" or not path.is_file():
        return None, None
    rows = read_csv(path, uncertain_labels)
    if not any(r.get("bbox") or r.get("mask") for r in rows):
        return None, None
    root = path.parent.resolve()
    by_path = {str(r["path"]): r for r in rows}
    boxes = np.full((len(data.ids), 4), np.nan)
    masks = np.zeros((len(data.ids), img_size, img_size), bool) if any(r.get("mask") for r in rows) else None
    bad: list[str] = []
    for i, sample_id in enumerate(data.ids):
        row = by_path.get(str(Path(sample_id).resolve()))
        if row is None:
            continue
        where = f"{path}, line {row['line']}"
        if row.get("mask"):
            mask_path = (root / row["mask"]).resolve()
            if not mask_path.is_relative_to(root) or not mask_path.is_file():
                raise DataError(f"{where}: mask {row['mask']!r} of {row['path'].name!r} not found under {root}.")
            rgb, _, _ = decode_image(mask_path)
            m = resize_image((rgb > 0).astype(np.uint8) * 255, img_size, resize)[0].numpy() > 127
            masks[i] = m
            ys, xs = np.nonzero(m)
            if len(ys):
                boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        elif row.get("bbox"):
            with Image.open(Path(sample_id)) as im:
                width, height = im.size
            try:
                x0, y0, x1, y1 = (float(v) for v in row["bbox"].replace(";", " ").replace(",", " ").split())
            except ValueError:
                bad.append(f"{where}: bbox {short_repr(row['bbox'])} is not four numbers 'x0 y0 x1 y1'")
                continue
            if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or not (
                    0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
                bad.append(f"{where}: bbox {short_repr(row['bbox'])} is not a box inside the {width}x{height} px "
                           "image (finite, 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height)")
                continue
            if resize == "pad":
                scale = img_size / max(width, height)
                ox, oy = (img_size - round(width * scale)) // 2, (img_size - round(height * scale)) // 2
                boxes[i] = (x0 * scale + ox, y0 * scale + oy, x1 * scale + ox, y1 * scale + oy)
            else:
                sx, sy = img_size / width, img_size / height
                boxes[i] = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
    if bad:
        more = f" ({len(bad) - 1} more bad row(s) after it)" if len(bad) > 1 else ""
        raise DataError(f"{bad[0]}{more}; fix the box in pixels of the original image or leave the cell empty.")
    if masks is not None and not masks.any():
        masks = None
    return (boxes if not np.isnan(boxes).all() else None), masks


def _ground_truth(data, source: str, img_size: int, resize: str, uncertain_labels: str = "error"):
    if "boxes" in data.meta:
        boxes = np.array([data.meta["boxes"].get(i, (np.nan,) * 4) for i in data.ids], dtype=float)
        return boxes, None
    return _csv_ground_truth(source, data, img_size, resize, uncertain_labels)


def explain(run: str, *, data: str | None = None, store: str | Path = "./medtune-results", method: str = "gradcam",
            target: str = "label", split: str = "test", threshold: float = 0.5, max_overlays: int = 32,
            out_dir: str | Path | None = None, device: str = "auto",
            log: Callable[[str], None] | None = None) -> Explanation:
    """Heat maps of a stored run's images, their files, and localisation scores where the data has ground truth.

    Args:
        run: a run id (a unique prefix is enough).
        data: another data source to explain (default: the run's own data), read at the run's
            ``img_size`` and ``resize``.
        store: the results store.
        method: ``gradcam`` or ``grad_x_activation``.
        target: the class each map explains: ``label`` (the true class, as the pointing game
            asks) or ``predicted``.
        split: ``test`` (default), ``val``, ``train`` or ``all`` images.
        threshold: share of a map's maximum that defines its box for the IoU, in (0, 1].
        max_overlays: overlay PNGs written (the first images in order); the maps of all are kept.
        out_dir: where to write (default ``STORE/artifacts/RUN/explain``).
        device: ``auto``, ``cpu`` or ``cuda``.
        log: receives one-line progress messages.

    Returns:
        The :class:`Explanation` (also written as files).

    Raises:
        ConfigError: unknown method, target or split, a run id that matches no run or several, a
            run without stored weights, a multi-label or ``resize: bucket`` run, or Captum not installed.
        DataError: unreadable data or ground truth.
    """
    from medtune._tensors import resolve_device
    from medtune.config import RunConfig
    from medtune.models import get_blocks
    from medtune.robustness.driver import load_run_model, resolve_runs
    from medtune.runner import prepare_data
    from medtune.store import ResultsStore

    check_choice(method, "method", EXPLAIN_METHODS, owner="explain")
    check_choice(target, "target", _TARGETS, owner="explain")
    check_choice(split, "split", _SPLITS, owner="explain")
    if not 0 < threshold <= 1:
        raise ConfigError(f"threshold must be in (0, 1]; got {threshold!r}.")
    _captum()
    log = log or (lambda _m: None)
    db = store if isinstance(store, ResultsStore) else ResultsStore(store)
    record = resolve_runs(db, [run])[0]
    if out_dir is not None:  # before any work: never a store's database or managed folder, nor a file
        check_output(out_dir, flag="-o", folder=True, allow=db.run_dir(record["run_id"]))
    cfg = RunConfig.from_dict(record["config"])
    if data is not None:
        cfg = cfg.replace(data=data)
    dataset = prepare_data(cfg)
    if dataset.task == "multilabel":
        raise ConfigError("medtune explain supports binary and multiclass runs; this run is multi-label.")
    if dataset.sizes is not None:
        raise ConfigError("medtune explain does not support runs with resize: bucket yet (images of several "
                          "sizes); explain a run trained with resize or pad.")
    device_ = resolve_device(device)
    model = load_run_model(db, record, device_)
    if data is not None:  # the maps explain the run's classes: another class set would mislabel every map
        from medtune.inference import _class_names

        trained = _class_names(record)
        if list(dataset.class_names) != list(trained):
            raise ConfigError(f"--data {short_repr(str(data))} has the classes {', '.join(map(str, dataset.class_names))}; "
                              f"run {record['run_id']} was trained on {', '.join(map(str, trained))}: give data "
                              "with the run's classes (same names, same order).")
    subset = dataset if split == "all" else dataset.split(split)
    boxes, masks = _ground_truth(subset, cfg.data, cfg.img_size, cfg.resize, cfg.uncertain_labels)
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model(subset.images[s:s + 256].to(device_).float() / 255.0), dim=1).cpu()
                           for s in range(0, len(subset), 256)]).numpy()
    labels = subset.labels.numpy().astype(int)
    predicted = probs.argmax(1)
    layer_path, layer = target_layer(model, get_blocks(model))
    log(f"explain {record['run_id']}: {method} at {layer_path} on {len(subset)} {split} images")
    maps = compute_maps(model, subset.images, labels if target == "label" else predicted, method=method, layer=layer)
    scores = localisation_scores(maps, boxes, masks=masks, threshold=threshold) if boxes is not None else {}
    if out_dir is None:
        out, root = db.run_dir(record["run_id"], "explain/overlays").parent, db.root
    else:
        out, root = Path(out_dir), None
        (out / "overlays").mkdir(parents=True, exist_ok=True)
    write = functools.partial(atomic_write, root=root)  # temp file + rename: a link in the store is never followed
    write(out / "maps.npz", lambda p: np.savez_compressed(
        open(p, "wb"), maps=maps.astype(np.float16), ids=np.array(subset.ids, dtype=str), labels=labels,
        predicted=predicted, probs=probs.astype(np.float32),
        boxes=boxes if boxes is not None else np.full((len(subset), 4), np.nan)))
    from PIL import Image

    for i in range(min(max_overlays, len(subset))):  # one image at a time: the split may be in the decode cache
        overlay = Image.fromarray(_overlay(np.asarray(subset.images[i]), maps[i]))
        write(out / "overlays" / f"{i:04d}.png", lambda p: overlay.save(p, format="png"))
    fig = plot_gallery(subset.images, maps, labels, predicted, list(subset.class_names), boxes=boxes)
    write(out / "gallery.png", lambda p: fig.savefig(p, dpi=100, format="png", metadata={"Software": None}))
    import matplotlib.pyplot as plt

    plt.close(fig)
    summary = {"run_id": record["run_id"], "label": record.get("label"), "arch": record.get("arch"),
               "strategy": record.get("strategy"), "dataset": dataset.name, "method": method, "target": target,
               "split": split, "layer": layer_path, "num_images": len(subset),
               "accuracy": float((predicted == labels).mean()) if len(labels) else float("nan"),
               "scores": scores, "gallery_png": "gallery.png", "maps_npz": "maps.npz"}
    write(out / "explain.json", json.dumps(summary, indent=2))
    if scores:
        log(f"pointing game {scores['pointing_game']:.3f} [{scores['pointing_game_ci'][0]:.3f}, "
            f"{scores['pointing_game_ci'][1]:.3f}] (chance {scores['pointing_chance']:.3f}); box IoU "
            f"{scores['iou']:.3f} [{scores['iou_ci'][0]:.3f}, {scores['iou_ci'][1]:.3f}]")
    return Explanation(run_id=record["run_id"], method=method, layer=layer_path, ids=list(subset.ids), labels=labels,
                       predicted=predicted, maps=maps, boxes=boxes, scores=scores, out_dir=out)


def list_explanations(store: str | Path) -> list[dict[str, Any]]:
    """The ``explain.json`` summaries written under ``STORE/artifacts/*/explain/`` (with ``dir``)."""
    from medtune.store import ResultsStore

    return ResultsStore(store, create=False).explanations()
