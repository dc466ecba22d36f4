"""Where a run's files go and where its checkpoints are found: loggers without a ``save_dir`` write under
``trainer.default_root_dir``, and ``--ckpt_path last`` names the newest complete checkpoint of the run's folders."""

from __future__ import annotations

import glob
import logging
import os
import zipfile
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

# Where Lightning puts checkpoints below a run folder: <root>/checkpoints (no logger, or a logger with version ""),
# <root>/version_N/checkpoints (CSV/TensorBoard with name ""), <root>/lightning_logs/version_N/checkpoints (name
# left at its default), <root>/<project>/<run id>/checkpoints (W&B).
CHECKPOINT_GLOBS = ("checkpoints/*.ckpt", "*/checkpoints/*.ckpt", "*/*/checkpoints/*.ckpt")


def _items(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _init_args(spec: Any) -> Any:
    """The ``init_args`` of a parsed ``class_path`` spec (a jsonargparse Namespace), else None."""
    return getattr(spec, "init_args", None) if hasattr(spec, "class_path") else None


def route_loggers(trainer: Any) -> None:
    """Give every logger of the parsed ``trainer`` config whose ``save_dir`` is unset (``None``) or the current folder
    (``"."``, W&B's default) the run folder, ``trainer.default_root_dir`` (itself the current folder when unset), so
    overriding ``--trainer.default_root_dir`` moves the logs, and with them the checkpoints and the HF export."""
    root = trainer.get("default_root_dir") or os.getcwd()
    for spec in _items(trainer.get("logger")):
        init = _init_args(spec)
        if init is not None and "save_dir" in init and init.save_dir in (None, "."):
            init.save_dir = str(root)


def route_loggers_on_parse(parser: Any) -> None:
    """Make ``parser.parse_args`` (a LightningCLI's jsonargparse parser) apply `route_loggers` before it validates:
    a logger class whose ``save_dir`` is required (CSV, TensorBoard) would otherwise be refused for leaving it out."""
    parse = parser.parse_args

    def parse_args(*args: Any, **kwargs: Any) -> Any:
        config = parse(*args, _skip_validation=True, **kwargs)
        sub = config.get("subcommand")
        trainer = (config[sub] if sub else config).get("trainer")
        if trainer is not None:
            route_loggers(trainer)
        try:
            parser.validate(config)
        except (TypeError, KeyError) as e:
            parser.error(str(e), e)
        return config

    parser.parse_args = parse_args


def is_complete(path: str) -> bool:
    """Whether the checkpoint at ``path`` was written to the end: a ``torch.save`` file is a zip archive whose
    directory is written last; a distributed checkpoint folder gets its ``.metadata`` last, a DeepSpeed one its
    ``latest`` tag file."""
    if os.path.isfile(path):
        return zipfile.is_zipfile(path)
    return os.path.isfile(os.path.join(path, ".metadata")) or os.path.isfile(os.path.join(path, "latest"))


def _search_patterns(trainer: Any) -> Iterator[str]:
    roots = [trainer.get("default_root_dir") or os.getcwd()]
    roots += [init.save_dir for init in map(_init_args, _items(trainer.get("logger")))
              if init is not None and init.get("save_dir")]
    for root in dict.fromkeys(os.path.normpath(str(r)) for r in roots):
        yield from (os.path.join(root, pattern) for pattern in CHECKPOINT_GLOBS)
    for spec in _items(trainer.get("callbacks")):  # a ModelCheckpoint given its own folder
        init = _init_args(spec)
        if init is not None and str(spec.class_path).endswith("ModelCheckpoint") and init.get("dirpath"):
            yield os.path.join(str(init.dirpath), "*.ckpt")


def resolve_last(config: Any) -> str | None:
    """Replace ``ckpt_path: last`` of a subcommand's parsed ``config`` by `last_checkpoint` (Lightning would look only
    in the new version folder of this run, find nothing and train from step 0) and return it; None for any other
    value. Stops naming every place searched when there is none."""
    if config.get("ckpt_path") != "last":
        return None
    try:
        config.ckpt_path = last_checkpoint(config.trainer)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    return config.ckpt_path


def last_checkpoint(trainer: Any) -> str:
    """The newest (by modification time) complete checkpoint in the folders of the parsed ``trainer`` config.

    Raises:
        FileNotFoundError: naming every place searched, when none holds a complete checkpoint.
    """
    patterns = list(_search_patterns(trainer))
    found: dict[str, float] = {}
    skipped = []
    for path in {os.path.realpath(p) for pattern in patterns for p in glob.glob(pattern)}:
        if is_complete(path):
            found[path] = os.path.getmtime(path)
        else:
            skipped.append(path)
    for path in skipped:
        log.warning("--ckpt_path last: skipping %s, an incomplete checkpoint (a save that was cut off)", path)
    if not found:
        raise FileNotFoundError(
            "--ckpt_path last: no complete checkpoint in " + ", ".join(patterns)
            + (f" ({len(skipped)} incomplete)" if skipped else "")
            + ". Fit first (checkpoints go under trainer.default_root_dir), set --trainer.default_root_dir to the "
            "run's folder, or pass --ckpt_path FILE.")
    newest = max(found, key=found.__getitem__)
    log.info("--ckpt_path last: %s (newest of %d complete checkpoints)", newest, len(found))
    return newest
