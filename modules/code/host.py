"""Host side of the sandbox: what this machine supports (`sandbox_capabilities`), sandbox uid leases, kill-by-uid.

Each concurrent sandbox runs as its own unprivileged uid leased with ``flock``, so ``RLIMIT_NPROC`` caps that sandbox
alone and "kill every process of this uid" can only hit sandboxed processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PROBE_UID = 63999  # used only by the probe, in a short-lived forked child
_PROBE = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def child(fn):
    pid = os.fork()
    if pid == 0:
        try:
            ok = fn()
        except Exception:
            ok = False
        os._exit(0 if ok else 1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
def setuid():
    os.setgroups([]); os.setresgid(%(uid)d, %(uid)d, %(uid)d); os.setresuid(%(uid)d, %(uid)d, %(uid)d)
    return os.getuid() == %(uid)d
def mount():
    if libc.unshare(0x00020000) != 0:
        return False
    return libc.mount(None, b"/", None, 16384 | (1 << 18), None) == 0 and \
        libc.mount(b"tmpfs", sys.argv[1].encode(), b"tmpfs", 6, b"size=1m") == 0
def pidfd():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    fd = os.pidfd_open(pid); os.close(fd); os.waitpid(pid, 0)
    return True
print(child(setuid), child(lambda: libc.unshare(0x40000000) == 0), child(mount),
      child(lambda: libc.unshare(0x20000000) == 0), child(pidfd))
"""


@dataclass(frozen=True)
class SandboxCapabilities:
    """What the sandbox can use on this machine, detected once per process by `sandbox_capabilities`."""

    root: bool
    setuid: bool  # can drop to a dedicated unprivileged uid (needs root)
    net_ns: bool  # unshare(CLONE_NEWNET): no network interface but a downed loopback
    mount_ns: bool  # unshare(CLONE_NEWNS) + tmpfs mounts: private /tmp, hidden home and repo folders
    pid_ns: bool  # unshare(CLONE_NEWPID): every descendant dies with the sandbox's pid 1
    pidfd: bool  # os.pidfd_open (Linux >= 5.3), needed by the harness to wait on a child with a deadline

    @property
    def isolated(self) -> bool:
        """True when every layer is available (what CI, running as root, should report)."""
        return self.setuid and self.net_ns and self.mount_ns and self.pid_ns and self.pidfd

    def as_dict(self) -> dict[str, bool]:
        return {"root": self.root, "setuid": self.setuid, "net_ns": self.net_ns, "mount_ns": self.mount_ns,
                "pid_ns": self.pid_ns, "pidfd": self.pidfd, "isolated": self.isolated}


@functools.cache
def sandbox_capabilities(python: str = sys.executable) -> SandboxCapabilities:
    """Probe (in throw-away children) whether this machine lets us setuid, unshare net/mount/pid and use pidfds."""
    root = os.geteuid() == 0
    flags = [False] * 5
    with tempfile.TemporaryDirectory(prefix="sandbox-probe-") as scratch:
        try:
            out = subprocess.run([python, "-I", "-c", _PROBE % {"uid": PROBE_UID}, scratch], capture_output=True,
                                 text=True, timeout=60, env={"PATH": "/usr/bin:/bin"}, check=True).stdout.split()
            flags = [word == "True" for word in out]
        except (subprocess.SubprocessError, OSError) as e:
            log.warning("sandbox capability probe failed (%s); assuming no isolation is available", e)
    caps = SandboxCapabilities(root, flags[0] and root, flags[1], flags[2], flags[3], flags[4])
    if not caps.isolated:
        log.warning(
            "sandbox: partial isolation on this machine (%s). Generated programs run %s; run as root on Linux for "
            "a dedicated uid, network/mount/pid namespaces. See docs/execution.md.",
            ", ".join(f"{k}={v}" for k, v in caps.as_dict().items()),
            "as a dedicated uid" if caps.setuid else "AS THE CURRENT USER (they can read its files and processes)",
        )
    return caps


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


@dataclass
class UidLease:
    """A leased uid. Set ``needs_sweep = False`` when the kernel already guarantees none of its processes is left
    (the sandbox's pid namespace ended normally); otherwise release kills every process of the uid."""

    uid: int
    needs_sweep: bool = True


_swept_once: set[int] = set()  # uids this process has already found empty at least once


@contextlib.contextmanager
def lease_uid(base: int, count: int) -> Iterator[UidLease]:
    """Hold one uid of ``[base, base + count)`` exclusively (across threads and processes) for one sandbox run."""
    lock_dir = Path(tempfile.gettempdir()) / "rlhf-sandbox-uids"
    lock_dir.mkdir(mode=0o700, exist_ok=True)
    for uid in range(base, base + count):
        if not _free_uid(uid):
            continue
        fd = os.open(lock_dir / f"{uid}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        lease = UidLease(uid)
        try:
            if uid not in _swept_once:  # e.g. left by a process that died while holding this uid
                if (left := kill_uid(uid)) > 0:
                    log.warning("sandbox: killed %d processes left over by an earlier run as uid %d", left, uid)
                _swept_once.add(uid)
            yield lease
        finally:
            try:
                if lease.needs_sweep:
                    kill_uid(uid)
            finally:
                os.close(fd)  # closing the descriptor releases the flock
        return
    raise RuntimeError(f"sandbox: all {count} uids from {base} are in use; raise SandboxConfig.uid_count")


class ForkServer:
    """One long-lived root harness process that forks a fresh H per job (see
    `recipes.modules.code.sandbox.forkserver.serve`).

    Requests are serialized by a lock (a round trip is a fork, ~1 ms); the server exits when this object's socket
    closes, i.e. when this process dies. `spawn` restarts a server that died once before giving up.
    """

    _instances: dict[tuple[int, str, str], ForkServer] = {}
    _create_lock = threading.Lock()

    def __init__(self, python: str, launch: str, env: dict[str, str]) -> None:
        self.python, self.launch, self.env = python, launch, env
        self.lock = threading.Lock()
        self._start()

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([self.python, "-I", "-S", "-c", self.launch, str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, env=self.env, start_new_session=True)
        theirs.close()
        self.sock = ours

    @classmethod
    def get(cls, python: str, launch: str, env: dict[str, str]) -> ForkServer:
        key = (os.getpid(), python, launch)  # a forked child (e.g. a DataLoader worker) gets its own server
        with cls._create_lock:
            if key not in cls._instances:
                cls._instances[key] = cls(python, launch, env)
            return cls._instances[key]

    def spawn(self, spec_fd: int, out_fd: int, err_fd: int) -> tuple[int, int]:
        """Fork an H whose fds 0, 1, 2 are the given descriptors; return its pid and a pidfd (caller closes it)."""
        with self.lock:
            for attempt in range(2):
                try:
                    socket.send_fds(self.sock, [b"job"], [spec_fd, out_fd, err_fd])
                    msg, fds, _, _ = socket.recv_fds(self.sock, 16, 1)
                    if len(msg) == 8 and len(fds) == 1:
                        return int.from_bytes(msg, "little"), fds[0]
                except OSError as e:
                    log.warning("sandbox fork server failed (%s); restarting it", e)
                if attempt == 0:
                    self.close()
                    self._start()
        raise RuntimeError("sandbox: the fork server does not answer; see its stderr above")

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
