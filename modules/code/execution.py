"""Run untrusted generated programs in a sandbox: limits, namespaces, a dedicated uid, capped output, many workers.

`execute` runs one `ExecutionJob` (one program, one or more test units); `execute_many` runs jobs in parallel with a
progress bar. Launching the harness and its pipes are in `modules/code/launch.py`, the child side in
`modules/code/sandbox/harness.py`; the threat model is in docs/execution.md.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import logging
import marshal
import os
import secrets
import shutil
import site
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from recipes.modules.code.host import LEFTOVER_KINDS, UidLease, lease_uid, sandbox_capabilities
from recipes.modules.code.launch import communicate

log = logging.getLogger(__name__)

Mode = Literal["script", "stdio", "call"]
UnitStatus = Literal["ok", "error", "timeout", "output_limit", "incomplete", "skipped", "missing"]
_TMPFS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # world-writable on a stock Linux: each gets a fresh tmpfs
_PREIMPORT = ("math", "collections", "itertools", "functools", "heapq", "bisect", "re", "string", "typing",
              "fractions", "decimal", "random", "statistics", "copy", "operator", "array", "datetime", "io",
              "traceback")  # only imported up front when /root (the interpreter) is unreadable to the sandbox uid


def checkout_root() -> Path | None:
    """The source checkout this file runs from (the nearest folder above it with a ``pyproject.toml``), or None for an
    installed copy. Found by walking up, so moving this file within the package cannot change the answer."""
    return next((p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file()), None)


def _default_hidden() -> tuple[str, ...]:
    """Home folders and the folder holding this repository's checkout (problem files, canonical solutions, tests,
    ``../shared/data``); an installed copy hides the home folders only (name more in ``hidden_paths``)."""
    root = checkout_root()
    candidates = ["/root", "/home"] + ([str(root.parent)] if root is not None else [])
    return tuple(p for p in candidates if p != "/" and os.path.isdir(p))


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
        hidden_paths: folders replaced by an empty read-only tmpfs; ``None``: home folders and the repo's parent.
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
    hidden_paths: tuple[str, ...] | None = None
    python: str = sys.executable
    require_isolation: bool = False
    fork_server: bool = True

    def wall_timeout(self, n_units: int) -> float:
        return min(self.max_wall_s, self.startup_s + n_units * (self.timeout_s + 0.5))


@dataclass(frozen=True)
class ExecutionJob:
    """One program and its test units. ``script``: run ``code`` once (tests inside it, e.g. HumanEval's check);
    ``stdio``: run once per input string fed on stdin; ``call``: call ``fn_name(*args)`` once per JSON args list."""

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


@functools.cache
def _interpreter_paths(python: str) -> tuple[list[str], list[str]]:
    """Folders the sandboxed interpreter must still see (its prefix) and its site-packages (``-S`` skips site)."""
    prefixes = sorted({sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path(python).resolve().parents[1])})
    return prefixes, [p for p in site.getsitepackages() if os.path.isdir(p)]


def _spec(job: ExecutionJob, config: SandboxConfig, uid: int | None, workdir: str, nonce: str) -> dict[str, Any]:
    caps = sandbox_capabilities(config.python)
    prefixes, site_dirs = _interpreter_paths(config.python)
    inputs = [json.dumps(list(x)) if job.mode == "call" else x for x in job.inputs]
    return {
        "mode": job.mode, "code": job.code, "inputs": inputs, "fn_name": job.fn_name, "nonce": nonce,
        "timeout": config.timeout_s, "stop_on_error": config.stop_on_error, "workdir": workdir,
        "uid": uid, "gid": uid,
        "ns": {"net": caps.net_ns, "mount": caps.mount_ns, "pid": caps.pid_ns},
        "limits": {"memory_mb": config.memory_mb, "cpu_s": int(config.timeout_s) + 1, "fsize_mb": config.fsize_mb,
                   "nproc": config.nproc if uid is not None else 0, "nofile": config.nofile,
                   "out_bytes": config.out_bytes},
        "tmpfs": list(_TMPFS), "tmpfs_mb": config.tmpfs_mb,
        "hide": list(_default_hidden() if config.hidden_paths is None else config.hidden_paths),
        "expose": prefixes,
        "preimport": list(_PREIMPORT) if uid is not None and not caps.mount_ns else [],
        "sys_path": site_dirs,
    }


@contextlib.contextmanager
def _isolation(config: SandboxConfig) -> Iterator[tuple[UidLease | None, str]]:
    """Lease a uid (when we can setuid) and make an empty work dir it owns; at release the lease checks the host for
    anything of the uid left (`recipes.modules.code.host.sweep_uid`), then the dir is removed."""
    caps = sandbox_capabilities(config.python)
    if config.require_isolation and not caps.isolated:
        raise RuntimeError(f"sandbox: full isolation required but this machine supports {caps.as_dict()}")
    with contextlib.ExitStack() as stack:
        workdir = tempfile.mkdtemp(prefix="sandbox-")
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)  # runs after the lease's release check
        lease = stack.enter_context(lease_uid(config.uid_base, config.uid_count)) if caps.setuid else None
        if lease is not None:
            os.chown(workdir, lease.uid, lease.uid)
            lease.dirs = (workdir,)
            lease.shared_dirs = () if caps.mount_ns else _TMPFS  # else the program wrote to the host's own /tmp
        yield lease, workdir


def _units(job: ExecutionJob, lines: list[dict[str, Any]], nonce: str) -> list[UnitResult]:
    by_index = {r["i"]: r for r in lines if "i" in r}
    units = []
    for i in range(len(job.inputs)):
        r = by_index.get(i)
        if r is None:
            units.append(UnitResult("missing"))
            continue
        unit = UnitResult("error", r["code"], r["stdout"], r["stderr"], None, r["time"])
        if r["status"] in ("timeout", "output_limit", "skipped"):
            unit.status = r["status"]
        elif r["status"] == "exit" and r["code"] == 0:
            head, _, value = r["record"].partition("\n")
            if job.mode == "stdio":
                unit.status = "ok"
            elif not secrets.compare_digest(head.encode(), nonce.encode()):
                unit.status = "incomplete"  # exited 0 without the harness's completion record
            elif job.mode == "call":
                try:
                    unit.value, unit.status = json.loads(value), "ok"
                except (json.JSONDecodeError, RecursionError):
                    unit.status = "error"  # truncated at the output cap, or not JSON at all
            else:
                unit.status = "ok"
        units.append(unit)
    return units


def execute(job: ExecutionJob, config: SandboxConfig | None = None) -> ExecutionResult:
    """Run one job in the sandbox and report each unit. Never raises for anything the program does."""
    config = config or SandboxConfig()
    if not job.inputs:
        raise ValueError("ExecutionJob has no test units; a program with no tests cannot be judged")
    start = time.monotonic()
    nonce = secrets.token_hex(16)
    with _isolation(config) as (lease, workdir):
        payload = marshal.dumps(_spec(job, config, lease and lease.uid, workdir, nonce))
        cap = len(job.inputs) * (12 * config.out_bytes + 16384) + 65536
        wall = config.wall_timeout(len(job.inputs))
        out, err, timed_out = communicate(config.python, config.fork_server, payload, wall, cap)
        lines = _records(out)
        done = not timed_out and bool(lines) and lines[-1].get("end") == len(job.inputs)
        if lease is not None and done and sandbox_capabilities(config.python).pid_ns:
            lease.needs_sweep = False  # pid 1 of the namespace exited and H reaped it: the kernel killed the rest
    units = _units(job, lines, nonce)
    status = "timeout" if timed_out else ("done" if done else "crashed")
    if status == "timeout":
        units = [u if u.status != "missing" else UnitResult("timeout") for u in units]
    leftovers = _leftovers(lines, lease)
    if any(leftovers.values()):
        (log.warning if lease is not None and any(lease.leftovers.values()) else log.info)(
            "sandbox: the program left %s behind; all killed or removed", leftovers)
    return ExecutionResult(status, units, time.monotonic() - start, err.decode("utf-8", "replace")[-4096:],
                           leftovers)


_PARSE_LOCK = threading.Lock()  # CPython 3.11's ast.parse is not thread-safe (gh-106905: "AST constructor recursion
# depth mismatch" SystemError when execute_many's workers parse records at the same time)


def _records(out: bytes) -> list[dict[str, Any]]:
    """I's records, one Python literal per line; a line that does not parse (cut at the output cap) is dropped."""
    lines = []
    with _PARSE_LOCK:
        for raw in out.splitlines():
            with contextlib.suppress(ValueError, SyntaxError, MemoryError, RecursionError):
                record = ast.literal_eval(raw.decode("utf-8", "replace"))
                if isinstance(record, dict):
                    lines.append(record)
    return lines


def _leftovers(lines: list[dict[str, Any]], lease: UidLease | None) -> dict[str, int]:
    """Counts from inside the sandbox (I's per-unit orphans, its IPC namespace at the end) plus the host's check."""
    found = dict.fromkeys(LEFTOVER_KINDS, 0)
    for record in lines:
        found["processes"] += int(record.get("left", 0))
        found["ipc"] += int(record.get("ipc", 0))
    for kind, n in (lease.leftovers if lease is not None else {}).items():
        found[kind] += n
    return found


@contextlib.contextmanager
def _progress(total: int, description: str, enabled: bool) -> Iterator[Callable[[], None]]:
    """A rich progress bar (a no-op when disabled or when rich is missing)."""
    try:
        from rich.progress import Progress
    except ImportError:
        enabled = False
    if not enabled:
        yield lambda: None
        return
    with Progress(transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def execute_many(jobs: Sequence[ExecutionJob], config: SandboxConfig | None = None, n_workers: int | None = None,
                 progress: bool = True, description: str = "executing") -> list[ExecutionResult]:
    """Run jobs in parallel (``n_workers`` threads, default: CPU count, each launching one sandbox); keeps order."""
    if not jobs:
        return []
    config = config or SandboxConfig()
    sandbox_capabilities(config.python)  # probe once, before the threads race for it
    workers = max(1, min(n_workers or os.cpu_count() or 1, len(jobs)))
    with ThreadPoolExecutor(workers, thread_name_prefix="sandbox") as pool, \
            _progress(len(jobs), description, progress) as advance:
        futures = {pool.submit(execute, job, config): i for i, job in enumerate(jobs)}
        results: list[ExecutionResult | None] = [None] * len(jobs)
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            advance()
    return results  # type: ignore[return-value]
