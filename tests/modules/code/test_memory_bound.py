"""Memory bounded per sandbox, not per process: the attacks that hold memory RLIMIT_AS does not count (memfd files,
SysV shared memory, tmpfs files, many processes each under the limit) win in the sandbox with no memory bound, then
fail on each path this machine can run: the job cgroup (v1 here; v2 where the machine has it) and the seccomp
fallback (forced with ``memory_bound="seccomp"`` / ``RLHF_SANDBOX_MEMORY_BOUND``). The cgroup code is also run
against a fake cgroupfs for v2; what a fake cannot show (the kernel's enforcement, rmdir) is shown on the real
hierarchy only. docs/execution.md, "Memory"."""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import pytest

from recipes.modules.code import cgroups
from recipes.modules.code.execution import ExecutionJob, SandboxConfig, execute, memory_bound
from recipes.modules.code.host import sandbox_capabilities
from tests.modules.code.attacks import assert_host_clean, make_bait, remove_bait

CAPS = sandbox_capabilities()
MB = 256  # RLIMIT_AS of each process and the whole sandbox's cgroup limit; every attack tries to hold ~2.5x that
CONFIG = SandboxConfig(timeout_s=10.0, startup_s=20.0, memory_mb=MB, sandbox_memory_mb=MB, tmpfs_mb=128)
UNBOUNDED = dataclasses.replace(CONFIG, memory_bound="seccomp", seccomp=False)  # what the sandbox was before
FALLBACK = dataclasses.replace(CONFIG, memory_bound="seccomp")
isolated = pytest.mark.skipif(not CAPS.isolated, reason=f"needs root + namespaces; this machine: {CAPS.as_dict()}")
with_cgroup = pytest.mark.skipif(not (CAPS.setuid and CAPS.cgroup != "none"),
                                 reason=f"no writable cgroup here ({CAPS.cgroup}); the seccomp fallback applies")
filtered = pytest.mark.skipif(not CAPS.seccomp, reason="libseccomp is not usable here: no seccomp fallback")

ATTACKS = {  # answer() returns the MiB it held at once (0 if refused); the attack wins above the sandbox's limit
    "memfd_files": """
import os
def answer():
    held = []
    try:
        for _ in range(40):  # 640 MiB of memory-backed files: not address space
            fd = os.memfd_create('x')
            for _ in range(16):
                os.write(fd, bytes(1 << 20))
            held.append(fd)
    except OSError:
        pass
    return 16 * len(held)
""",
    "sysv_shared_memory": """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
def answer():
    held = 0
    for _ in range(40):  # 16 MiB segments, touched while attached, kept after shmdt
        shm = libc.shmget(0, 16 << 20, 0o1600)
        if shm < 0:
            break
        addr = libc.shmat(shm, None, 0)
        ctypes.memset(addr, 1, 16 << 20)
        libc.shmdt(ctypes.c_void_p(addr))
        held += 16
    return held
""",
    "tmpfs_files_everywhere": """
import os
def answer():
    held = 0
    for folder in ('/tmp', '/var/tmp', '/dev/shm', '.'):
        for n in range(8):  # 16 MiB files (RLIMIT_FSIZE) until each tmpfs is full
            try:
                with open(os.path.join(folder, f'fill{n}'), 'wb') as f:
                    for _ in range(16):
                        f.write(bytes(1 << 20))
                        f.flush()
                        held += 1
            except OSError:
                break
    return held
""",
    "many_processes_each_under_the_limit": """
import os, time
def answer():
    r, w = os.pipe()
    children = []
    for _ in range(6):  # 6 x 110 MiB, each process well under RLIMIT_AS
        pid = os.fork()
        if pid == 0:
            block = bytearray(110 << 20)
            for i in range(0, len(block), 4096):
                block[i] = 1
            os.write(w, b'x')
            time.sleep(30)
            os._exit(0)
        children.append(pid)
    filled, deadline = 0, time.monotonic() + 8
    os.set_blocking(r, False)
    while filled < 6 and time.monotonic() < deadline:
        try:
            filled += len(os.read(r, 16))
        except BlockingIOError:
            time.sleep(0.01)
    time.sleep(0.5)  # an OOM kill may still be on its way
    alive = sum(os.waitpid(pid, os.WNOHANG) == (0, 0) for pid in children)
    return 110 * min(filled, alive)
""",
}


def held_mb(config: SandboxConfig, name: str) -> int | str:
    result = execute(ExecutionJob(ATTACKS[name], "call", [[]], "answer"), config)
    return result.units[0].value if result.all_ok else result.units[0].status  # "error": killed by the OOM killer


@pytest.fixture(scope="module")
def host_bait():
    made = make_bait()
    yield made
    remove_bait(*made)


@isolated
@pytest.mark.parametrize("name", list(ATTACKS))
def test_memory_attack_is_real_then_bounded_per_sandbox(name, host_bait):
    bait, _, listener = host_bait
    assert held_mb(UNBOUNDED, name) > MB, f"control: {name} should hold more than {MB} MiB without a memory bound"
    assert_host_clean(bait, listener)
    if CAPS.setuid and CAPS.cgroup != "none":
        held = held_mb(CONFIG, name)
        assert held == "error" or held <= MB, f"{name} held {held} MiB past the job cgroup's {MB} MiB"
        assert_host_clean(bait, listener)
    if CAPS.seccomp:  # the fallback's bound: memfd and SysV shm denied, tmpfs sizes, RLIMIT_AS x RLIMIT_NPROC
        held = held_mb(FALLBACK, name)
        bound = {"tmpfs_files_everywhere": 4 * CONFIG.tmpfs_mb,
                 "many_processes_each_under_the_limit": CONFIG.nproc * MB}.get(name, 0)
        assert held == "error" or held <= bound, f"{name} held {held} MiB under the seccomp fallback"
        assert_host_clean(bait, listener)


CGROUP = "def f():\n    return open('/proc/self/cgroup').read()\n"


@isolated
@with_cgroup
def test_the_program_runs_in_its_jobs_cgroup():
    result = execute(ExecutionJob(CGROUP, "call", [[]], "f"), CONFIG)
    assert result.all_ok and memory_bound(CONFIG, CAPS) == CAPS.cgroup
    lines = result.units[0].value.splitlines()
    if CAPS.cgroup == "cgroup1":
        assert [line for line in lines if ":memory:" in line][0].split("/")[-1].startswith(cgroups.PREFIX)
        layout = cgroups.detect()
        if layout.pids is not None:
            assert [line for line in lines if ":pids:" in line][0].split("/")[-1].startswith(cgroups.PREFIX)
    else:
        assert lines[0].split("/")[-1].startswith(cgroups.PREFIX)
    fallback = execute(ExecutionJob(CGROUP, "call", [[]], "f"), FALLBACK)
    assert fallback.all_ok and cgroups.PREFIX not in fallback.units[0].value  # forced fallback: no cgroup


def test_the_fallback_is_chosen_by_option_or_environment(monkeypatch):
    monkeypatch.setenv("RLHF_SANDBOX_MEMORY_BOUND", "seccomp")
    assert SandboxConfig().memory_bound == "seccomp"
    assert memory_bound(SandboxConfig(), CAPS) == ("seccomp" if CAPS.seccomp else "none")
    monkeypatch.setenv("RLHF_SANDBOX_MEMORY_BOUND", "swap")
    with pytest.raises(ValueError, match="RLHF_SANDBOX_MEMORY_BOUND"):
        SandboxConfig()
    without = dataclasses.replace(CAPS, cgroup="none")
    with pytest.raises(RuntimeError, match="no writable cgroup"):
        memory_bound(SandboxConfig(memory_bound="cgroup"), without)
    assert memory_bound(FALLBACK, dataclasses.replace(without, seccomp=False)) == "none"  # said, not claimed


@pytest.mark.skipif(os.geteuid() != 0 or cgroups.detect() is None, reason="needs root and a writable cgroup")
def test_a_job_cgroup_has_its_limits_and_is_emptied_at_release_and_removable():
    """On the real hierarchy: the limits are written, a process that joined is killed at release (the folders stay
    for the uid's next lease), and removing them works."""
    layout = cgroups.detect()
    with cgroups.job_cgroup(layout, 63990, 64, 12) as cgroup:
        folder = cgroup.dirs[0]
        limit = "memory.max" if layout.version == 2 else "memory.limit_in_bytes"
        assert int(open(os.path.join(folder, limit)).read()) == 64 << 20
        if layout.version == 1 and layout.memsw:
            assert int(open(os.path.join(folder, "memory.memsw.limit_in_bytes")).read()) == 64 << 20
        pid = os.fork()
        if pid == 0:
            for path, value in cgroup.join:  # as H joins
                with open(path, "w") as f:
                    f.write(value or str(os.getpid()))
            time.sleep(30)
            os._exit(0)
        deadline = time.monotonic() + 10
        while not all(str(pid) in open(p).read().split() for p in cgroup.procs) and time.monotonic() < deadline:
            time.sleep(0.01)
    assert cgroup.killed == 1  # the sleeper
    assert os.waitpid(pid, 0)[1] & 0x7F == 9 and all(cgroups._members(d) == [] for d in cgroup.dirs)
    for mb in (128, 32):  # the uid's next leases: its kept cgroup gets their limits, raised or lowered
        with cgroups.job_cgroup(layout, 63990, mb, 12) as again:
            assert again.dirs == cgroup.dirs and int(open(os.path.join(folder, limit)).read()) == mb << 20
    cgroup.release(remove=True)
    assert not any(os.path.exists(d) for d in cgroup.dirs)


def _fake_v2(tmp_path, controllers: str, enabled: str):
    (tmp_path / "unified" / "job.slice").mkdir(parents=True)
    (tmp_path / "unified" / "job.slice" / "cgroup.controllers").write_text(controllers)
    (tmp_path / "unified" / "job.slice" / "cgroup.subtree_control").write_text(enabled)
    (tmp_path / "mounts").write_text(f"cgroup2 {tmp_path}/unified cgroup2 rw,nosuid 0 0\n")
    (tmp_path / "cgroup").write_text("0::/job.slice\n")
    return cgroups.detect.__wrapped__(str(tmp_path / "mounts"), str(tmp_path / "cgroup"))


def test_v2_against_a_fake_cgroupfs(tmp_path, caplog, monkeypatch):
    """What a plain folder can show of v2: the choice of parent, enabling memory+pids for children, the files a job
    cgroup writes. Not shown (a fake cannot): the kernel's enforcement, EBUSY on an occupied cgroup, rmdir."""
    monkeypatch.setattr(cgroups, "_CREATED", set())  # not removed at exit: these are plain folders
    layout = _fake_v2(tmp_path, "cpu memory pids", "")
    parent = str(tmp_path / "unified" / "job.slice")
    assert layout == cgroups.CgroupLayout(2, parent, parent)
    assert (tmp_path / "unified" / "job.slice" / "cgroup.subtree_control").read_text() == "+memory +pids"
    cgroup = cgroups.JobCgroup(layout, "rlhf-sandbox-7", 300, 36)
    job = tmp_path / "unified" / "job.slice" / "rlhf-sandbox-7"
    assert (job / "memory.max").read_text() == str(300 << 20) and (job / "pids.max").read_text() == "36"
    assert cgroup.procs == [str(job / "cgroup.procs")] and cgroup.join == [(str(job / "cgroup.procs"), "")]
    (job / "cgroup.kill").write_text("0")
    cgroup.release()
    assert (job / "cgroup.kill").read_text() == "1"  # v2 kills the whole cgroup at once
    with caplog.at_level(logging.WARNING):
        cgroup.release(remove=True)  # a plain folder with files cannot be removed like a cgroup: it says so
    assert "could not remove cgroup" in caplog.text


def test_v2_without_memory_falls_back_to_v1_and_then_to_none(tmp_path, monkeypatch):
    monkeypatch.setattr(cgroups, "_CREATED", set())
    assert _fake_v2(tmp_path, "cpu io", "") is None  # v2 with no memory controller, as on this machine's unified
    memory = tmp_path / "v1memory" / "job"
    memory.mkdir(parents=True)
    (memory / "memory.limit_in_bytes").write_text("9223372036854771712")
    with open(tmp_path / "mounts", "a") as f:
        f.write(f"cgroup {tmp_path}/v1memory cgroup rw,memory 0 0\n")
    (tmp_path / "cgroup").write_text("4:memory:/job\n0::/job.slice\n")
    layout = cgroups.detect.__wrapped__(str(tmp_path / "mounts"), str(tmp_path / "cgroup"))
    assert layout == cgroups.CgroupLayout(1, str(memory), None, False)
    cgroup = cgroups.JobCgroup(layout, "rlhf-sandbox-8", 100, 36)
    assert (memory / "rlhf-sandbox-8" / "memory.limit_in_bytes").read_text() == str(100 << 20)
    assert cgroup.join == [(str(memory / "rlhf-sandbox-8" / "tasks"), "0")]  # v1: the thread, without the global lock
