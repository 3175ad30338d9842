"""Block and layer partitions of a timm backbone: what "fine-tune the top k blocks" refers to.

A *block partition* is the ordered list ``stem, stage_1, ..., stage_S, head``; a *layer partition* is
the fine version with one entry per conv / residual unit. Every parameter belongs to exactly one block
and one layer. The partition is built on timm's parameter grouping (``group_matcher``), with the rules
the README states under "Block partition" (head by identity, DenseNet transitions, VGG cut at its
max-pools, unmatched parameters joining the last stage).
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from timm.models._manipulate import group_with_matcher
from torch import nn

from medtune.models._norm import NORM_LAYERS

from medtune.errors import ConfigError, did_you_mean, unknown_name_error

from ._builder import NormalizedModel
from .tv import TorchvisionBackbone

__all__ = ["Block", "Blocks", "GRANULARITIES", "format_blocks", "get_blocks", "list_archs"]

GRANULARITIES = ("block", "layer")
FORMATS = ("table", "json", "csv")

# Architectures whose partition has been checked against their papers' stage definitions
# (tests/models/test_blocks.py); every other timm CNN gets the same generic rules.
_CHECKED_ARCHS = {
    "convnext_tiny": "stem, stages.0..3 (each stage opens with its downsampling layer), final norm in stage_4",
    "dcnn3": "stage_1..3: one per convolution (Rama et al.), head = linear after global average pooling",
    "densenet121": "stem, denseblock1, transition1, ..., denseblock4 (+ norm5): 9 blocks, as Davila et al.",
    "efficientnet_b0": "stem, blocks.0..6 (7 MBConv stages), conv_head + bn2 in stage_7",
    "inception_v3": "stem (Conv2d_1a-2b), Conv2d_3b-4a, Mixed_5*, Mixed_6*, Mixed_7*",
    "medtune_tiny_cnn": "stem, stages.0..2",
    "mobilenetv2_100": "stem, blocks.0..6, conv_head + bn2 in stage_7",
    "mobilenetv3_large_100": "stem, blocks.0..6, conv_head in stage_7",
    "regnetx_002": "stem, s1..s4",
    "resnet18": "stem (conv1, bn1), layer1..4",
    "resnet50": "stem (conv1, bn1), layer1..4",
    "tf_efficientnet_lite0": "stem, blocks.0..6, conv_head + bn2 in stage_7",
    "tv:alexnet": "conv1 | conv2 | conv3-5 (conv blocks between max-pools), head = fc6 + fc7 + fc8",
    "tv:resnet18": "stem (conv1, bn1), layer1..4",
    "tv:vgg16": "conv blocks between max-pools (stage_1..5), head = fc6 + fc7 + fc8",
    "vgg16": "conv blocks between max-pools (stage_1..5), head = fc6 + fc7 + fc8",
    "vgg19": "conv blocks between max-pools (stage_1..5), head = fc6 + fc7 + fc8",
    "vgg19_bn": "conv+BN blocks between max-pools (stage_1..5), head = fc6 + fc7 + fc8",
}

_UNMATCHED_PROBE = "~medtune~unmatched~probe~"


@dataclass(frozen=True)
class Block:
    """One entry of a block or layer partition.

    Attributes:
        name: ``"stem"``, ``"stage_1"``..``"stage_S"``, ``"head"`` for blocks;
            the timm module path (``"layer2.1"``) for layers.
        param_names: backbone parameter names, in ``named_parameters()`` order.
        num_params: number of parameter elements.
        reduction: output stride of the block's features; None for the head.
    """

    name: str
    param_names: tuple[str, ...]
    num_params: int
    reduction: int | None


class Blocks(Sequence[Block]):
    """The ordered partition of a backbone's parameters, input to output; the last entry is the head.

    Args:
        model: the timm backbone the parameter names refer to.
        granularity: ``"block"`` or ``"layer"``.
        blocks: the partition; the last one is the head.
        arch: architecture name, for messages.
    """

    def __init__(self, model: nn.Module, granularity: str, blocks: Sequence[Block], arch: str) -> None:
        self.model = model
        self.granularity = granularity
        self.arch = arch
        self._blocks = tuple(blocks)
        self._index = {name: idx for idx, block in enumerate(self._blocks) for name in block.param_names}

    def __getitem__(self, idx):  # int -> Block, slice -> tuple[Block, ...]
        return self._blocks[idx]

    def __len__(self) -> int:
        return len(self._blocks)

    def __iter__(self) -> Iterator[Block]:
        return iter(self._blocks)

    def __repr__(self) -> str:
        return f"Blocks(arch={self.arch!r}, granularity={self.granularity!r}, names={self.names()})"

    @property
    def head_idx(self) -> int:
        """Index of the head (always the last entry)."""
        return len(self._blocks) - 1

    @property
    def num_params(self) -> int:
        """Number of parameter elements of the whole backbone."""
        return sum(block.num_params for block in self._blocks)

    def names(self) -> list[str]:
        """Block names, input to output."""
        return [block.name for block in self._blocks]

    def parameters(self, idx: int) -> list[nn.Parameter]:
        """The parameter tensors of entry ``idx``, taken by identity from ``model.named_parameters()``.

        Raises:
            ConfigError: ``idx`` is out of range.
        """
        if isinstance(idx, bool) or not isinstance(idx, int) or not -len(self) <= idx < len(self):
            raise ConfigError(
                f"Block index {idx!r} is out of range for {self.arch}, which has {len(self)} "
                f"{self.granularity}s ({', '.join(self.names())})."
            )
        params = dict(self.model.named_parameters())
        return [params[name] for name in self._blocks[idx].param_names]

    def block_index(self, param_name: str) -> int:
        """Index of the entry holding ``param_name`` (a backbone name; a ``backbone.`` prefix is accepted).

        Raises:
            ConfigError: the name is not a parameter of the backbone.
        """
        name = (
            param_name[len("backbone.") :]
            if param_name not in self._index and param_name.startswith("backbone.")
            else param_name
        )
        if name not in self._index:
            raise ConfigError(
                f"{param_name!r} is not a parameter of {self.arch}.{did_you_mean(param_name, self._index)}"
            )
        return self._index[name]

    def to_rows(self) -> list[dict]:
        """One dict per entry: ``index``, ``name``, ``num_params``, ``percent`` (of all parameters), ``reduction``."""
        total = max(self.num_params, 1)
        return [
            {
                "index": idx,
                "name": block.name,
                "num_params": block.num_params,
                "percent": round(100.0 * block.num_params / total, 2),
                "reduction": block.reduction,
            }
            for idx, block in enumerate(self._blocks)
        ]


def list_archs(pattern: str = "*") -> list[str]:
    """Architectures whose block partition has been checked against their papers (glob ``pattern``).

    Any other timm CNN works too, through the generic rules in this module's docstring.
    """
    return sorted(name for name in _CHECKED_ARCHS if fnmatch.fnmatch(name, pattern))


def get_blocks(model: nn.Module, granularity: str = "block") -> Blocks:
    """Partition a backbone's parameters into blocks (or layers), input to output.

    Args:
        model: a :class:`~medtune.models.NormalizedModel` or a timm model (it needs
            ``group_matcher`` and ``get_classifier``).
        granularity: ``"block"`` (stem, stages, head) or ``"layer"`` (one entry per
            conv / residual unit, then the head).

    Returns:
        The partition; parameter names are relative to the timm backbone
        (``"layer1.0.conv1.weight"``).

    Raises:
        ConfigError: unknown ``granularity``, or ``model`` is not a timm model.

    Example:
        >>> blocks = get_blocks(create_model("resnet18", num_classes=2, weights="none"))
        >>> blocks.names()
        ['stem', 'stage_1', 'stage_2', 'stage_3', 'stage_4', 'head']
    """
    if granularity not in GRANULARITIES:
        raise unknown_name_error("granularity", granularity, GRANULARITIES)
    backbone = model.backbone if isinstance(model, NormalizedModel) else model
    if not isinstance(backbone, TorchvisionBackbone) and not all(
        callable(getattr(backbone, attr, None)) for attr in ("group_matcher", "get_classifier")
    ):
        raise ConfigError(
            f"get_blocks needs a timm model (with group_matcher() and get_classifier()); got "
            f"{type(backbone).__name__}. Build it with medtune.models.create_model or timm.create_model."
        )
    arch = str(getattr(backbone, "pretrained_cfg", {}).get("architecture") or type(backbone).__name__)
    if isinstance(backbone, TorchvisionBackbone):  # its own rules (medtune.models.tv)
        sizes = {name: p.numel() for name, p in backbone.named_parameters()}
        entries = [Block(name, tuple(params), sum(sizes[n] for n in params), reduction)
                   for name, params, reduction in backbone.partition(granularity)]
        return Blocks(backbone, granularity, entries, arch)
    return _Partitioner(backbone).partition(granularity, arch)


def format_blocks(blocks: Blocks, fmt: str = "table") -> str:
    """Render a partition as an aligned text table, JSON (a list of rows) or CSV.

    Columns: index, name, parameters, percent of all parameters, output stride.

    Raises:
        ConfigError: unknown ``fmt``.
    """
    if fmt not in FORMATS:
        raise unknown_name_error("format", fmt, FORMATS)
    rows = blocks.to_rows()
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["index"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    header = ("idx", "name", "params", "%", "stride")
    body = [
        (
            str(r["index"]),
            r["name"],
            f"{r['num_params']:,}",
            f"{r['percent']:.1f}",
            "-" if r["reduction"] is None else str(r["reduction"]),
        )
        for r in rows
    ]
    footer = ("", "total", f"{blocks.num_params:,}", "100.0", "")
    widths = [max(len(row[col]) for row in (header, *body, footer)) for col in range(len(header))]
    align = ["right", "left", "right", "right", "right"]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if a == "right" else c.ljust(w) for c, w, a in zip(cells, widths, align, strict=True)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    title = f"{blocks.arch}: {len(rows)} {blocks.granularity}s"
    return "\n".join([title, line(header), rule, *map(line, body), rule, line(footer)])


class _Partitioner:
    """Builds the block and layer partitions of one backbone (see the module docstring)."""

    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = backbone
        named = list(backbone.named_parameters())
        self.names = [name for name, _ in named]
        self.sizes = {name: p.numel() for name, p in named}
        head_ids = {id(p) for p in backbone.get_classifier().parameters()}
        self.head = [name for name, p in named if id(p) in head_ids]
        head_set = set(self.head)
        self.body = [name for name in self.names if name not in head_set]
        self.order = {name: i for i, name in enumerate(self.names)}
        modules = list(backbone.named_modules())
        self.module_pos = {name: i for i, (name, _) in enumerate(modules)}
        module_by_name = dict(modules)
        self.owner = {name: module_by_name[_module_path(name)] for name in self.names}
        self.taps = self._feature_taps(getattr(backbone, "feature_info", None))

    # -- timm groups -------------------------------------------------------------------------
    def _timm_groups(self, coarse: bool) -> tuple[list[list[str]], list[str], Callable[[str], bool] | None]:
        """timm's groups of the body parameters in order, the unmatched ones, and a stem test."""
        matcher = self.backbone.group_matcher(coarse=coarse)
        grouped = group_with_matcher(((n, None) for n in [*self.body, _UNMATCHED_PROBE]), matcher)
        groups = [list(grouped[k]) for k in sorted(grouped)]
        unmatched: list[str] = []
        for group in groups:
            if _UNMATCHED_PROBE in group:
                group.remove(_UNMATCHED_PROBE)
                unmatched = list(group)
                group.clear()
        groups = [sorted(g, key=self.order.__getitem__) for g in groups if g]
        is_stem = None
        if isinstance(matcher, dict) and matcher.get("stem"):
            specs = matcher["stem"] if isinstance(matcher["stem"], (list, tuple)) else [matcher["stem"]]
            patterns = [re.compile(s[0] if isinstance(s, (list, tuple)) else s) for s in specs]
            is_stem = lambda name: any(p.match(name) for p in patterns)  # noqa: E731
        elif callable(matcher):  # timm's function matchers number the stem 0
            first = set(groups[0]) if groups else set()
            is_stem = first.__contains__
        return groups, unmatched, is_stem

    def _groups(self, coarse: bool) -> tuple[list[list[str]], list[str], bool]:
        """Groups with unmatched params placed and norm-only groups merged; pre_logits params; has-stem."""
        groups, unmatched, is_stem = self._timm_groups(coarse)
        pre_logits = [n for n in unmatched if "pre_logits" in n.split(".")[:-1]]
        placed = {name: gi for gi, group in enumerate(groups) for name in group}
        if not groups:
            groups, placed = [[]], {}
        to_place = set(unmatched) - set(pre_logits)
        for name in (n for n in self.body if n in to_place):
            earlier = [placed[n] for n in self.body[: self.body.index(name)] if n in placed]
            gi = earlier[-1] if earlier else 0
            groups[gi].append(name)
            placed[name] = gi
        groups = [sorted(g, key=self.order.__getitem__) for g in groups if g]
        merged: list[list[str]] = []
        for group in groups:
            if merged and all(isinstance(self.owner[n], NORM_LAYERS) for n in group):
                merged[-1].extend(group)
            else:
                merged.append(list(group))
        has_stem = bool(merged) and is_stem is not None and all(is_stem(n) for n in merged[0])
        return merged, pre_logits, has_stem

    # -- strides -----------------------------------------------------------------------------
    def _feature_taps(self, feature_info) -> list[tuple[int, int]]:
        """(position of the tap's last module in named_modules order, reduction) per feature_info entry."""
        if feature_info is None:
            return []
        infos = feature_info.get_dicts() if hasattr(feature_info, "get_dicts") else list(feature_info)
        taps = []
        for info in infos:
            module, reduction = info.get("module"), info.get("reduction")
            positions = [
                pos for name, pos in self.module_pos.items() if name == module or name.startswith(f"{module}.")
            ]
            if positions and reduction is not None:
                taps.append((max(positions), int(reduction)))
        return sorted(taps)

    def _tap_idx(self, names: Sequence[str]) -> int:
        last = max(self.module_pos[_module_path(n)] for n in names)
        return next((i for i, (end, _) in enumerate(self.taps) if end >= last), len(self.taps))

    def _reduction(self, names: Sequence[str]) -> int | None:
        if not self.taps or not names:
            return None
        return self.taps[min(self._tap_idx(names), len(self.taps) - 1)][1]

    # -- partitions --------------------------------------------------------------------------
    def _block_groups(self) -> tuple[list[tuple[str, list[str]]], list[str]]:
        coarse, pre_logits, has_stem = self._groups(coarse=True)
        raw_coarse = self._timm_groups(coarse=True)[0]
        raw_fine = self._timm_groups(coarse=False)[0]
        if raw_coarse == raw_fine and self.taps:
            # timm's groups are single layers here (VGG, Inception): cut at the downsampling taps
            stem_group = coarse[0] if has_stem else None
            merged: list[list[str]] = []
            last_tap = None
            for group in coarse:
                tap = self._tap_idx(group)
                if merged and tap == last_tap:
                    merged[-1].extend(group)
                else:
                    merged.append(list(group))
                last_tap = tap
            coarse = merged
            has_stem = stem_group is not None and coarse[0] == stem_group
        coarse = [part for group in coarse for part in _split_transitions(group)]
        named = []
        for gi, group in enumerate(coarse):
            name = "stem" if has_stem and gi == 0 else f"stage_{gi + (0 if has_stem else 1)}"
            named.append((name, group))
        return named, pre_logits

    def partition(self, granularity: str, arch: str) -> Blocks:
        stages, pre_logits = self._block_groups()
        body_blocks = [*stages, *([("pre_head", pre_logits)] if pre_logits else [])]
        head = list(self.head)
        if granularity == "block":
            entries = stages
            head = sorted([*pre_logits, *self.head], key=self.order.__getitem__)
        else:
            block_of = {n: bi for bi, (_, group) in enumerate(body_blocks) for n in group}
            fine, _, _ = self._groups(coarse=False)
            per_block: list[list[list[str]]] = [[] for _ in body_blocks]
            for group in fine:
                for bi in sorted({block_of[n] for n in group}):
                    per_block[bi].append([n for n in group if block_of[n] == bi])
            if pre_logits:  # one layer per conv/linear module of pre_logits, norms with the one before
                layers: list[list[str]] = []
                for name in pre_logits:
                    same_module = layers and _module_path(layers[-1][-1]) == _module_path(name)
                    if layers and (same_module or isinstance(self.owner[name], NORM_LAYERS)):
                        layers[-1].append(name)
                    else:
                        layers.append([name])
                per_block[-1] = layers
            entries = []
            used: set[str] = set()
            for (block_name, _), layers in zip(body_blocks, per_block, strict=True):
                for j, layer in enumerate(layers):
                    name = self._layer_name(block_name, j, len(layers), layer)
                    name = name if name not in used else f"{block_name}.{j}"
                    used.add(name)
                    entries.append((name, layer))
        blocks = [
            Block(name, tuple(group), sum(self.sizes[n] for n in group), self._reduction(group))
            for name, group in entries
        ]
        blocks.append(Block("head", tuple(head), sum(self.sizes[n] for n in head), None))
        return Blocks(self.backbone, granularity, blocks, arch)

    def _layer_name(self, block_name: str, j: int, num_layers: int, names: Sequence[str]) -> str:
        """The stem's name, the unit timm's fine matcher finds at the first parameter, or the module path."""
        if block_name == "stem":
            return "stem" if num_layers == 1 else f"stem.{j}"
        matcher = self.backbone.group_matcher(coarse=False)
        if isinstance(matcher, dict):
            for spec in matcher.values():
                specs = spec if isinstance(spec, (list, tuple)) else [spec]
                for sub in specs:
                    if sub is None:
                        continue
                    match = re.match(sub[0] if isinstance(sub, (list, tuple)) else sub, names[0])
                    if match and match.group(0).strip("."):
                        return match.group(0).strip(".")
        paths = [_module_path(n).split(".") for n in names]
        common = []
        for parts in zip(*paths):  # noqa: B905  (stops at the shortest path on purpose)
            if len(set(parts)) > 1:
                break
            common.append(parts[0])
        tops = list(dict.fromkeys(n.split(".")[0] for n in names))
        return ".".join(common) or "+".join(tops)


def _module_path(param_name: str) -> str:
    return param_name.rpartition(".")[0]


def _is_transition(param_name: str) -> bool:
    return any(part.startswith("transition") for part in param_name.split(".")[:-1])


def _split_transitions(group: list[str]) -> list[list[str]]:
    """A coarse group cut where a DenseNet transition starts or ends (timm groups ``denseblockN``
    with ``transitionN``); any other group comes back whole."""
    parts: list[list[str]] = []
    for name in group:
        if parts and _is_transition(name) == _is_transition(parts[-1][-1]):
            parts[-1].append(name)
        else:
            parts.append([name])
    return parts
