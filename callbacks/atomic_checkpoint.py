"""AtomicCheckpointIO: a checkpoint is written beside its target, fsynced and renamed into place, so a kill during a
save never leaves a partial file; one that cannot be read is an error naming it and the newest complete one."""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

log = logging.getLogger(__name__)

# ".<target name>~<host>~<pid>~<token>.ckpt-tmp": hidden, and not "*.ckpt", so `ckpt_path="last"` never picks one
_TMP_SUFFIX = ".ckpt-tmp"
_TMP_NAME = re.compile(r"^\.(?P<target>.+)~(?P<host>[^~]+)~(?P<pid>\d+)~(?P<token>[0-9a-f]+)" + re.escape(_TMP_SUFFIX)
                       + "$")


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that is empty, truncated or otherwise not a readable checkpoint."""

    def __init__(self, path: str, reason: str) -> None:
        folder = Path(path).parent
        complete = complete_checkpoints(folder, exclude=path)
        if complete:
            listed = ", ".join(p.name for p in complete[:3])
            fix = f"Resume from a complete one instead, e.g. --ckpt_path {complete[0]} (newest first: {listed})"
        else:
            fix = f"No complete checkpoint is left in {folder}: start the run again without --ckpt_path"
        super().__init__(f"Checkpoint {path} cannot be read: {reason} (was a save cut short?). {fix}.")
        self.path, self.reason = path, reason


def checkpoint_problem(path: _PATH) -> str | None:
    """Why ``path`` is not a complete checkpoint file, or None when it looks complete.

    Cheap: checks the size and that the zip archive ``torch.save`` writes ends in its central directory (a truncated
    file does not); it does not read the tensors. Files in PyTorch's legacy (non-zip) format are not checked.
    """
    size = os.path.getsize(path)
    if size == 0:
        return "it is empty (0 bytes)"
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] != b"PK":
        return None if magic[:1] == b"\x80" else f"it is not a PyTorch checkpoint ({size} bytes; no zip archive)"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        return f"it is truncated or corrupt ({size} bytes; the zip archive does not read: {e})"
    if not any(name.endswith("data.pkl") for name in names):
        return f"it is not a PyTorch checkpoint ({size} bytes; no data.pkl in the archive)"
    return None


def check_checkpoint(path: _PATH | None) -> None:
    """Raise `CorruptCheckpointError` naming ``path`` when it is a local file that is not a complete checkpoint.

    For code that reads a checkpoint before the Trainer does (LightningCLI reads ``--ckpt_path``'s hyperparameters
    with a bare ``torch.load``); names that are not local files (``"last"``, URLs) pass through.
    """
    if path is None or not _is_local_file_protocol(path) or not os.path.isfile(_local(path)):
        return
    problem = checkpoint_problem(_local(path))
    if problem is not None:
        raise CorruptCheckpointError(str(path), problem)


def complete_checkpoints(folder: _PATH, exclude: _PATH | None = None) -> list[Path]:
    """The ``*.ckpt`` files of ``folder`` that `checkpoint_problem` finds complete, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    skip = os.path.abspath(exclude) if exclude is not None else None
    found = []
    for p in folder.glob("*.ckpt"):
        if p.is_file() and os.path.abspath(p) != skip and checkpoint_problem(p) is None:
            found.append(p)
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _local(path: _PATH) -> str:
    return str(path).removeprefix("file://")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform or file system opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local saves are atomic on the checkpoint's own file system.

    Lightning's ``_atomic_save`` writes through an fsspec transaction, whose temporary file lies in ``TMPDIR``: when
    that is another file system the final "rename" is a copy, so a kill during it leaves the checkpoint truncated (0
    bytes, or cut anywhere) and the temporary file behind, where nothing removes it. Here a save

    1. writes ``torch.save`` output to ``.<name>~<host>~<pid>~<token>.ckpt-tmp`` in the target's folder,
    2. flushes and ``fsync``s it, then ``os.replace``s it onto the target (atomic within one file system) and
       ``fsync``s the folder, so the target is always the old complete checkpoint or the new complete one.

    A kill leaves at most that temporary file, named so no ``*.ckpt`` glob (nor ``ckpt_path="last"``) sees it. The
    first save into a folder, and every load, first removes the temporary files of this naming that a process of
    this host which no longer runs left there (counted in the log). Loading a file that is empty, truncated or
    otherwise unreadable raises `CorruptCheckpointError` naming it and the newest complete checkpoint beside it.
    Remote paths (``s3://`` ...) are saved and loaded as `TorchCheckpointIO` does.

    Example::

        trainer = L.Trainer(plugins=[AtomicCheckpointIO()], callbacks=[ModelCheckpoint(save_last=True)])
        trainer.fit(module, datamodule, ckpt_path="last")

    In YAML: ``trainer: {plugins: [{class_path: recipes.callbacks.atomic_checkpoint.AtomicCheckpointIO}]}``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._swept: set[str] = set()

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Write to a temporary file beside ``path``, fsync, and rename it onto ``path``."""
        if not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError("`Trainer.save_checkpoint(..., storage_options=...)` with `storage_options` arg is not "
                            f"supported for `{type(self).__name__}`. Please implement your custom `CheckpointIO` to "
                            "define how you'd like to use `storage_options`.")
        target = Path(_local(path))
        target.parent.mkdir(parents=True, exist_ok=True)
        self.sweep(target.parent)
        tmp = target.parent / f".{target.name}~{socket.gethostname()}~{os.getpid()}~{secrets.token_hex(4)}" \
                              f"{_TMP_SUFFIX}"
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)  # an exception, not a kill: nothing needs to stay behind
            raise
        _fsync_dir(target.parent)

    @override
    def load_checkpoint(self, path: _PATH, map_location: Any | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Load as `TorchCheckpointIO` does; an unreadable local file raises `CorruptCheckpointError` naming it."""
        if not _is_local_file_protocol(path):
            return super().load_checkpoint(path, map_location, weights_only)
        local = _local(path)
        if os.path.isfile(local):
            self.sweep(Path(local).parent, force=True)
            check_checkpoint(local)
        try:
            return super().load_checkpoint(path, map_location, weights_only)
        except FileNotFoundError:
            raise
        except (EOFError, zipfile.BadZipFile, RuntimeError) as e:  # passed the cheap check, but a record is corrupt
            if not isinstance(e, (EOFError, zipfile.BadZipFile)) and "PytorchStreamReader" not in str(e):
                raise  # not a reading error (weights_only refusing a class is an UnpicklingError: re-raised as is)
            raise CorruptCheckpointError(local, f"a record does not read ({type(e).__name__}: {e})") from e

    def sweep(self, folder: _PATH, force: bool = False) -> int:
        """Remove the temporary files of this class's naming in ``folder`` that processes of this host which no
        longer run left behind (a kill during a save); once per folder unless ``force``. Returns how many."""
        folder = Path(folder)
        key = os.path.abspath(folder)
        if key in self._swept and not force:
            return 0
        self._swept.add(key)
        host, removed, size = socket.gethostname(), 0, 0
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return 0
        for entry in entries:
            match = _TMP_NAME.match(entry.name)
            if match is None or match["host"] != host or _alive(int(match["pid"])):
                continue
            try:
                size += entry.stat().st_size
                os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:  # another process swept it first
                continue
        if removed:
            log.warning("%s: removed %d temporary checkpoint file(s) (%.1f MB) left by saves that were killed",
                        folder, removed, size / 2**20)
        return removed
