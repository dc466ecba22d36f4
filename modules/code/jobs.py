"""What a sandboxed run is given and what it returns: `SandboxConfig` (limits and isolation), `ExecutionJob` (one
program and its test units), `UnitResult` and `ExecutionResult`. Run by `recipes.modules.code.execution`."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["script", "stdio", "call", "check"]
UnitStatus = Literal["ok", "error", "timeout", "output_limit", "incomplete", "skipped", "missing"]
MemoryBound = Literal["auto", "cgroup", "seccomp"]

@dataclass(frozen=True)
class SandboxConfig:
    """Limits of one sandboxed run. Per-unit limits apply to each test unit (one stdin or one call) separately.

    Args:
        timeout_s: wall-clock limit per unit (the APPS evaluator uses 4 s).
        memory_mb: address-space limit (RLIMIT_AS) of the program.
        nproc: processes the sandbox uid may have at once (RLIMIT_NPROC; binds because the uid is not root).
        out_bytes: stdout kept per unit; a program printing more is stopped ("output_limit").
        stop_on_error: skip the remaining units after a crash or timeout (rewards need all-pass only).
        max_wall_s: ceiling on a whole job, startup included.
        sandbox_memory_mb: memory of the whole sandbox (every process, tmpfs page and memfd together) where a
            cgroup bounds it (`memory_bound`); ``nproc + 4`` bounds its tasks there.
        memory_bound: ``"auto"`` (a cgroup where one can be made, else seccomp), ``"cgroup"`` (refuse to run
            without one) or ``"seccomp"`` (no cgroup: deny memfd_create and SysV shm, so that RLIMIT_AS, the tmpfs
            sizes and NOFILE bound the rest); default from ``RLHF_SANDBOX_MEMORY_BOUND``. docs/execution.md.
        seccomp: load the system-call filter in the program's processes (`recipes.modules.code.sandbox.seccomp`).
        hidden_paths: folders inside the sandbox's allowlisted (bound) trees covered by an empty tmpfs; ``None``:
            home folders and the repo's parent (outside the allowlist everything is absent anyway).
        fork_server: fork each harness from one warm root process instead of launching an interpreter per job.
    """

    timeout_s: float = 4.0
    memory_mb: int = 1024
    fsize_mb: int = 16
    nproc: int = 32
    nofile: int = 256
    out_bytes: int = 1 << 20
    stop_on_error: bool = True
    startup_s: float = 10.0
    max_wall_s: float = 300.0
    tmpfs_mb: int = 64
    uid_base: int = 63000
    uid_count: int = 512
    sandbox_memory_mb: int = 1536
    memory_bound: MemoryBound = field(default_factory=lambda: os.environ.get("RLHF_SANDBOX_MEMORY_BOUND", "auto"))
    seccomp: bool = True
    hidden_paths: tuple[str, ...] | None = None
    python: str = sys.executable
    require_isolation: bool = False
    fork_server: bool = True

    def __post_init__(self) -> None:
        if self.memory_bound not in ("auto", "cgroup", "seccomp"):
            raise ValueError(f"SandboxConfig.memory_bound={self.memory_bound!r} (or RLHF_SANDBOX_MEMORY_BOUND): "
                             "use 'auto', 'cgroup' or 'seccomp'")
        if self.sandbox_memory_mb < 64:
            raise ValueError(f"SandboxConfig.sandbox_memory_mb={self.sandbox_memory_mb}: needs at least 64")

    def wall_timeout(self, n_units: int) -> float:
        return min(self.max_wall_s, self.startup_s + n_units * (self.timeout_s + 0.5))


@dataclass(frozen=True)
class ExecutionJob:
    """One program and its test units. ``script``: run ``code`` once (any tests inside it run with it); ``stdio``: run
    once per input string fed on stdin; ``call``: call ``fn_name(*args)`` once per JSON args list; ``check``: per
    input, a trusted test program defining ``check(candidate)`` (HumanEval's ``prompt + test``) runs *outside* the
    program's process, with ``candidate`` (and the name ``fn_name``) a proxy that sends each call's arguments to the
    program and gets back plain data (`recipes.modules.code.sandbox.calls`)."""

    code: str
    mode: Mode = "script"
    inputs: Sequence[Any] = (None,)
    fn_name: str | None = None


@dataclass
class UnitResult:
    status: UnitStatus
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    value: Any = None  # call mode: the returned value after a JSON round trip
    time_s: float = 0.0


@dataclass
class ExecutionResult:
    """What happened. ``status`` is ``"done"`` only when the harness reported every unit and its end marker.
    ``leftovers`` counts, per kind (processes, ipc, keys, files), what outlived the program and was cleaned: inside
    the sandbox (orphans killed after each unit, IPC objects left in its namespace) and by the host's release check."""

    status: Literal["done", "timeout", "crashed"]
    units: list[UnitResult] = field(default_factory=list)
    time_s: float = 0.0
    harness_stderr: str = ""
    leftovers: dict[str, int] = field(default_factory=dict)  # what the job left behind, killed or removed: by kind

    @property
    def all_ok(self) -> bool:
        return self.status == "done" and bool(self.units) and all(u.status == "ok" for u in self.units)
