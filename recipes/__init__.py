"""rlhf-recipes: the one import root. ``recipes.modules`` (the LightningModules and their pieces),
``recipes.datamodules`` (data), ``recipes.callbacks``, the commands (``python -m recipes``, ``recipes.study``,
``recipes.evaluate``, ``recipes.paper``, ``recipes.export``, ``recipes.code_eval``) and the shipped configs
(``recipes.configs``, found by `config_path`)."""

from __future__ import annotations

import difflib
import os
from importlib import util
from pathlib import Path

CONFIG_FLAGS = ("--config", "-c")


def _config_dirs() -> list[Path]:
    """The folders holding the shipped configs: a source checkout's yaml/ (an editable install maps
    ``recipes.configs`` there but cannot import it, as yaml/ has no ``__init__.py``: one would shadow PyYAML at the
    repository root), then the installed ``recipes/configs`` package data."""
    root = Path(__file__).resolve().parent.parent
    dirs = [root / "yaml"] if (root / "pyproject.toml").is_file() else []  # not site-packages/yaml, which is PyYAML
    try:
        spec = util.find_spec("recipes.configs")
    except (ImportError, ValueError):  # a broken install: the checkout's yaml/ (if any) is all there is
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
        if key in CONFIG_FLAGS and eq:
            out[i] = f"{key}={_shipped(value)}"
        elif i and args[i - 1] in CONFIG_FLAGS:
            out[i] = _shipped(arg)
    return out


def config_values(args: list[str]) -> list[str]:
    """The values of every ``--config X``, ``--config=X``, ``-c X`` and ``-c=X`` in ``args``."""
    values = []
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        if key in CONFIG_FLAGS and eq:
            values.append(value)
        elif i and args[i - 1] in CONFIG_FLAGS:
            values.append(arg)
    return values


def shipped_configs() -> list[str]:
    """Every shipped config as ``yaml/<folder>/<name>.yaml``, sorted."""
    names = {f"yaml/{p.relative_to(d).as_posix()}" for d in _config_dirs() if d.is_dir() for p in d.rglob("*.yaml")}
    return sorted(names)


def check_configs(args: list[str]) -> None:
    """Stop with a message naming each ``--config`` file of ``args`` (after `resolve_configs`) that does not exist,
    with the shipped configs nearest to it, instead of the parser's bare "File does not exist"."""
    problems = []
    for value in config_values(args):
        if os.path.exists(value) or not value.endswith((".yaml", ".yml")):
            continue  # not a file name: an inline YAML/JSON config, which the parser reads
        shipped = shipped_configs()
        wanted = "yaml/" + value.removeprefix("./").removeprefix("yaml/")
        near = difflib.get_close_matches(wanted, shipped, n=4, cutoff=0.75)
        folder = os.path.dirname(wanted) + "/"
        near = near or [name for name in shipped if name.startswith(folder)][:8]
        hint = f"nearest shipped configs: {', '.join(near)}" if near else (
            f"the {len(shipped)} shipped configs are under yaml/ (e.g. {', '.join(shipped[:3])})")
        problems.append(f"--config {value}: no such file (from {os.getcwd()}) and no shipped config of that name; "
                        f"{hint}.")
    if problems:
        raise SystemExit("\n".join(f"error: {p}" for p in problems))


def _shipped(value: str) -> str:
    if os.path.exists(value) or not value.endswith((".yaml", ".yml")):
        return value
    try:
        return str(config_path(value))
    except FileNotFoundError:
        return value  # the command's parser reports the missing file
