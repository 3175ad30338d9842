"""Built-in sweep presets: plain YAML files a user can print, copy and edit."""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

from medtune.errors import unknown_name_error

__all__ = ["list_presets", "get_preset", "preset_text"]


def list_presets() -> list[str]:
    """Names of the built-in presets."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    """The YAML text of a preset (what ``medtune preset show NAME`` prints).

    Raises:
        ConfigError: unknown preset.
    """
    if name not in list_presets():
        raise unknown_name_error("preset", name, list_presets())
    return resources.files(__name__).joinpath(f"{name}.yaml").read_text()


def get_preset(name: str) -> dict[str, Any]:
    """A preset as a dict of sweep keys."""
    return yaml.safe_load(preset_text(name))
