"""AtomicCheckpointIO: a kill during a save leaves the previous checkpoint whole (Lightning's default, with TMPDIR on
another file system, left a 0-byte last.ckpt and its temporary file), stale temporary files are swept, and a
truncated or empty checkpoint is an error naming the file and the newest complete one."""

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.plugins.io import TorchCheckpointIO

from recipes.callbacks.atomic_checkpoint import (
    AtomicCheckpointIO,
    CorruptCheckpointError,
    check_checkpoint,
    checkpoint_problem,
)
from tests.conftest import REPO, quiet_trainer

TMP_NAME = re.compile(r"^\.(?P<target>.+)~(?P<host>[^~]+)~(?P<pid>\d+)~[0-9a-f]+\.ckpt-tmp$")


def _env(**extra):
    """The child's environment: this repository first on the path, and whatever path the parent had after it."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def _temporaries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if TMP_NAME.match(p.name)) if folder.exists() else []


@pytest.fixture
def other_fs_tmpdir(tmp_path):
    """A fresh folder on another file system than ``tmp_path`` (under ``/dev/shm``), removed afterwards; None where
    there is none."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev or not os.access(shm, os.W_OK):
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="atomic-ckpt-test-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- a kill during a save: Lightning's default against AtomicCheckpointIO ------------------------------------------
KILLED_SAVE = r"""
import os, shutil, signal, sys, torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from recipes.callbacks.atomic_checkpoint import AtomicCheckpointIO

kind, path = sys.argv[1], sys.argv[2]
io = TorchCheckpointIO() if kind == "torch" else AtomicCheckpointIO()
io.save_checkpoint({"step": 1, "w": torch.arange(50_000.0)}, path)

def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if kind == "torch":  # fsspec commits with shutil.move: across file systems copy2 opens the target "wb", then copies
    shutil._fastcopy_sendfile = shutil.copyfileobj = killed
else:  # the moment before the new checkpoint replaces the old one
    os.replace = killed
io.save_checkpoint({"step": 2, "w": torch.arange(50_000.0)}, path)
"""


def _killed_save(kind: str, path: Path, tmpdir: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, kind, str(path)], cwd=REPO, env=_env(TMPDIR=str(tmpdir)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def test_lightning_default_leaves_an_empty_checkpoint_when_killed_with_tmpdir_elsewhere(tmp_path, other_fs_tmpdir):
    """The fault, reproduced: TorchCheckpointIO with TMPDIR on another file system, killed while committing the save,
    leaves last.ckpt at 0 bytes (a bare EOFError at every resume) and its temporary file in TMPDIR."""
    if other_fs_tmpdir is None:
        pytest.skip("needs /dev/shm on another file system than the test's folder")
    path = tmp_path / "last.ckpt"
    _killed_save("torch", path, other_fs_tmpdir)
    assert path.stat().st_size == 0
    assert [p.name for p in other_fs_tmpdir.iterdir() if p.name.startswith("tmp")], "fsspec's temporary file is gone"
    with pytest.raises(EOFError):
        TorchCheckpointIO().load_checkpoint(path)
    with pytest.raises(CorruptCheckpointError, match=rf"Checkpoint {re.escape(str(path))} cannot be read: it is "
                                                     r"empty \(0 bytes\)"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_a_kill_during_an_atomic_save_keeps_the_previous_checkpoint(tmp_path, caplog):
    """The same kill with AtomicCheckpointIO: the old checkpoint is whole, TMPDIR is not used, and the temporary file
    (beside the checkpoint, invisible to ``*.ckpt``) is removed, with a count, by the next load."""
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    path = tmp_path / "ckpt" / "last.ckpt"
    _killed_save("atomic", path, tmpdir)
    assert list(tmpdir.iterdir()) == []
    left = _temporaries(path.parent)
    assert len(left) == 1 and TMP_NAME.match(left[0].name)["target"] == "last.ckpt"
    assert [p.name for p in path.parent.glob("*.ckpt")] == ["last.ckpt"]
    with caplog.at_level("WARNING"):
        state = AtomicCheckpointIO().load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.arange(50_000.0))
    assert _temporaries(path.parent) == []
    assert "removed 1 temporary checkpoint file(s)" in caplog.text


def test_an_exception_during_a_save_leaves_nothing_behind(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "a" / "b.ckpt"
    io.save_checkpoint({"step": 1}, path)  # creates the folder
    with pytest.raises(Exception):
        io.save_checkpoint({"step": 2, "bad": lambda: None}, path)  # a lambda does not pickle
    assert io.load_checkpoint(path) == {"step": 1} and _temporaries(path.parent) == []
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({}, path, storage_options={"x": 1})


def test_sweep_removes_only_its_own_files_from_processes_that_are_gone(tmp_path):
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".last.ckpt~{host}~{dead.pid}~00ff{'.ckpt-tmp'}"
    live = tmp_path / f".last.ckpt~{host}~{os.getpid()}~00ff.ckpt-tmp"
    elsewhere = tmp_path / f".last.ckpt~another-host~{dead.pid}~00ff.ckpt-tmp"
    foreign = tmp_path / ".last.ckpt.tmp"
    for p in (stale, live, elsewhere, foreign):
        p.write_bytes(b"x" * 10)
    io = AtomicCheckpointIO()
    assert io.sweep(tmp_path) == 1
    assert not stale.exists() and live.exists() and elsewhere.exists() and foreign.exists()
    stale.write_bytes(b"x")
    assert io.sweep(tmp_path) == 0  # once per folder ...
    io.save_checkpoint({"step": 1}, tmp_path / "x.ckpt")
    assert stale.exists()  # ... saves included
    AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "x.ckpt")  # a new run: the first save sweeps
    assert not stale.exists()


# --- unreadable checkpoints name the file ---------------------------------------------------------------------------
def _fit(tmp_path: Path, steps: int, ckpt_path=None):
    callback = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, save_last=True)
    trainer = quiet_trainer(max_steps=steps, enable_checkpointing=True, callbacks=[callback],
                            plugins=[AtomicCheckpointIO()], limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(BoringModel(), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_resume_from_a_damaged_checkpoint_names_it_and_the_newest_complete_one(tmp_path, damage):
    _fit(tmp_path, 3)
    last = tmp_path / "ckpt" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    os.utime(last, (time.time() + 5, time.time() + 5))  # newest, as a save that was cut short would be
    reason = "it is truncated or corrupt" if damage == "truncated" else r"it is empty \(0 bytes\)"
    newest = re.escape(str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt"))
    for ckpt_path in (str(last), "last"):
        with pytest.raises(CorruptCheckpointError, match=rf"Checkpoint {re.escape(str(last))} cannot be read: "
                                                         rf"{reason}.*--ckpt_path {newest} \(newest first: "):
            _fit(tmp_path, 5, ckpt_path=ckpt_path)
    assert _fit(tmp_path, 5, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt")).global_step == 5


def test_a_corrupt_record_inside_a_whole_archive_is_named_too(tmp_path):
    path = tmp_path / "x.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.arange(10_000.0)}, path)
    data = bytearray(path.read_bytes())
    header = data.rfind(b"PK\x03\x04", 0, data.find(b"data/0"))  # the tensor record's own header; the directory reads
    data[header:header + 4] = b"XXXX"
    path.write_bytes(bytes(data))
    assert checkpoint_problem(path) is None
    with pytest.raises(CorruptCheckpointError, match=r"x.ckpt cannot be read: a record does not read"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_check_checkpoint_passes_names_that_are_not_files(tmp_path):
    for name in (None, "last", "hpc", "s3://bucket/x.ckpt", str(tmp_path / "missing.ckpt")):
        check_checkpoint(name)
    good = tmp_path / "good.ckpt"
    torch.save({"a": 1}, good)
    check_checkpoint(good)
    (tmp_path / "text.ckpt").write_text("hello")
    with pytest.raises(CorruptCheckpointError, match=r"text.ckpt cannot be read: it is not a PyTorch checkpoint.*No "
                                                     r"complete checkpoint is left|good.ckpt"):
        check_checkpoint(tmp_path / "text.ckpt")


# --- killing a real run during its saves, 20 times -----------------------------------------------------------------
KILL_OVERRIDES = """
trainer:
  max_steps: {steps}
  enable_progress_bar: false
  logger: false
  limit_val_batches: 0
  default_root_dir: {root}
  plugins:
    - class_path: recipes.callbacks.atomic_checkpoint.AtomicCheckpointIO
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {root}/ckpt, every_n_train_steps: 1, save_last: true}}
data:
  init_args: {{max_rows: 400, batch_size: 4, max_length: 256}}
"""


def _launch(root: Path, steps: int, tmpdir: Path, resume: bool) -> subprocess.Popen:
    root.mkdir(exist_ok=True)
    (root / "override.yaml").write_text(KILL_OVERRIDES.format(root=root, steps=steps))
    cmd = [sys.executable, "-m", "recipes", "fit", "--config", "yaml/tiny/sft.yaml", "--config",
           str(root / "override.yaml"), *(["--ckpt_path", "last"] if resume else [])]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(TMPDIR=str(tmpdir)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _kill_during_a_save(proc: subprocess.Popen, folder: Path, nth: int, rng: random.Random) -> None:
    """SIGKILL ``proc`` a random 0-3 ms after its ``nth`` temporary checkpoint file appears."""
    seen: set[str] = set()
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before it was killed:\n"
                        f"{proc.stderr.read().decode()[-3000:]}")
        seen |= {p.name for p in _temporaries(folder) if int(TMP_NAME.match(p.name)["pid"]) == proc.pid}
        if len(seen) >= nth:
            time.sleep(rng.uniform(0, 0.003))
            break
        time.sleep(0.0005)
    else:
        pytest.fail("no checkpoint save seen in 300 s")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


@pytest.mark.slow  # 22 CLI processes: about 4 minutes on 2 busy cores
def test_killing_during_saves_20_times_never_leaves_the_run_unable_to_resume(tmp_path, other_fs_tmpdir):
    """A tiny SFT fit checkpoints every step (a step file and last.ckpt); it is SIGKILLed during a save, at random
    moments, 20 times, each time resumed with ``--ckpt_path last`` (TMPDIR on another file system where there is one).
    After every kill each ``*.ckpt`` file is complete and only the killed process's temporary file is left; the
    final resume finishes with no temporary file and the weights of a run that was never killed."""
    steps, rng = 80, random.Random(0)
    tmpdir = other_fs_tmpdir or tmp_path / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    root, folder = tmp_path / "killed", tmp_path / "killed" / "ckpt"
    mid_save = 0
    for _ in range(20):
        proc = _launch(root, steps, tmpdir, resume=(folder / "last.ckpt").exists())
        _kill_during_a_save(proc, folder, rng.randint(1, 6), rng)  # each step saves its step file, then last.ckpt
        left = _temporaries(folder)
        assert all(int(TMP_NAME.match(p.name)["pid"]) == proc.pid for p in left), left  # older ones were swept
        mid_save += bool(left)
        for ckpt in folder.glob("*.ckpt"):
            torch.load(ckpt, map_location="cpu", weights_only=False)  # complete: raises otherwise
    assert mid_save >= 10, f"only {mid_save} of 20 kills landed during a save"
    last = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=False)
    assert 0 < last["global_step"] < steps

    final = _launch(root, steps, tmpdir, resume=True)
    reference = _launch(tmp_path / "never_killed", steps, tmpdir, resume=False)
    for proc in (final, reference):
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err.decode()[-3000:]
    assert _temporaries(folder) == []
    assert [p for p in tmpdir.rglob("*") if p.is_file() and p.stat().st_size > 100_000] == []
    resumed = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=False)
    uninterrupted = torch.load(tmp_path / "never_killed" / "ckpt" / "last.ckpt", map_location="cpu",
                               weights_only=False)
    assert resumed["global_step"] == uninterrupted["global_step"] == steps
    for key, value in uninterrupted["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0, msg=key)
