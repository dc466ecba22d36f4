"""Run untrusted generated programs in a sandbox: limits, namespaces, a dedicated uid, capped output, many workers.

`execute` runs one `ExecutionJob` (one program, one or more test units); `execute_many` runs jobs in parallel with a
progress bar. The job, config and result types are in `modules/code/jobs.py` (imported from here too). Launching the harness and its pipes are in `modules/code/launch.py`, the child side in
`modules/code/sandbox/harness.py`; the threat model is in docs/execution.md.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import marshal
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from recipes.modules.code import cgroups, frames
from recipes.modules.code.capabilities import memory_bound
from recipes.modules.code.host import LEFTOVER_KINDS, UidLease, lease_uid, sandbox_capabilities
from recipes.modules.code.jobs import (  # noqa: F401  (the public names of the sandbox, imported from here)
    ExecutionJob,
    ExecutionResult,
    MemoryBound,
    Mode,
    SandboxConfig,
    UnitResult,
    UnitStatus,
)
from recipes.modules.code.launch import Harness

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _isolation(config: SandboxConfig) -> Iterator[tuple[UidLease | None, str, cgroups.JobCgroup | None]]:
    """Lease a uid (when we can setuid), make an empty work dir it owns and (where the memory bound is a cgroup) the
    job's cgroup; at release the cgroup is emptied and removed, then the lease checks the host for anything of the
    uid left (`recipes.modules.code.host.sweep_uid`), then the dir is removed."""
    caps = sandbox_capabilities(config.python)
    if config.require_isolation and not caps.isolated:
        raise RuntimeError(f"sandbox: full isolation required but this machine supports {caps.as_dict()}")
    bound = memory_bound(config, caps)
    with contextlib.ExitStack() as stack:
        workdir = tempfile.mkdtemp(prefix="sandbox-", dir=frames.tmpfs_parent() if caps.mount_ns else None)
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)  # runs after the lease's release check
        lease = stack.enter_context(lease_uid(config.uid_base, config.uid_count)) if caps.setuid else None
        cgroup = None
        if lease is not None:
            os.chown(workdir, lease.uid, lease.uid)
            lease.dirs = (workdir,)
            lease.shared_dirs = () if caps.mount_ns else frames.TMPFS  # else the program wrote to the host's own /tmp
            if bound.startswith("cgroup"):
                cgroup = stack.enter_context(cgroups.job_cgroup(cgroups.detect(), lease.uid, config.sandbox_memory_mb,
                                                                config.nproc + 4))
        yield lease, workdir, cgroup


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


class _Sandbox:
    """A sandbox made ready before its job: a uid leased, a work dir made, H started with the environment frame (it
    enters the namespaces, I mounts and drops to the uid, then waits for a job). `run` sends one job, collects and
    releases everything (the release check included); `close` releases one that never got a job."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.stack = contextlib.ExitStack()
        try:
            self.lease, workdir, self.cgroup = self.stack.enter_context(_isolation(config))
            caps = sandbox_capabilities(config.python)
            env = frames.environment(config, caps, self.lease and self.lease.uid, workdir,
                                     memory_bound(config, caps), self.cgroup.join if self.cgroup else [])
            self.harness = Harness(config.python, config.fork_server, frames.frame(marshal.dumps(env)),
                                   frames.template(config) if caps.mount_ns else None)
            self.stack.callback(self.harness.close)  # before the lease's release check
        except BaseException:
            self.stack.close()
            raise

    def run(self, job: ExecutionJob, after_send: Callable[[], None] | None = None) -> ExecutionResult:
        """Run ``job`` and report each unit. Never raises for anything the program does."""
        config, lease = self.config, self.lease
        start = time.monotonic()
        nonce = secrets.token_hex(16)
        with self.stack:
            payload = frames.job_frames(job, nonce, config.python)
            cap = len(job.inputs) * (12 * config.out_bytes + 16384) + 65536
            out, err, timed_out = self.harness.communicate(payload, config.wall_timeout(len(job.inputs)), cap,
                                                           after_send)
            lines = _records(out)
            done = not timed_out and bool(lines) and lines[-1].get("end") == len(job.inputs)
            if lease is not None and done and sandbox_capabilities(config.python).pid_ns:
                lease.needs_sweep = False  # pid 1 of the namespace exited and H reaped it: the kernel killed the rest
        units = _units(job, lines, nonce)
        status = "timeout" if timed_out else ("done" if done else "crashed")
        if status == "timeout":
            units = [u if u.status != "missing" else UnitResult("timeout") for u in units]
        leftovers = _leftovers(lines, lease)
        leftovers["processes"] += self.cgroup.killed if self.cgroup is not None else 0
        if any(leftovers.values()):
            (log.warning if lease is not None and any(lease.leftovers.values()) else log.info)(
                "sandbox: the program left %s behind; all killed or removed", leftovers)
        return ExecutionResult(status, units, time.monotonic() - start, err.decode("utf-8", "replace")[-4096:],
                               leftovers)

    def close(self) -> None:
        """Release a sandbox that got no job: I reads end of file and exits before any program ran."""
        with self.stack:
            if self.harness.close(wait_s=5.0) and self.lease is not None and \
                    sandbox_capabilities(self.config.python).pid_ns:
                self.lease.needs_sweep = False  # as after a job: H reaped I, so its namespace is empty


def execute(job: ExecutionJob, config: SandboxConfig | None = None) -> ExecutionResult:
    """Run one job in the sandbox and report each unit. Never raises for anything the program does."""
    if not job.inputs:
        raise ValueError("ExecutionJob has no test units; a program with no tests cannot be judged")
    return _Sandbox(config or SandboxConfig()).run(job)


def _records(out: bytes) -> list[dict[str, Any]]:
    """I's records, one Python literal per line; a line that does not parse (cut at the output cap) is dropped."""
    lines = []
    with frames.PARSE_LOCK:
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
    """Run jobs in parallel (``n_workers`` threads, default: CPU count); keeps order. Each worker sets up the sandbox
    of its next job while the current one runs (a fresh one per job all the same: uid, namespaces, work dir)."""
    if not jobs:
        return []
    if not all(job.inputs for job in jobs):
        raise ValueError("ExecutionJob has no test units; a program with no tests cannot be judged")
    config = config or SandboxConfig()
    sandbox_capabilities(config.python)  # probe once, before the threads race for it
    workers = max(1, min(n_workers or os.cpu_count() or 1, len(jobs)))
    results: list[ExecutionResult | None] = [None] * len(jobs)
    queue, lock = iter(range(len(jobs))), threading.Lock()
    state = {"taken": 0}

    def worker(advance: Callable[[], None]) -> None:
        spare: list[_Sandbox] = []

        def get_ready() -> None:  # while this job runs; only if some job is still waiting for a worker
            with lock:
                wanted = state["taken"] < len(jobs)
            if wanted:
                spare.append(_Sandbox(config))

        try:
            while True:
                with lock:
                    i = next(queue, None)
                    state["taken"] += i is not None
                if i is None:
                    return
                sandbox = spare.pop() if spare else _Sandbox(config)
                results[i] = sandbox.run(jobs[i], get_ready)
                with lock:
                    advance()
        finally:
            for sandbox in spare:
                sandbox.close()

    with ThreadPoolExecutor(workers, thread_name_prefix="sandbox") as pool, \
            _progress(len(jobs), description, progress) as advance:
        for future in [pool.submit(worker, advance) for _ in range(workers)]:
            future.result()
    return results  # type: ignore[return-value]
