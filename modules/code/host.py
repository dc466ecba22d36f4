"""Host side of the sandbox: sandbox uid leases, kill-by-uid and the release check (what this machine supports is in
`recipes.modules.code.capabilities`, the per-job cgroup in `recipes.modules.code.cgroups`).

Each concurrent sandbox runs as its own unprivileged uid leased with ``flock``, so ``RLIMIT_NPROC`` caps that sandbox
alone and "kill every process of this uid" can only hit sandboxed processes.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import logging
import os
import pwd
import shutil
import signal
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from recipes.modules.code import cgroups
from recipes.modules.code.capabilities import SandboxCapabilities, sandbox_capabilities  # noqa: F401 (re-exported)
from recipes.modules.code.sandbox import kernel

log = logging.getLogger(__name__)

@functools.cache
def _free_uid(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return False
    except KeyError:
        return True


def processes_of_uid(uid: int) -> list[int]:
    """Pids of every process whose real, effective, saved or filesystem uid is ``uid`` (host /proc scan)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        if uid in map(int, line.split()[1:]):
                            found.append(int(entry))
                        break
        except (OSError, ValueError):
            continue  # exited while we looked
    return found


def kill_uid(uid: int, attempts: int = 50) -> int:
    """SIGKILL every process of ``uid`` until none is left; return how many were killed (0 in the normal case)."""
    killed = 0
    for _ in range(attempts):
        pids = processes_of_uid(uid)
        if not pids:
            return killed
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.005)
    raise RuntimeError(f"sandbox: processes of uid {uid} survive repeated SIGKILL: {processes_of_uid(uid)}")


LOCK_DIRS = ("/run/rlhf-recipes-sandbox", "/var/lib/rlhf-recipes-sandbox")  # the first whose parent exists
_CLEAN, _HELD, _QUARANTINED = b"clean", b"held", b"quarantined"  # lock file contents: how its last holder left it
_STATE_BYTES = 16
LEFTOVER_KINDS = ("processes", "ipc", "keys", "files")


def lock_dir() -> Path:
    """The machine-wide folder of uid lock files: a fixed path (never under ``TMPDIR``, which differs between
    evaluators), created 0700 by root. Refuses a folder that is a symlink, not root's, or open to others."""
    path = Path(next((d for d in LOCK_DIRS if os.path.isdir(os.path.dirname(d))), LOCK_DIRS[-1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
        raise RuntimeError(f"sandbox: uid lock folder {path} must be a directory owned by root with mode 0700 "
                           f"(found mode {oct(st.st_mode)}, owner {st.st_uid}); remove it and run again")
    return path


def key_count(uid: int) -> int:
    """Keys the kernel holds for ``uid`` (``/proc/key-users``; root cannot *see* other uids' keys in /proc/keys)."""
    with contextlib.suppress(OSError), open("/proc/key-users", "rb") as f:
        for line in f:
            head, _, rest = line.partition(b":")
            if int(head) == uid:
                return int(rest.split()[1].split(b"/")[0])
    return 0


@functools.cache
def _uid_keyrings() -> int:
    """Keyrings every used uid keeps for good and that clear_user_keyrings empties: user, user-session, persistent."""
    return 2 + os.path.exists("/proc/sys/kernel/keys/persistent_keyring_expiry")


def _clear_keys_as(uid: int) -> bool:
    """Empty ``uid``'s long-lived keyrings from a child running as that uid (root cannot clear them: no capability
    overrides key permissions). The child makes system calls only, so forking this threaded process is safe."""
    kernel.libc_handle()  # load ctypes and libc before the fork
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            kernel.join_fresh_session_keyring()
            kernel.clear_user_keyrings()
            os._exit(0)
        finally:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def _remove_keys(uid: int, wait_s: float = 3.0) -> tuple[int, bool]:
    """Keys of ``uid`` beyond its own keyrings: (how many, whether none is left after clearing and garbage collection,
    which the kernel does asynchronously, 30-100 ms here)."""
    left = key_count(uid) - _uid_keyrings()
    if left <= 0:
        return 0, True
    cleared = _clear_keys_as(uid)
    deadline = time.monotonic() + wait_s
    while key_count(uid) > _uid_keyrings() and time.monotonic() < deadline:
        time.sleep(0.01)
    return left, cleared and key_count(uid) <= _uid_keyrings()


def _remove_sysv_ipc(uid: int) -> int:
    """Remove the host IPC namespace's SysV segments, semaphore sets and queues owned or created by ``uid``."""
    removed = 0
    libc = kernel.libc_handle()
    for kind, remove in (("shm", lambda i: libc.shmctl(i, 0, None)), ("sem", lambda i: libc.semctl(i, 0, 0)),
                         ("msg", lambda i: libc.msgctl(i, 0, None))):  # IPC_RMID = 0
        try:
            with open(f"/proc/sysvipc/{kind}", "rb") as f:
                header, *rows = f.read().split(b"\n")
        except OSError:
            continue
        names = header.split()
        for row in filter(None, rows):
            fields = dict(zip(names, row.split()))
            if uid in (int(fields[b"uid"]), int(fields[b"cuid"])) and remove(int(fields[names[1]])) == 0:
                removed += 1
    return removed


def _remove_files(uid: int, dirs: tuple[str, ...], top_only: tuple[str, ...]) -> int:
    """Remove what ``uid`` owns in its work dirs (the whole tree) and in shared temp dirs (their top level only)."""
    found = []
    for root in dirs:
        for parent, subdirs, files in os.walk(root):
            found += [os.path.join(parent, n) for n in subdirs + files]
    for root in top_only:
        with contextlib.suppress(OSError):
            found += [e.path for e in os.scandir(root)]
    removed = 0
    for path in sorted(found, key=len, reverse=True):  # children before their folders
        with contextlib.suppress(OSError):
            if os.lstat(path).st_uid == uid:
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
                removed += 1
    return removed


@dataclass
class UidLease:
    """A leased uid. Set ``needs_sweep = False`` when the kernel already guarantees none of its processes is left
    (the sandbox's pid namespace ended normally). ``dirs`` (whole trees) and ``shared_dirs`` (top level) are searched
    for its files at release; ``leftovers`` then counts what the release check found and removed."""

    uid: int
    needs_sweep: bool = True
    dirs: tuple[str, ...] = ()
    shared_dirs: tuple[str, ...] = ()
    leftovers: dict[str, int] = field(default_factory=dict)


def sweep_uid(uid: int, processes: bool = True, dirs: tuple[str, ...] = (), shared_dirs: tuple[str, ...] = ()
              ) -> tuple[dict[str, int], bool]:
    """Remove everything ``uid`` left on the host: processes (when ``processes``: a /proc scan), SysV IPC objects,
    keys, files in ``dirs``/``shared_dirs``. Returns the counts and whether the uid is clean enough to reuse."""
    found = dict.fromkeys(LEFTOVER_KINDS, 0)
    if processes:
        found["processes"] = kill_uid(uid)
    found["ipc"] = _remove_sysv_ipc(uid)
    found["keys"], keys_gone = _remove_keys(uid)
    found["files"] = _remove_files(uid, dirs, shared_dirs)
    return found, keys_gone


def _write_state(fd: int, state: bytes) -> None:
    """Overwrite in place, padded to a fixed width: truncating frees the block, which costs up to milliseconds per
    job on a disk mounted with ``discard``."""
    os.pwrite(fd, state.ljust(_STATE_BYTES), 0)


def _read_state(fd: int) -> bytes:
    return os.pread(fd, 32, 0).rstrip()


@contextlib.contextmanager
def lease_uid(base: int, count: int) -> Iterator[UidLease]:
    """Hold one uid of ``[base, base + count)`` exclusively for one sandbox run, machine-wide: an ``flock`` on a file
    in `lock_dir`, released by the kernel if the holder dies. A uid whose last holder did not leave it clean is swept
    first; one that cannot be cleaned (keys it cannot clear) is quarantined and never leased again."""
    folder = lock_dir()
    for uid in range(base, base + count):
        if not _free_uid(uid):
            continue
        fd = os.open(folder / f"{uid}.lock", os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        state = _read_state(fd)
        if state == _QUARANTINED:
            os.close(fd)
            continue
        if state != _CLEAN:  # a new uid, or its last holder died (or failed) while holding it
            found, reusable = sweep_uid(uid)
            if any(found.values()):
                log.warning("sandbox: removed what an earlier run left as uid %d: %s", uid, found)
            if not reusable:
                _quarantine(fd, uid)
                continue
        _write_state(fd, _HELD)
        lease = UidLease(uid)
        try:
            yield lease
        finally:
            try:
                lease.leftovers, reusable = sweep_uid(uid, lease.needs_sweep, lease.dirs, lease.shared_dirs)
                if reusable:
                    _write_state(fd, _CLEAN)
                else:
                    _quarantine(fd, uid)
                    fd = -1
            finally:
                if fd >= 0:
                    os.close(fd)  # closing the descriptor releases the flock
        return
    raise RuntimeError(f"sandbox: all {count} uids from {base} are in use; raise SandboxConfig.uid_count")


@atexit.register
def remove_kept_cgroups() -> None:
    """At exit: rmdir the job cgroups this process made (`recipes.modules.code.cgroups.job_cgroup` keeps them per
    uid), each only while holding that uid's lock, so that another evaluator's job in it is never disturbed."""
    for folder in sorted(cgroups._CREATED):
        uid = folder.rsplit(cgroups.PREFIX, 1)[-1]
        with contextlib.suppress(OSError, ValueError):
            fd = os.open(lock_dir() / f"{int(uid)}.lock", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: leased elsewhere, keep it
                os.rmdir(folder)  # fails (EBUSY) if anything is in it: then it stays for the uid's next lease
            finally:
                os.close(fd)
        cgroups._CREATED.discard(folder)


def _quarantine(fd: int, uid: int) -> None:
    _write_state(fd, _QUARANTINED)
    os.close(fd)
    log.error("sandbox: uid %d keeps keys that cannot be cleared; quarantined (delete %s/%d.lock to reuse it)",
              uid, lock_dir(), uid)
