"""rlhf-recipes: the one import root. ``recipes.modules`` (the LightningModules and their pieces),
``recipes.datamodules`` (data), ``recipes.callbacks``, the commands (``python -m recipes``, ``recipes.study``,
``recipes.evaluate``, ``recipes.paper``, ``recipes.export``, ``recipes.code_eval``) and the shipped configs
(``recipes.configs``, found by `config_path`)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

_SOURCE_YAML = Path(__file__).resolve().parent.parent / "yaml"


def config_path(name: str) -> Path:
    """Path of a shipped config (``"tiny/sft.yaml"`` or ``"yaml/tiny/sft.yaml"``), in a checkout or installed."""
    rel = name[len("yaml/"):] if name.startswith("yaml/") else name
    if (_SOURCE_YAML / rel).exists():
        return _SOURCE_YAML / rel
    installed = resources.files("recipes.configs").joinpath(rel)  # a Traversable (yaml/ is a namespace package, so
    # files() is a MultiplexedPath whose str() is no path); joinpath gives the file itself
    if installed.is_file():
        return Path(str(installed))
    raise FileNotFoundError(f"No config {name!r} in {_SOURCE_YAML} or the installed package.")
