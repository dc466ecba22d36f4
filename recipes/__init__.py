"""The command line (``python -m recipes``) and the configs shipped with the package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

_SOURCE_YAML = Path(__file__).resolve().parent.parent / "yaml"


def config_path(name: str) -> Path:
    """Path of a shipped config (``"tiny/sft.yaml"`` or ``"yaml/tiny/sft.yaml"``), in a checkout or installed."""
    rel = name[len("yaml/"):] if name.startswith("yaml/") else name
    if (_SOURCE_YAML / rel).exists():
        return _SOURCE_YAML / rel
    installed = Path(str(resources.files("recipes.configs"))) / rel
    if installed.exists():
        return installed
    raise FileNotFoundError(f"No config {name!r} in {_SOURCE_YAML} or the installed package.")
