"""What the sandbox can use on this machine (`sandbox_capabilities`): a dedicated uid, namespaces, pidfds,
libseccomp and a writable cgroup, each probed once per process in throw-away children."""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipes.modules.code import cgroups

log = logging.getLogger(__name__)

SANDBOX = Path(__file__).resolve().with_name("sandbox")
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
def seccomp():
    sys.path.append(sys.argv[2])
    import seccomp
    return seccomp.selftest()
print(child(setuid), child(lambda: libc.unshare(0x40000000) == 0), child(mount),
      child(lambda: libc.unshare(0x20000000) == 0), child(pidfd), child(seccomp))
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
    seccomp: bool = False  # the system libseccomp loads and its filter refuses unshare (sandbox/seccomp.py)
    cgroup: str = "none"  # "cgroup2" / "cgroup1": a job cgroup can be made here (recipes.modules.code.cgroups)

    @property
    def isolated(self) -> bool:
        """True when every layer is available (what CI, running as root, should report)."""
        return self.setuid and self.net_ns and self.mount_ns and self.pid_ns and self.pidfd

    def as_dict(self) -> dict[str, bool]:
        return {"root": self.root, "setuid": self.setuid, "net_ns": self.net_ns, "mount_ns": self.mount_ns,
                "pid_ns": self.pid_ns, "pidfd": self.pidfd, "seccomp": self.seccomp, "cgroup": self.cgroup,
                "isolated": self.isolated}


@functools.cache
def sandbox_capabilities(python: str = sys.executable) -> SandboxCapabilities:
    """Probe (in throw-away children) whether this machine lets us setuid, unshare net/mount/pid, use pidfds and
    libseccomp; and which cgroup a job can get."""
    root = os.geteuid() == 0
    flags = [False] * 6
    with tempfile.TemporaryDirectory(prefix="sandbox-probe-") as scratch:
        try:
            out = subprocess.run([python, "-I", "-c", _PROBE % {"uid": PROBE_UID}, scratch,
                                  str(SANDBOX)], capture_output=True,
                                 text=True, timeout=60, env={"PATH": "/usr/bin:/bin"}, check=True).stdout.split()
            flags = [word == "True" for word in out]
        except (subprocess.SubprocessError, OSError) as e:
            log.warning("sandbox capability probe failed (%s); assuming no isolation is available", e)
    layout = cgroups.detect() if root else None
    caps = SandboxCapabilities(root, flags[0] and root, flags[1], flags[2], flags[3], flags[4], flags[5],
                               layout.name if layout is not None else "none")
    if not caps.isolated:
        log.warning(
            "sandbox: partial isolation on this machine (%s). Generated programs run %s; run as root on Linux for "
            "a dedicated uid, network/mount/pid namespaces. See docs/execution.md.",
            ", ".join(f"{k}={v}" for k, v in caps.as_dict().items()),
            "as a dedicated uid" if caps.setuid else "AS THE CURRENT USER (they can read its files and processes)",
        )
    if not caps.seccomp:
        log.warning("sandbox: libseccomp is not usable here; programs may call unshare, mount, keyctl, ptrace, "
                    "memfd_create ... (only the namespaces, the uid and the rlimits apply). See docs/execution.md.")
    return caps


def memory_bound(config: Any, caps: SandboxCapabilities) -> str:
    """What bounds the memory of a sandbox under ``config`` (a `recipes.modules.code.execution.SandboxConfig`):
    ``"cgroup2"``/``"cgroup1"`` (a job cgroup), ``"seccomp"`` (memfd_create and SysV shm denied; RLIMIT_AS x
    processes + tmpfs sizes) or ``"none"`` (RLIMIT_AS per process only)."""
    if config.memory_bound != "seccomp" and caps.setuid and caps.cgroup != "none":
        return caps.cgroup
    if config.memory_bound == "cgroup":
        raise RuntimeError(f"sandbox: memory_bound='cgroup' but no writable cgroup here ({caps.as_dict()}); "
                           "run as root with cgroup v1 memory or a cgroup v2 with the memory controller delegated")
    return "seccomp" if config.seccomp and caps.seccomp else "none"
