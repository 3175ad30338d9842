"""torchvision classification models (``arch="tv:NAME"``) behind the interface of a timm model.

timm ships no AlexNet, the network of Tajbakhsh et al. (2016) and of the AlexNet brain-MRI
localisation paper. :class:`TorchvisionBackbone` wraps any model of
``torchvision.models.list_models(module=torchvision.models)`` (``tv:alexnet``, ``tv:vgg16``,
``tv:resnet50``, ...) so that everything written for timm models works on it: ``num_classes``,
``pretrained_cfg`` (mean, std, input size of the torchvision weights), ``get_classifier()``,
``reset_classifier()``, and a block / layer partition (:meth:`TorchvisionBackbone.partition`).

The wrapper registers the torchvision model's own children under their own names, so its
``state_dict`` keys are torchvision's (``features.0.weight``, ``classifier.6.bias``): a state
dict saved from ``torchvision.models.alexnet`` loads as ``weights=FILE``. Its forward is the
torchvision model's own forward.

Partition rules (module docstring of :mod:`medtune.models.blocks` for timm models):

* **head** = the classifier container (``classifier``, ``fc``, ``heads`` or ``head``): the final
  classifier (``get_classifier()``, the last Linear or 1×1 Conv2d in it) and whatever precedes it
  there: AlexNet's and VGG's fc6 and fc7, counted with the classifier as by Kandel & Castelli and
  Davila et al. In the layer partition each such layer is its own entry (AlexNet: fc6, fc7) and
  the head is the final classifier alone (fc8), the unit of Tajbakhsh's layer-wise scheme.
* **body**: the other top-level children in order, ``features`` / ``trunk_output`` opened up.
  Where that container is a flat list of convolutions and max-pools (AlexNet, VGG), the blocks
  are the conv blocks between max-pools (AlexNet: conv1 | conv2 | conv3-5; no separate stem, as
  timm's VGG) and the layers are the convolutions (with their BatchNorm). Otherwise consecutive
  plain layers form the stem (ResNet ``conv1, bn1``), each composite child is a block
  (``layer1``..``layer4``, DenseNet ``denseblockN`` / ``transitionN``), a trailing plain layer
  (DenseNet ``norm5``) joins the last block, and the layers are the children of each block that
  is a plain container (``layer1.0``, ``layer1.1``, ...).
* Parameters held by the root model itself (ViT's ``class_token``) join the first block.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
from torch import nn

from medtune.errors import ConfigError, did_you_mean

from ._norm import NORM_LAYERS

__all__ = ["TV_PREFIX", "TorchvisionBackbone", "create_tv_model", "is_tv_arch", "list_tv_models"]

TV_PREFIX = "tv:"
_CLASSIFIER_ATTRS = ("classifier", "fc", "heads", "head")
_OPENED = ("features", "trunk_output")
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def is_tv_arch(arch: object) -> bool:
    """Whether ``arch`` names a torchvision model (``"tv:NAME"``)."""
    return isinstance(arch, str) and arch.startswith(TV_PREFIX)


def list_tv_models() -> list[str]:
    """torchvision's classification models, as ``tv:NAME``."""
    import torchvision.models as tvm

    return [TV_PREFIX + name for name in tvm.list_models(module=tvm)]


def _own_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _is_leaf(module: nn.Module) -> bool:
    return not any(True for _ in module.children())


def _last_classifier(module: nn.Module) -> tuple[str, nn.Module]:
    """(path inside ``module``, module) of the last Linear or Conv2d in ``module``."""
    found = [(n, m) for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not found:
        raise ConfigError(f"{type(module).__name__} holds no Linear or Conv2d classifier.")
    return found[-1]


class TorchvisionBackbone(nn.Module):
    """A torchvision classification model with the interface medtune uses of timm models.

    Args:
        model: a torchvision classification model (its classifier already sized).
        arch: the name, ``"tv:alexnet"``.
        transforms: the preprocessing of its ImageNet weights (``weights.transforms()``), which
            gives ``mean``, ``std``, ``crop_size``, ``resize_size`` and ``interpolation``.

    Attributes:
        pretrained_cfg: timm-style data config (``architecture``, ``mean``, ``std``,
            ``input_size``, ``interpolation``, ``crop_pct``, ``crop_mode``).
    """

    def __init__(self, model: nn.Module, *, arch: str, transforms=None) -> None:
        super().__init__()
        children = dict(model.named_children())
        classifier_attr = next((a for a in _CLASSIFIER_ATTRS if a in children), None)
        for name, child in children.items():
            if name == classifier_attr:
                first = next((m for m in child.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
                if isinstance(first, nn.Linear) and "flatten" not in children:
                    # parameter-free, so the state dict is unchanged: it makes the children a plain
                    # chain equal to forward() where forward() flattens before the classifier
                    # (AlexNet, VGG, ResNet), which the feature cache needs (it checks the chain)
                    self.add_module("flatten", nn.Flatten(1))
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        # the torchvision model supplies forward(); its modules are this wrapper's children, so
        # moving, copying or loading the wrapper acts on them (kept off the module tree on purpose)
        object.__setattr__(self, "_tv_model", model)
        self.classifier_attr = classifier_attr
        if self.classifier_attr is None:
            raise ConfigError(f"arch {arch!r}: found no classifier ({', '.join(_CLASSIFIER_ATTRS)}) to replace.")
        # torchvision's ImageClassification preset, or its defaults for a model without weights
        size = int(transforms.crop_size[0]) if transforms is not None else 224
        resize = int(transforms.resize_size[0]) if transforms is not None else 256
        self.pretrained_cfg = {
            "architecture": arch,
            "mean": tuple(float(m) for m in (transforms.mean if transforms is not None else (0.485, 0.456, 0.406))),
            "std": tuple(float(s) for s in (transforms.std if transforms is not None else (0.229, 0.224, 0.225))),
            "input_size": (3, size, size),
            "interpolation": transforms.interpolation.value if transforms is not None else "bilinear",
            "crop_pct": size / resize,
            "crop_mode": "center",
            "num_classes": self.num_classes,
        }
        self._partition_cache: dict[str, list[tuple[str, list[str], int | None]]] = {}

    @property
    def num_classes(self) -> int:
        """Number of outputs of the classifier."""
        classifier = self.get_classifier()
        return int(classifier.out_features if isinstance(classifier, nn.Linear) else classifier.out_channels)

    def get_classifier(self) -> nn.Module:
        """The final classifier layer (AlexNet: ``classifier.6``, fc8)."""
        return _last_classifier(getattr(self, self.classifier_attr))[1]

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final classifier with a freshly initialised one with ``num_classes`` outputs."""
        container = getattr(self, self.classifier_attr)
        path, old = _last_classifier(container)
        if isinstance(old, nn.Linear):
            new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
        else:
            new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding,
                            bias=old.bias is not None)
        if not path:
            setattr(self, self.classifier_attr, new)
            setattr(self._tv_model, self.classifier_attr, new)
        else:
            parent_path, _, leaf = path.rpartition(".")
            parent = container.get_submodule(parent_path) if parent_path else container
            setattr(parent, leaf, new)
        self.pretrained_cfg["num_classes"] = num_classes
        if hasattr(self._tv_model, "num_classes"):
            self._tv_model.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) of normalised images (N, 3, H, W)."""
        out = self._tv_model(x)
        return out.logits if hasattr(out, "logits") else out  # Inception / GoogLeNet in train mode

    # -- partition ---------------------------------------------------------------------------
    def _body_units(self) -> list[tuple[str, nn.Module]]:
        units = []
        for name, child in self.named_children():
            if name == self.classifier_attr or not _own_params(child):
                continue
            if name in _OPENED and isinstance(child, _CONTAINERS):
                units += [(f"{name}.{n}", c) for n, c in child.named_children() if _own_params(c)]
            else:
                units.append((name, child))
        return units

    def _body_groups(self) -> tuple[list[tuple[str, list[tuple[str, nn.Module]]]], bool]:
        """Blocks as (name, units) in order, and whether they are conv blocks between max-pools."""
        units = self._body_units()
        opened = next((getattr(self, n) for n in _OPENED if hasattr(self, n)), None)
        flat_pooled = (
            opened is not None
            and any(isinstance(c, nn.MaxPool2d) for c in opened.children())
            and all(_is_leaf(c) for c in opened.children())
        )
        if flat_pooled:  # AlexNet, VGG: cut at the max-pools
            groups: list[list[tuple[str, nn.Module]]] = [[]]
            prefix = next(n for n in _OPENED if getattr(self, n, None) is opened)
            by_name = dict(units)
            for name, child in opened.named_children():
                path = f"{prefix}.{name}"
                if isinstance(child, nn.MaxPool2d):
                    groups.append([])
                elif path in by_name:
                    groups[-1].append((path, child))
            others = [u for u in units if not u[0].startswith(f"{prefix}.")]
            groups = [g for g in groups if g]
            if others:
                groups[-1] += others
            return [(f"stage_{i + 1}", g) for i, g in enumerate(groups)], True
        # consecutive plain layers form one group (ResNet's stem conv1 + bn1); a plain layer after a
        # composite block joins it (DenseNet's norm5); every composite child starts a block
        groups: list[list[tuple[str, nn.Module]]] = []
        for path, module in units:
            if groups and _is_leaf(module):
                groups[-1].append((path, module))
            else:
                groups.append([(path, module)])
        if len(groups) == 1:
            return [("stage_1", groups[0])], False
        return [("stem" if i == 0 else f"stage_{i}", group) for i, group in enumerate(groups)], False

    def _layers_of(self, units: Sequence[tuple[str, nn.Module]], block_name: str, pooled: bool):
        """Layers (name, [module paths with params]) of one block."""
        if block_name == "stem" and not pooled:
            return [("stem", [p for p, _ in units])]
        layers: list[tuple[str, list[str]]] = []
        for path, module in units:
            if _is_leaf(module):
                if layers and isinstance(module, NORM_LAYERS):
                    layers[-1][1].append(path)
                else:
                    layers.append((path, [path]))
            elif type(module) in _CONTAINERS or isinstance(module, nn.ModuleDict):  # DenseNet's _DenseBlock
                layers += [(f"{path}.{n}", [f"{path}.{n}"]) for n, c in module.named_children() if _own_params(c)]
            else:
                layers.append((path, [path]))
        return layers

    def _params_under(self, paths: Sequence[str]) -> list[str]:
        names = [n for n, _ in self.named_parameters()]
        return [n for n in names if any(n == p or n.startswith(f"{p}.") for p in paths)]

    def _reductions(self, groups: Sequence[tuple[str, Sequence[str]]]) -> list[int | None]:
        """Output stride of each group's last module, from one forward pass at the weights' input size."""
        size = self.pretrained_cfg["input_size"][1]
        outputs: dict[str, int] = {}
        hooks = []
        for _, paths in groups:
            path = paths[-1]
            module = self.get_submodule(path)
            hooks.append(module.register_forward_hook(
                lambda _m, _i, out, key=path: outputs.__setitem__(key, out.shape[-1])
                if isinstance(out, torch.Tensor) and out.dim() == 4 else None))
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                self(torch.zeros(1, 3, size, size, device=next(self.parameters()).device))
        finally:
            for hook in hooks:
                hook.remove()
            self.train(was_training)
        return [round(size / outputs[paths[-1]]) if paths[-1] in outputs else None for _, paths in groups]

    def partition(self, granularity: str) -> list[tuple[str, list[str], int | None]]:
        """The partition as (name, parameter names, output stride) entries, input to output, head last.

        Args:
            granularity: ``"block"`` or ``"layer"``.
        """
        if granularity in self._partition_cache:
            return self._partition_cache[granularity]
        blocks, pooled = self._body_groups()
        root = [n for n, _ in self.named_parameters(recurse=False)]
        container = getattr(self, self.classifier_attr)
        head_path = _last_classifier(container)[0]
        head_path = f"{self.classifier_attr}.{head_path}" if head_path else self.classifier_attr
        if granularity == "block":
            groups = [(name, [p for p, _ in units]) for name, units in blocks]
            pre_head: list[tuple[str, list[str]]] = []
            head_params = self._params_under([self.classifier_attr])
        else:
            groups = [layer for name, units in blocks for layer in self._layers_of(units, name, pooled)]
            pre_head = []
            for path, module in container.named_modules(prefix=self.classifier_attr):
                if path == head_path or not _is_leaf(module) or not _own_params(module):
                    continue
                if pre_head and isinstance(module, NORM_LAYERS):
                    pre_head[-1][1].append(path)
                else:
                    pre_head.append((path, [path]))
            head_params = self._params_under([head_path])
        reductions = self._reductions(groups) + [None] * len(pre_head)
        entries = []
        for (name, paths), reduction in zip([*groups, *pre_head], reductions, strict=True):
            params = self._params_under(paths)
            if not entries:
                params = root + params
            entries.append((name, params, reduction))
        entries.append(("head", head_params, None))
        self._partition_cache[granularity] = entries
        return entries


def create_tv_model(arch: str, *, num_classes: int, imagenet: bool, drop_rate: float = 0.0) -> TorchvisionBackbone:
    """Build ``tv:NAME`` with a ``num_classes`` head: ImageNet weights through torchvision's own
    download (``imagenet=True``; needs the internet or torchvision's cache) or random init.

    Args:
        arch: ``"tv:NAME"``.
        num_classes: outputs of the new classifier.
        imagenet: load torchvision's default ImageNet weights, then replace the classifier.
        drop_rate: dropout before the classifier layers for models that take a ``dropout``
            argument (AlexNet, VGG, ...); 0 keeps the model's own (AlexNet's 0.5).

    Raises:
        ConfigError: unknown name, a model without ImageNet weights, a failed download, or
            ``drop_rate`` > 0 for a model without a ``dropout`` argument.
    """
    import torchvision.models as tvm

    check_tv_arch(arch)
    name = arch[len(TV_PREFIX):]
    weights_enum = tvm.get_model_weights(name)
    default = weights_enum.DEFAULT if hasattr(weights_enum, "DEFAULT") else None
    kwargs = {"dropout": drop_rate} if drop_rate > 0 else {}
    try:
        if imagenet:
            if default is None:
                raise ConfigError(f"torchvision has no ImageNet weights for {arch!r}. Use weights='none' or a FILE.")
            from ._weights import check_hub_reachable

            offline = (f"Offline? Save them once where you are online, e.g. torch.save(torchvision.models.get_model("
                       f"{name!r}, weights='DEFAULT').state_dict(), '{name}.pth'), and pass weights={name}.pth.")
            check_hub_reachable(arch, hint=offline)  # one attempt per process, then at once
            try:
                model = tvm.get_model(name, weights=default, **kwargs)
            except (OSError, RuntimeError) as err:  # offline, or a failed download
                raise ConfigError(
                    f"Could not download torchvision's ImageNet weights for {arch!r} ({type(err).__name__}: "
                    f"{err}). Offline? Save them once where you are online, e.g. torch.save("
                    f"torchvision.models.get_model({name!r}, weights='DEFAULT').state_dict(), '{name}.pth'), "
                    f"and pass weights={name}.pth."
                ) from err
        else:
            model = tvm.get_model(name, weights=None, **kwargs)
    except TypeError as err:
        raise ConfigError(f"drop_rate > 0 is not supported for {arch!r} ({err}); use drop_rate=0.") from err
    if hasattr(model, "aux_logits") and getattr(model, "AuxLogits", None) is not None:
        model.aux_logits, model.AuxLogits = False, None  # Inception's auxiliary head is not used
    if hasattr(model, "aux_logits") and hasattr(model, "aux1"):
        model.aux_logits, model.aux1, model.aux2 = False, None, None  # GoogLeNet's
    backbone = TorchvisionBackbone(model, arch=arch, transforms=default.transforms() if default else None)
    if backbone.num_classes != num_classes:
        backbone.reset_classifier(num_classes)
    return backbone


def check_tv_arch(arch: str) -> None:
    """Raise ConfigError unless ``arch`` is ``tv:`` + a torchvision classification model."""
    names = list_tv_models()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=5, cutoff=0.6)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ConfigError(
            f"Unknown arch {arch!r}: torchvision has no such classification model.{did_you_mean(arch, names)}"
            f"{hint} Available: {', '.join(names)}."
        )
