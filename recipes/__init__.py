"""rlhf-recipes: the one import root. ``recipes.modules`` (the LightningModules and their pieces),
``recipes.datamodules`` (data), ``recipes.callbacks``, the commands (``python -m recipes``, ``recipes.study``,
``recipes.evaluate``, ``recipes.paper``, ``recipes.export``, ``recipes.code_eval``) and the shipped configs
(``recipes.configs``, found by `config_path`)."""

from __future__ import annotations

import os
from importlib import util
from pathlib import Path


def _config_dirs() -> list[Path]:
    """The folders holding the shipped configs: a source checkout's yaml/ (an editable install maps
    ``recipes.configs`` there but cannot import it, as yaml/ has no ``__init__.py``: one would shadow PyYAML at the
    repository root), then the installed ``recipes/configs`` package data."""
    root = Path(__file__).resolve().parent.parent
    dirs = [root / "yaml"] if (root / "pyproject.toml").is_file() else []  # not site-packages/yaml, which is PyYAML
    try:
        spec = util.find_spec("recipes.configs")
    except ImportError:
        spec = None
    # A namespace package's locations are real folders; importlib.resources.files() would give a MultiplexedPath.
    locations = spec.submodule_search_locations if spec is not None else None
    return dirs + [Path(p) for p in locations or []]


def config_path(name: str) -> Path:
    """Path of a shipped config (``"tiny/sft.yaml"`` or ``"yaml/tiny/sft.yaml"``), in a checkout or installed."""
    rel = name.removeprefix("yaml/")
    dirs = _config_dirs()
    for folder in dirs:
        if (folder / rel).is_file():
            return folder / rel
    raise FileNotFoundError(f"No shipped config {name!r} in {', '.join(map(str, dirs)) or 'this install'}.")


def resolve_configs(args: list[str]) -> list[str]:
    """``args`` with each ``--config X`` (``--config=X``, ``-c X``) that is no file here but names a shipped config
    (``tiny/sft.yaml``, ``yaml/tiny/sft.yaml``) pointing at the shipped file, so the commands run from any folder."""
    out = list(args)
    for i, arg in enumerate(out):
        key, eq, value = arg.partition("=")
        if key in ("--config", "-c") and eq:
            out[i] = f"{key}={_shipped(value)}"
        elif i and args[i - 1] in ("--config", "-c"):
            out[i] = _shipped(arg)
    return out


def _shipped(value: str) -> str:
    if os.path.exists(value) or not value.endswith((".yaml", ".yml")):
        return value
    try:
        return str(config_path(value))
    except FileNotFoundError:
        return value  # the command's parser reports the missing file
