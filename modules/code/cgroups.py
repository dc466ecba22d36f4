"""Host side of the per-sandbox memory and process bound: one cgroup per job (v2, or v1's ``memory`` and ``pids``
hierarchies), ready before H starts, joined by H before it forks anything, emptied at release. `detect` says which
of them this machine lets us write; without one, the sandbox falls back to seccomp (docs/execution.md).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "rlhf-sandbox-"


@dataclass(frozen=True)
class CgroupLayout:
    """Where job cgroups go. ``version`` 2: ``memory`` (memory.max, pids.max together); 1: ``memory`` is the memory
    hierarchy's folder and ``pids`` the pids hierarchy's (None where that controller is not mounted or writable)."""

    version: int
    memory: str
    pids: str | None
    memsw: bool = False  # v1: memory.memsw.limit_in_bytes exists (swap is bounded with memory)

    @property
    def name(self) -> str:
        return f"cgroup{self.version}" if self.version == 2 else "cgroup1"


def _mounts(path: str) -> list[tuple[str, str, set[str]]]:
    found = []
    with contextlib.suppress(OSError), open(path) as f:
        for fields in map(str.split, f):
            if len(fields) > 3 and fields[2] in ("cgroup", "cgroup2"):
                found.append((fields[2], fields[1], set(fields[3].split(","))))
    return found


def _own_paths(path: str) -> dict[str, str]:
    """This process's cgroup per controller from /proc/self/cgroup (``""``: the v2 hierarchy)."""
    paths = {}
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            _, controllers, where = line.rstrip("\n").split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                paths[name.removeprefix("name=")] = where
    return paths


def _v2_parent(mountpoint: str, own: str) -> tuple[str, bool] | None:
    """Our own v2 cgroup and whether pids is enabled there, if it has (or can be given) the memory controller for its
    children. Enabling it fails (EBUSY) where the cgroup holds processes and is not the root: then v2 cannot be used
    without moving this process, which we do not do behind the evaluator's back."""
    parent = os.path.join(mountpoint, own.lstrip("/"))
    try:
        enabled = Path(parent, "cgroup.subtree_control").read_text().split()
        if "memory" not in enabled:
            available = Path(parent, "cgroup.controllers").read_text().split()
            if "memory" not in available:
                return None
            enabled = ["memory"] + (["pids"] if "pids" in available else [])
            Path(parent, "cgroup.subtree_control").write_text(" ".join("+" + c for c in enabled))
    except OSError:
        return None
    return (parent, "pids" in enabled) if os.access(parent, os.W_OK) else None


def _v1_parent(mountpoint: str, own: str, probe: str) -> str | None:
    parent = os.path.join(mountpoint, own.lstrip("/"))
    return parent if os.path.exists(os.path.join(parent, probe)) and os.access(parent, os.W_OK) else None


@functools.cache
def detect(mounts: str = "/proc/self/mounts", own: str = "/proc/self/cgroup") -> CgroupLayout | None:
    """The cgroup layout job cgroups can be made in (v2 preferred, else v1's memory hierarchy), or None."""
    if os.geteuid() != 0 and mounts == "/proc/self/mounts":
        return None  # making a cgroup needs root (or a delegated folder, not supported here)
    table, paths = _mounts(mounts), _own_paths(own)
    for fstype, where, _ in table:
        if fstype == "cgroup2" and "" in paths and (found := _v2_parent(where, paths[""])) is not None:
            return CgroupLayout(2, found[0], found[0] if found[1] else None)
    v1 = {c: where for fstype, where, options in table if fstype == "cgroup" for c in ("memory", "pids")
          if c in options}
    if "memory" in v1 and "memory" in paths and \
            (memory := _v1_parent(v1["memory"], paths["memory"], "memory.limit_in_bytes")) is not None:
        pids = _v1_parent(v1["pids"], paths["pids"], "cgroup.procs") if "pids" in v1 and "pids" in paths else None
        return CgroupLayout(1, memory, pids, os.path.exists(os.path.join(memory, "memory.memsw.limit_in_bytes")))
    return None


def _write(path: str, value: str, optional: bool = False) -> None:
    if optional and not os.path.exists(path):
        return
    with open(path, "w") as f:
        f.write(value)


def _members(folder: str) -> list[int]:
    with contextlib.suppress(OSError, ValueError):
        return [int(x) for x in Path(folder, "cgroup.procs").read_text().split()]
    return []


class JobCgroup:
    """One sandbox's cgroup: ``memory_mb`` for every process, tmpfs page and memfd of the sandbox together (swap
    included: v1 memsw, v2 swap.max 0), ``pids`` tasks. `join` lists the files H writes to (and what: ``""`` for its
    pid) to enter it."""

    def __init__(self, layout: CgroupLayout, name: str, memory_mb: int, pids: int) -> None:
        self.layout = layout
        self.dirs = [os.path.join(layout.memory, name)]
        if layout.version == 1 and layout.pids is not None:
            self.dirs.append(os.path.join(layout.pids, name))
        self.killed = 0
        for folder in self.dirs:
            if os.path.isdir(folder):  # an earlier lease of this uid kept it (or died before its release): empty it
                self.killed += len(self._empty(folder))
            else:
                os.mkdir(folder)
                _CREATED.add(folder)
        limit = str(memory_mb << 20)
        memory = self.dirs[0]
        if layout.version == 2:
            _write(os.path.join(memory, "memory.max"), limit)
            _write(os.path.join(memory, "memory.swap.max"), "0", optional=True)
            if layout.pids is not None:
                _write(os.path.join(memory, "pids.max"), str(pids))
        else:
            files = ["memory.limit_in_bytes"] + (["memory.memsw.limit_in_bytes"] if layout.memsw else [])
            try:  # memsw may never be below the memory limit: raise it first, lower it last (a kept cgroup)
                for name in reversed(files):
                    _write(os.path.join(memory, name), limit)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                for name in files:
                    _write(os.path.join(memory, name), limit)
            if layout.pids is not None:
                _write(os.path.join(self.dirs[1], "pids.max"), str(pids))
        self.procs = [os.path.join(folder, "cgroup.procs") for folder in self.dirs]
        # What H writes to join, before it forks anything. v1: "0" into ``tasks`` moves the writing thread (H has
        # one) without the machine-wide threadgroup lock that ``cgroup.procs`` takes, whose RCU grace period stalled
        # a join for 10-23 ms under load here (0.3 ms otherwise). v2 has only cgroup.procs for a domain cgroup.
        self.join = [(path, "") for path in self.procs] if layout.version == 2 else \
            [(os.path.join(folder, "tasks"), "0") for folder in self.dirs]

    @staticmethod
    def _empty(folder: str, attempts: int = 200) -> set[int]:
        """SIGKILL every member (v2: ``cgroup.kill``, 5.14+) until none is left; returns the members."""
        seen: set[int] = set()
        _write(os.path.join(folder, "cgroup.kill"), "1", optional=True)
        for _ in range(attempts):
            pids = _members(folder)
            if not pids:
                break
            seen.update(pids)
            for pid in pids:  # a member may be exiting already (still listed): killing it again is harmless
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.002)
        return seen

    @staticmethod
    def remove(folder: str, attempts: int = 200) -> None:
        """Empty and rmdir ``folder``; a warning if the kernel keeps it."""
        JobCgroup._empty(folder, attempts)
        for attempt in range(attempts):
            try:
                os.rmdir(folder)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno == errno.EBUSY and attempt < attempts - 1:  # the last member is still exiting
                    time.sleep(0.002)
                    continue
                log.warning("sandbox: could not remove cgroup %s (%s)", folder, e)
                break

    def release(self, remove: bool = False) -> int:
        """Kill what is left in the cgroup (normally nothing: the pid namespace died with I) and wait until it is
        empty; with ``remove``, rmdir it too. Returns how many processes were killed."""
        killed = len(set().union(*(self._empty(folder) for folder in self.dirs)))
        self.killed += killed
        if remove:
            for folder in self.dirs:
                self.remove(folder)
                _CREATED.discard(folder)
        return killed


_CREATED: set[str] = set()  # the job cgroups this process made: `recipes.modules.code.host` removes them at exit


@contextlib.contextmanager
def job_cgroup(layout: CgroupLayout, uid: int, memory_mb: int, pids: int):
    """The `JobCgroup` of the leased ``uid`` (the lease makes it exclusive machine-wide), made on its first lease and
    kept: each release kills what is left and waits until it is empty, but does not remove it; each lease empties it
    again and rewrites its limits; at exit the process removes the ones it made, each under the uid's lease
    (`recipes.modules.code.host.remove_kept_cgroups`; a killed evaluator leaves them empty, for that uid's next
    lease). Making and
    removing a memory cgroup per job took 11% of the throughput here (cgroup_mutex, memcg offlining); nothing of a
    job outlives it in its cgroup: its processes are dead and its tmpfs gone with its mount namespace, and page cache
    charged to it is reclaimable."""
    cgroup = JobCgroup(layout, f"{PREFIX}{uid}", memory_mb, pids)
    try:
        yield cgroup
    finally:
        cgroup.release()
