"""Run and sweep configuration: frozen dataclasses that round-trip YAML and validate on build.

Every field is also a CLI flag (``img_size`` ↔ ``--img-size``) and a Python API argument of the
same name, so a YAML file, a command line and a ``medtune.run(...)`` call say the same thing.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from medtune._checks import Range, check_choice, check_fields, check_scalar
from medtune.data._decode import DICOM_WINDOWS, RESIZE_POLICIES
from medtune.data.diskcache import DATA_CACHES
from medtune.data.sources import UNCERTAIN_LABELS
from medtune.errors import ConfigError, did_you_mean, short_repr
from medtune.strategies.spec import StrategySpec, format_strategy_spec, parse_strategy_spec, split_strategy_list
from medtune.tracking import TRACKERS
from medtune.training.imbalance import CLASS_WEIGHTS, SAMPLERS
from medtune.training.schedules import SCHEDULES
from medtune.training.metrics import MONITOR_METRICS

__all__ = [
    "RunConfig",
    "SweepConfig",
    "load_config",
    "load_yaml",
    "save_yaml",
]

# Upper bounds of numeric fields: far above any sensible value, below what crashes (torch.set_num_threads(100000)
# segfaults; scikit-learn's random_state takes seeds < 2**32; a learning rate above 10 only diverges).
MAX_LR = 10.0
MAX_EPOCHS = 100_000
MAX_SEED = 2**32 - 1
MAX_THREADS = 1024
MAX_BATCH = 1 << 20
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000

# Fields that do not change what a run computes; they are left out of the run id.
NON_SEMANTIC_FIELDS = frozenset({"store", "device", "num_threads", "progress", "num_workers", "executor", "address",
                                 "feature_cache", "feature_cache_memory_gb", "feature_cache_disk_gb",
                                 "tracker", "data_cache", "decode_workers", "medmnist_root"})

# Fields added after the first stores were written: at these values they leave the run id as it was,
# so an existing store keeps its runs.
ID_NEUTRAL_DEFAULTS: dict[str, Any] = {"cv_folds": 0, "fold": 0, "class_weight": "none", "sampler": "none",
                                       "target_sensitivity": 0.9, "dicom_window": "auto",
                                       "uncertain_labels": "error", "train_per_class": 0,
                                       "schedule": "cosine", "medmnist_root": ""}


@dataclass(frozen=True)
class _Base:
    """to_dict / from_dict / YAML round-trip shared by the config classes."""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = [str(v) if isinstance(v, StrategySpec) else v for v in value]
            elif isinstance(value, StrategySpec):
                value = str(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config"):
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping of config keys, got {type(data).__name__}.")
        names = [f.name for f in fields(cls)]
        clean = {}
        for key, value in data.items():
            norm = str(key).replace("-", "_")
            if norm not in names:
                raise ConfigError(
                    f"{source}: unknown config key {short_repr(key)}.{did_you_mean(norm, names)} Valid keys: {', '.join(names)}."
                )
            clean[norm] = value
        return cls(**clean)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _as_tuple(value: Any, convert=lambda v: v) -> tuple:
    if isinstance(value, str):
        value = [v for v in (p.strip() for p in value.split(",")) if v]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    return tuple(convert(v) for v in value)


def _check_augment(value: Any, owner: str) -> tuple[str, ...]:
    """The augmentation names as a tuple in application order; ``none`` / empty is ``()``."""
    from medtune.data.augment import AUGMENTATIONS, canonical_augmentations

    if isinstance(value, str) and value.strip().lower() in ("", "none"):
        return ()
    names = _as_tuple(value, lambda v: str(v).strip())
    for name in names:
        check_choice(name, "augment", AUGMENTATIONS, owner=owner)
    return canonical_augmentations(names)


@dataclass(frozen=True)
class RunConfig(_Base):
    """Everything one training run needs. Defaults are the offline demo's.

    Attributes:
        data: a folder per class, a CSV, a MedMNIST ``.npz``, ``medmnist:NAME``, ``demo`` or ``synthetic``.
        arch: a timm model name, ``tv:NAME`` for a torchvision model (``tv:alexnet``), or ``dcnn3``.
        weights: ``imagenet`` (timm hub), ``none``, a local file, or ``efficientnet_lite0/1/2`` (offline).
        strategy: a registered strategy spec, e.g. ``full``, ``top_k:2``, ``l2_sp:alpha=0.1`` (parsed
            into a :class:`~medtune.strategies.StrategySpec` when the config is built).
        epochs: maximum number of epochs (per phase for multi-phase strategies).
        scratch_epochs: maximum number of epochs of a ``scratch`` run (Tajbakhsh et al. trained from
            scratch to convergence; early stopping by ``patience``); 0 means 4 × ``epochs``.
        img_size: model input size in pixels (square).
        batch_size: training images per optimiser step.
        lr: peak learning rate.
        optimizer: ``adamw``, ``sgd`` (with ``momentum``) or ``adam`` (torch's Adam, ``weight_decay`` as L2, as
            MedMNIST v2); some strategies choose their own, see METHODS.
        momentum: SGD momentum.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        warmup_epochs: linear warm-up length of the cosine schedule, in epochs (may be fractional).
        schedule: the learning-rate schedule: ``cosine`` (per step, down to 1% of ``lr``, after the warm-up);
            ``cosine_epoch`` (timm's ``CosineLRScheduler(t_initial=epochs)`` stepped once per epoch, down to 0,
            as MedMNIST+'s train.py steps it: epochs 0 and 1 at ``lr``); ``multistep`` (× 0.1 at 50% and 75%
            of the epochs, as MedMNIST v2's ``MultiStepLR``).
        patience: early stopping patience in epochs (0 disables early stopping).
        monitor: validation metric used for early stopping and the best checkpoint.
        bn_mode: ``eval`` (frozen BatchNorm layers use running statistics) or ``train``.
        augment: names of per-sample random transforms of the training batches, a list or a
            comma-separated string (``hflip``, ``vflip``, ``affine``, ``color``; see
            :mod:`medtune.data.augment`); ``none`` or empty for none. Any augmentation disables
            feature caching.
        feature_cache: ``auto`` computes a fixed frozen prefix once and trains the rest on its
            features, feature maps stored in float16 where they fit its range (else float32; results
            within float16's rounding of the uncached run's), pooled vectors in float32; ``fp32``
            stores all in float32 (results equal to float tolerance); ``off`` always runs the whole
            network.
        feature_cache_memory_gb: memory the feature cache may hold, GiB (0: min(2, 25% of the
            available RAM)); features beyond it go to disk.
        feature_cache_disk_gb: disk the feature cache may fill under ``STORE/feature-cache``, GiB
            (0: min(32, half the free space)). Features that fit neither: the run trains uncached.
        data_cache: where a folder, CSV or .npz source is decoded to: ``memory`` (one uint8 tensor),
            ``disk`` (decoded once into ``STORE/data-cache/KEY/images.npy``, reused by every later
            run and process, and read batch by batch with bounded RAM), or ``auto``: disk when the
            decoded size (N · 3 · img_size²) exceeds 1 GiB. Results are the same either way.
        decode_workers: processes that decode images into the disk cache (0: min(4, CPUs)).
        resize: how images reach ``img_size``: ``resize`` (stretch; bilinear, antialiased), ``pad``
            (keep the aspect ratio: the longer side scaled, zero padding centred), ``bucket`` (a few
            sizes from the data's own distribution, each image at the nearest one; Liu et al.), ``zero_pad``
            (MedMNIST+: an image no larger than ``img_size`` is not scaled but centred on an ``img_size``
            canvas of the ImageNet mean colour, i.e. zeros after normalisation, as their ``transforms.Pad``
            after ``Normalize``; a larger one is scaled down as ``pad``), or ``nearest`` (stretch by
            nearest-neighbour, as MedMNIST v2's ``Resize(224, NEAREST)``).
        split_seed: seed of the train/val/test split and of the train-fraction subsample (fixed
            across training seeds so seeds compare on the same data).
        train_fraction: share of the training split used, in (0, 1].
        train_per_class: K > 0 keeps K training images per class (k-shot; 0: all), drawn with ``split_seed``
            and nested across K (the 5-shot set is inside the 20-shot set); validation and test are untouched,
            and a class with fewer than K images keeps them all (with a warning). Applied after ``train_fraction``.
        cv_folds: K ≥ 2 for K-fold cross-validation (0: the single train/val split). The test split
            stays fixed; train+val are pooled and cut into K stratified folds (group-aware when the
            data has groups, e.g. a CSV ``group`` column of patient ids); fold ``fold`` is validation.
            A sweep runs every fold.
        fold: which fold validates, in 0 … cv_folds − 1.
        seed: training seed (head initialisation, batch order, augmentation).
        val_fraction: share of the images held out for validation when the data has no split.
        test_fraction: share of the images held out for testing when the data has no split.
        medmnist_size: image size of a ``medmnist:NAME`` file (28, 64, 128 or 224 px).
        medmnist_root: the folder of ``medmnist:NAME`` files (empty: ``$MEDMNIST_ROOT``, else the medmnist
            package's default, ``~/.medmnist``); a file there is read offline, a missing one downloaded
            through the medmnist package when the machine is online.
        dicom_window: how a DICOM reaches 0–255 after pydicom's modality LUT (Rescale Slope/Intercept):
            ``auto`` uses the file's VOI LUT or Window Center/Width, else the range of its stored bits
            (BitsStored: 12-bit data spans 0–4095); ``percentile`` the file's window, else the image's
            0.5–99.5th percentiles; ``bits`` always the stored bits' range (any window ignored).
        uncertain_labels: a CSV with one 0/1 column per label (CheXpert style): ``error`` refuses its
            uncertain (-1) and blank cells; ``zeros`` reads both as absent (U-Zeros); ``ones`` reads -1 as
            present and blank as absent (U-Ones).
        label_smoothing: label smoothing of the cross-entropy loss, in [0, 0.5].
        class_weight: ``balanced`` weighs the loss by scikit-learn's balanced class weights of the training
            split (n / (K · n_k); multi-label: BCE ``pos_weight`` = negatives / positives per label); ``none``.
        sampler: ``balanced`` draws each epoch's batches as PyTorch's WeightedRandomSampler (probability
            ∝ 1 / class count, with replacement; single-label tasks); ``none`` shuffles.
        target_sensitivity: binary tasks: the decision threshold is chosen on validation as the highest
            one reaching this sensitivity, and reported with its test operating point.
        eval_batch_size: images per forward pass when evaluating.
        amp: mixed precision of training and evaluation: ``on`` (bf16 autocast; fp16 with a gradient
            scaler on a CUDA GPU without bf16; on a CPU too), ``off`` (float32), ``auto`` (on CUDA only).
            The run record's ``precision`` says what a run used (fp32, bf16, fp16).
        channels_last: channels-last memory format: ``auto`` (on CUDA only), ``on`` or ``off``.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        num_threads: torch CPU threads of a run (0: torch's default).
        store: the results store folder.
        progress: print a progress line per run.
        tracker: ``tensorboard`` also logs each finished run (config, per-epoch history, final metrics) to
            ``STORE/tensorboard/RUN_ID``; ``mlflow`` to the MLflow file store ``STORE/mlruns`` (or the
            server of ``MLFLOW_TRACKING_URI``); ``none``. A tracker that fails costs a warning line.
    """

    #: The fixed value sets of fields (validated on build, shown in the CLI's help).
    CHOICES: ClassVar[dict[str, tuple]] = {
        "optimizer": ("adamw", "sgd", "adam"), "monitor": MONITOR_METRICS, "schedule": SCHEDULES,
        "bn_mode": ("eval", "train"), "resize": RESIZE_POLICIES, "medmnist_size": (28, 64, 128, 224),
        "amp": ("auto", "on", "off"), "channels_last": ("auto", "on", "off"), "feature_cache": ("auto", "fp32", "off"),
        "device": ("auto", "cpu", "cuda"), "class_weight": CLASS_WEIGHTS, "sampler": SAMPLERS,
        "tracker": TRACKERS, "dicom_window": DICOM_WINDOWS,
        "uncertain_labels": UNCERTAIN_LABELS, "data_cache": DATA_CACHES,
    }

    #: The numeric fields' types and bounds (validated on build by the same helper as ``CHOICES``).
    RANGES: ClassVar[dict[str, Range]] = {
        "epochs": Range(int, 1, MAX_EPOCHS), "scratch_epochs": Range(int, 0, MAX_EPOCHS),
        "img_size": Range(int, 16, 2048), "batch_size": Range(int, 1, MAX_BATCH),
        "eval_batch_size": Range(int, 1, MAX_BATCH), "lr": Range((float, int), 0, MAX_LR, include_min=False),
        "momentum": Range((float, int), 0, 1), "weight_decay": Range((float, int), 0),
        "warmup_epochs": Range((float, int), 0, MAX_EPOCHS), "patience": Range(int, 0),
        "seed": Range(int, 0, MAX_SEED), "split_seed": Range(int, 0, MAX_SEED),
        "train_fraction": Range((float, int), 0, 1, include_min=False),
        "val_fraction": Range((float, int), 0, 0.5, include_min=False),
        "test_fraction": Range((float, int), 0, 0.5, include_min=False),
        "train_per_class": Range(int, 0, 1 << 31), "cv_folds": Range(int, 0, 50), "label_smoothing": Range((float, int), 0, 0.5),
        "num_threads": Range(int, 0, MAX_THREADS), "feature_cache_memory_gb": Range((float, int), 0, 1 << 20),
        "feature_cache_disk_gb": Range((float, int), 0, 1 << 20), "decode_workers": Range(int, 0, MAX_THREADS),
        "target_sensitivity": Range((float, int), 0, 1, include_min=False),
    }

    data: str = "demo"
    arch: str = "tf_efficientnet_lite0"
    weights: str = "efficientnet_lite0"
    strategy: StrategySpec | str = StrategySpec(name="full", text="full")
    epochs: int = 5
    scratch_epochs: int = 0
    img_size: int = 64
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    schedule: str = "cosine"
    patience: int = 0
    monitor: str = "auc"
    bn_mode: str = "eval"
    augment: tuple[str, ...] | str = ()
    seed: int = 0
    split_seed: int = 0
    train_fraction: float = 1.0
    train_per_class: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    resize: str = "resize"
    medmnist_size: int = 28
    medmnist_root: str = ""
    dicom_window: str = "auto"
    uncertain_labels: str = "error"
    cv_folds: int = 0
    fold: int = 0
    label_smoothing: float = 0.0
    class_weight: str = "none"
    sampler: str = "none"
    target_sensitivity: float = 0.9
    eval_batch_size: int = 256
    amp: str = "auto"
    channels_last: str = "auto"
    feature_cache: str = "auto"
    feature_cache_memory_gb: float = 0.0
    feature_cache_disk_gb: float = 0.0
    data_cache: str = "auto"
    decode_workers: int = 0
    device: str = "auto"
    num_threads: int = 0
    store: str = "./medtune-results"
    progress: bool = True
    tracker: str = "none"

    def __post_init__(self) -> None:
        owner = "RunConfig"
        for name in ("data", "arch", "weights", "strategy", "store"):
            if name == "strategy" and isinstance(self.strategy, StrategySpec):
                continue
            check_scalar(getattr(self, name), name, str, owner=owner)
            if not getattr(self, name).strip():
                raise ConfigError(f"The {name!r} parameter of {owner} must not be empty.")
        check_scalar(self.medmnist_root, "medmnist_root", str, owner=owner)
        # the one place a strategy's text is parsed: from here on the run holds a typed spec
        object.__setattr__(self, "strategy", StrategySpec.parse(self.strategy))
        object.__setattr__(self, "augment", _check_augment(self.augment, owner))
        if self.cv_folds == 1:
            raise ConfigError("The 'cv_folds' parameter of RunConfig must be 0 (no cross-validation) or >= 2. Got 1.")
        check_fields(self, self.RANGES, self.CHOICES, owner=owner)
        check_scalar(self.fold, "fold", int, min_val=0, max_val=max(0, self.cv_folds - 1), owner=owner)

    def semantic_dict(self) -> dict[str, Any]:
        """The fields that determine the result (the run id hashes these)."""
        return {k: v for k, v in self.to_dict().items()
                if k not in NON_SEMANTIC_FIELDS and not (k in ID_NEUTRAL_DEFAULTS and v == ID_NEUTRAL_DEFAULTS[k])}


@dataclass(frozen=True)
class _WithBase(_Base):
    """A config that is a base :class:`RunConfig` plus fields of its own, written as one flat mapping
    (YAML, CLI, store): ``seed`` is read as ``seeds``; every other key is the config's own or a
    RunConfig field."""

    base: RunConfig = field(default_factory=RunConfig)

    @classmethod
    def own_fields(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "base"]

    def to_dict(self) -> dict[str, Any]:
        out = self.base.to_dict()
        out.pop("seed")
        for name in self.own_fields():
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def split_keys(cls, data: Mapping[str, Any], *, source: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(own keys, RunConfig keys) of a flat mapping; an unknown key raises with the closest match."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping of config keys, got {type(data).__name__}.")
        own, run_keys = cls.own_fields(), [f.name for f in fields(RunConfig)]
        valid = sorted(set(own) | set(run_keys))
        mine: dict[str, Any] = {}
        base: dict[str, Any] = {}
        for key, value in data.items():
            norm = str(key).replace("-", "_")
            norm = "seeds" if norm == "seed" and "seeds" in own else norm
            if norm in own:
                mine[norm] = value
            elif norm in run_keys:
                base[norm] = value
            else:
                raise ConfigError(
                    f"{source}: unknown config key {short_repr(key)}.{did_you_mean(norm, valid)} Valid keys: {', '.join(valid)}."
                )
        return mine, base

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config"):
        mine, base = cls.split_keys(data, source=source)
        return cls(base=RunConfig.from_dict(base, source=source), **mine)


def _shots(value: Any) -> int:
    """A ``train_per_class`` entry: an int, or ``all`` (0: every training image)."""
    if isinstance(value, str) and value.strip().lower() == "all":
        return 0
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"train_per_class takes whole numbers or 'all', got {value!r}")
    return int(value)


_LIST_FIELDS = {"arch": str, "strategy": lambda v: StrategySpec.parse(v, allow_all=True), "seeds": int,
                "train_fraction": float, "train_per_class": _shots, "lr": float, "weight_decay": float, "resize": str}


def expand_alternatives(spec: Any) -> list[Any]:
    """``lp_ft:ft_lr_scale=0.1|0.01`` → ``["lp_ft:ft_lr_scale=0.1", "lp_ft:ft_lr_scale=0.01"]``: a
    parameter with ``|``-separated values is a sweep axis (one spec per combination)."""
    if not isinstance(spec, str) or "|" not in spec:
        return [spec]
    name, params = parse_strategy_spec(spec)
    keys = list(params)
    choices = [[v.strip() for v in str(params[k]).split("|") if v.strip()] for k in keys]
    out = []
    for combo in itertools.product(*choices):
        out.append(format_strategy_spec(name, dict(zip(keys, combo)), "_main"))
    return out


@dataclass(frozen=True)
class SweepConfig(_WithBase):
    """A grid of runs: archs × strategies × learning rates × weight decays × resize policies × seeds ×
    train fractions over one base config.

    ``strategy`` entries may use ``top_k:all`` / ``layers_k:all`` / ``surgical:all`` to expand to
    every depth of each architecture, and ``|`` between values of a parameter to make it an axis
    (``lp_ft:ft_lr_scale=0.1|0.01``). ``lr`` and ``weight_decay`` take lists; where an axis has
    several values, the report selects per dataset × arch × strategy the value with the best mean
    validation metric. Every other key is a :class:`RunConfig` field.

    Attributes:
        arch: timm model names (a list, or comma-separated).
        strategy: strategy specs (a list, or comma-separated), e.g. ``scratch,linear,top_k:all,full``.
        seeds: training seeds (a list, or comma-separated).
        train_fraction: shares of the training split (nested subsets), each in (0, 1] (a list, or comma-separated).
        train_per_class: training images per class (k-shot, nested subsets; 0: all), an axis like
            ``train_fraction`` (a list, or comma-separated).
        lr: peak learning rates, an axis selected on validation (a list, or comma-separated).
        weight_decay: weight decays, an axis selected on validation (a list, or comma-separated).
        resize: resize policies compared in one sweep (``resize``, ``pad``, ``bucket``; a list, or comma-separated).
        name: the sweep's name in logs.
        expected: published results the sweep reproduces (a literature preset's ``expected:`` table: dataset ×
            arch × strategy × size → ACC, AUC in % and their seed SD; :mod:`medtune.expected`); the
            sweep keeps it in its store under ``name``, and ``medtune report`` and ``medtune results --expected``
            show measured beside published with a verdict. None: no table.
        halving: successive halving over epochs (``medtune.halving``): configurations train to a rung,
            the top ``1/halving_eta`` by mean validation metric over seeds continue from their checkpoint.
            ``true``, or a mapping of ``eta``, ``first_rung``, ``within``. Off by default.
        halving_eta: the promoted share at each rung is ``1/eta``; rungs grow by ``eta``.
        halving_first_rung: epochs of the first rung.
        halving_within: ``lr`` (a cell's own lr and weight-decay values compete) or ``all`` (every cell competes).
    """

    arch: tuple[str, ...] = ("tf_efficientnet_lite0",)
    strategy: tuple[StrategySpec, ...] = ("linear", "full")
    seeds: tuple[int, ...] = (0,)
    train_fraction: tuple[float, ...] = (1.0,)
    train_per_class: tuple[int, ...] | None = None  # None: the base run's
    lr: tuple[float, ...] | None = None  # None: the base run's
    weight_decay: tuple[float, ...] | None = None  # None: the base run's
    resize: tuple[str, ...] | None = None  # None: the base run's; [resize, pad, bucket] compares them
    name: str = "sweep"
    expected: dict | None = None

    halving: bool = False
    halving_eta: int = 3
    halving_first_rung: int = 1
    halving_within: str = "lr"

    def __post_init__(self) -> None:
        if isinstance(self.halving, Mapping):  # halving: {eta: 3, first_rung: 1, within: lr}
            for key, value in self.halving.items():
                if f"halving_{key}" not in self.own_fields():
                    raise ConfigError(f"Unknown key {short_repr(key)} under 'halving' of the sweep; valid keys: eta, "
                                      "first_rung, within.")
                object.__setattr__(self, f"halving_{key}", value)
            object.__setattr__(self, "halving", True)
        check_scalar(self.halving, "halving", bool, owner="sweep")
        check_scalar(self.halving_eta, "halving_eta", int, min_val=2, owner="sweep")
        check_scalar(self.halving_first_rung, "halving_first_rung", int, min_val=1, owner="sweep")
        check_choice(self.halving_within, "halving_within", ("lr", "all"), owner="sweep")
        if self.expected is not None:
            from medtune.expected import parse_expected

            object.__setattr__(self, "expected", parse_expected(self.expected))
        for key in ("lr", "weight_decay", "resize", "train_per_class"):
            if getattr(self, key) is None:
                object.__setattr__(self, key, (getattr(self.base, key),))
        for key, conv in _LIST_FIELDS.items():
            try:
                value = getattr(self, key)
                raw = (tuple(split_strategy_list(value)) if key == "strategy" and isinstance(value, str)
                       else _as_tuple(value))
                if key == "strategy":
                    raw = tuple(alt for entry in raw for alt in expand_alternatives(entry))
                value = tuple(conv(v) for v in raw)
            except ConfigError:
                raise
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"The {key!r} list of the sweep has a bad entry: {exc}.") from None
            if not value:
                raise ConfigError(f"The {key!r} list of the sweep is empty; give at least one value.")
            object.__setattr__(self, key, value)
        for key, field_name in (("train_fraction", "train_fraction"), ("lr", "lr"), ("weight_decay", "weight_decay"),
                                ("seeds", "seed"), ("train_per_class", "train_per_class")):
            r = RunConfig.RANGES[field_name]
            for value in getattr(self, key):
                check_scalar(value, key, r.kind, min_val=r.min_val, max_val=r.max_val, include_min=r.include_min,
                             owner="sweep")
        for policy in self.resize:
            check_choice(policy, "resize", RESIZE_POLICIES, owner="sweep")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> SweepConfig:
        mine, base = cls.split_keys(data, source=source)
        # the base run takes the first arch and train fraction, so it validates like any run (its strategy
        # may be a template such as top_k:all and is replaced per run anyway)
        first = {k: _LIST_FIELDS[k](_as_tuple(v)[0]) for k, v in mine.items()
                 if k in ("arch", "train_fraction", "train_per_class", "lr", "weight_decay", "resize") and _as_tuple(v)}
        return cls(base=RunConfig.from_dict({**base, **first}, source=source), **mine)


def load_config(cls: type, source: Any = None, **overrides: Any):
    """A config of class ``cls`` from an instance, a mapping, a YAML path or None (defaults), with
    keyword overrides (same names as the YAML keys; None leaves a key as it is) on top.

    Raises:
        ConfigError: unreadable YAML, an unknown key or an invalid value (naming the file).
    """
    if isinstance(source, cls):
        if not any(v is not None for v in overrides.values()):
            return source
        data = source.to_dict()
    elif isinstance(source, Mapping):
        data = dict(source)
    elif source is None:
        data = {}
    elif isinstance(source, (str, Path)):
        data = load_yaml(source)
    else:
        raise ConfigError(f"Expected a {cls.__name__}, a mapping or a YAML path; got {type(source).__name__}.")
    given = {k: v for k, v in overrides.items() if v is not None}
    data.update(given)
    try:
        return cls.from_dict(data, source=str(source) if isinstance(source, (str, Path)) else "config")
    except ConfigError as exc:
        # a bad value read from a YAML file: name the file (a flag's value is named by its flag already)
        text = str(exc)
        from_flag = any(f"'{k}'" in text or f"'{k.rstrip('s')}'" in text for k in given)
        if isinstance(source, (str, Path)) and not from_flag and not text.startswith(str(source)):
            raise ConfigError(f"{source}: {text}") from None
        raise


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats (``1e-3`` is a number, not text) and duplicate keys refused."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {short_repr(key)} on lines {seen[key]} and {line}; keep one",
                    key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.2's float pattern (PyYAML implements YAML 1.1, where 1e-3 without a dot is a string)
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _num_nodes(node, memo: dict[int, int]) -> int:
    """Nodes of a composed YAML document with every alias expanded (an alias bomb is small on disk only)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive alias counts once
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_num_nodes(n, memo) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_num_nodes(k, memo) + _num_nodes(v, memo) for k, v in node.value)
    memo[id(node)] = min(total, MAX_YAML_NODES + 1)
    return memo[id(node)]


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a one-line error naming the file on failure.

    Numbers follow YAML 1.2 (``1e-3`` is a float); duplicate keys, files over 1 MiB and documents
    that expand (through aliases) to more than 100,000 nodes are refused.
    """
    path = Path(path)
    try:
        is_file, size = path.is_file(), path.stat().st_size if path.is_file() else 0
    except OSError as exc:  # e.g. a name too long for the OS
        raise ConfigError(f"Config file {short_repr(str(path))} cannot be read ({exc.strerror or exc}).") from None
    if not is_file:
        raise ConfigError(f"Config file {short_repr(str(path))} does not exist; give the path of a YAML file.")
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"Config file {str(path)!r} is {size:,} bytes, more than a config needs "
                          f"({MAX_YAML_BYTES:,} at most); is it the right file?")
    try:
        loader = _YamlLoader(path.read_text(encoding="utf-8"))
        try:
            node = loader.get_single_node()
            if node is not None and _num_nodes(node, {}) > MAX_YAML_NODES:
                raise ConfigError(f"Config file {str(path)!r} holds more than {MAX_YAML_NODES:,} values (aliases "
                                  "expanded), more than a config needs; is it the right file?")
            data = None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"Config file {str(path)!r} is not UTF-8 text (byte {exc.start}); save it as UTF-8.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"Config file {str(path)!r} is not valid YAML{where}: {getattr(exc, 'problem', exc)}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {str(path)!r} must hold a mapping of keys, not a {type(data).__name__}.")
    return data


def save_yaml(data: Mapping[str, Any], path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dict(data), sort_keys=False))
